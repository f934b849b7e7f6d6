"""EK-FAC curvature per tracked module, in sketch space (or full space when P = R = I).

For a module with projected activations ã and output gradients g̃:
`A = E[ã ãᵀ]`, `B = E[g̃ g̃ᵀ]` (labels sampled from the model), eigenbases `U_A`, `U_B`,
eigenvalue correction `Λ = E_n[(U_Bᵀ S_n U_A)²]`, damping `λ = damping · mean(Λ)`.
A preconditioned, flattened vector `(U_Bᵀ S U_A) / sqrt(Λ + λ)` makes EK-FAC influence a plain
inner product.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from indexer.distributed import Ranks
from indexer.errors import InvalidInputError
from indexer.hashing import int63
from indexer.passes import ExamplePass
from indexer.sketch import Capture, Projection

# A module whose mean eigenvalue is under this share of the modules' average has no curvature
# measured (`EigenvalueAccumulator.finish`): a dead expert's is 0, a router's rounding noise
# 1e-14; real modules' spread 0.009-7 (demo), 0.08-8 (a 4-layer, 256-wide model).
UNMEASURED = 1e-8


def rotate(sketches: Tensor, eigvecs_a: Tensor, eigvecs_b: Tensor) -> Tensor:
    """`U_Bᵀ S U_A` for `S [batch, r_out, r_in]`: sketches in the Kronecker eigenbasis."""
    return eigvecs_b.T @ sketches @ eigvecs_a


def rotated_sums(
    gradients: Tensor, activations: Tensor, eigvecs_a: Tensor, eigvecs_b: Tensor
) -> Tensor:
    """`rotate(Σ_t g_t a_tᵀ)` `[batch, r_out, r_in]` from the tokens `g [batch, tokens, r_out]`
    and `a [batch, tokens, r_in]`: rotates the tokens first when that is cheaper (short
    sequences, wide modules) than rotating the per-example sums."""
    tokens, d_out, d_in = gradients.shape[1], eigvecs_b.shape[0], eigvecs_a.shape[0]
    if tokens * (d_out**2 + d_in**2) < d_out * d_in * (d_out + d_in):
        return torch.einsum("bto,bti->boi", gradients @ eigvecs_b, activations @ eigvecs_a)
    return rotate(torch.einsum("bto,bti->boi", gradients, activations), eigvecs_a, eigvecs_b)


def _new_file_mode() -> int:
    """The mode `open` gives a new file: 0666 less the process's umask (read from Linux's
    /proc, since setting a umask to learn it would race with other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0o644
    masks = [line.split()[1] for line in status.splitlines() if line.startswith("Umask:")]
    return 0o666 & ~int(masks[0], 8) if masks else 0o644


@dataclass
class ModuleCurvature:
    """EK-FAC factors of one module: `U_A [r_in, r_in]`, `U_B [r_out, r_out]`, `Λ [r_out, r_in]`."""

    projection: Projection
    eigvecs_a: Tensor
    eigvecs_b: Tensor
    eigvals: Tensor
    damping: float

    @property
    def dim(self) -> int:
        return self.eigvals.numel()

    @property
    def inverse_sqrt(self) -> Tensor:
        return (self.eigvals + self.damping).rsqrt()

    def precondition(self, sketches: Tensor) -> Tensor:
        """`[batch, r_out, r_in]` -> `[batch, r_out * r_in]`, rotated and scaled by `(Λ+λ)^-1/2`."""
        return (rotate(sketches, self.eigvecs_a, self.eigvecs_b) * self.inverse_sqrt).flatten(1)

    def precondition_tokens(self, gradients: Tensor, activations: Tensor) -> Tensor:
        """`precondition(Σ_t g_t a_tᵀ)` from the tokens `g [batch, tokens, r_out]`, `a [batch,
        tokens, r_in]` (see `rotated_sums`)."""
        rotated = rotated_sums(gradients, activations, self.eigvecs_a, self.eigvecs_b)
        return (rotated * self.inverse_sqrt).flatten(1)

    def squared_norms(
        self, gradients: Tensor, activations: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`‖precondition(Σ_t g_t a_tᵀ)‖²` `[batch]` from the tokens (as `precondition_tokens`):
        the squared rotated sums weighted by `1/(Λ+λ)` in one matrix-vector product, with no
        scaled float64 copy of them (which took about a quarter of the exact norms' time).

        With query `weights [Q, r_out * r_in]` (`rotated_targets`), also the queries' scores
        `⟨q, precondition(Σ_t g_t a_tᵀ)⟩` `[Q, batch]` from the same rotated sums: one more
        product, where a separate pass would redo the forward/backward."""
        rotated = rotated_sums(gradients, activations, self.eigvecs_a, self.eigvecs_b).flatten(1)
        squared = rotated.square() @ (self.eigvals + self.damping).reciprocal().flatten()
        return squared, None if weights is None else weights @ rotated.T

    def rotated_targets(self, vectors: Tensor) -> Tensor:
        """`q / sqrt(Λ+λ)` `[Q, r_out * r_in]` of preconditioned vectors `q [Q, r_out * r_in]`:
        its product with a sketch's rotated sums `U_Bᵀ S U_A` is `⟨q, precondition(S)⟩`."""
        return vectors * self.inverse_sqrt.flatten()

    def fold(self, vectors: Tensor) -> Tensor:
        """`M = U_B (q / sqrt(Λ+λ)) U_Aᵀ` `[Q, r_out, r_in]` of preconditioned vectors `q [Q, r_out
        * r_in]`: `⟨M, S⟩ = ⟨q, precondition(S)⟩` for any `S`, and `⟨M, S⟩` splits over the
        tokens of a sketch (`contract`)."""
        scaled = vectors.view(-1, *self.eigvals.shape) * self.inverse_sqrt
        return self.eigvecs_b @ scaled @ self.eigvecs_a.T

    def contract(self, gradients: Tensor, activations: Tensor, folded: Tensor) -> Tensor:
        """`g_tᵀ M_q a_t` `[Q, batch, tokens]` of the tokens `g [batch, tokens, r_out]`, `a [batch,
        tokens, r_in]` with folded queries `M [Q, r_out, r_in]` (see `fold`)."""
        projected = torch.einsum("bto,qoi->qbti", gradients, folded)
        return torch.einsum("qbti,bti->qbt", projected, activations)


@dataclass
class Curvature:
    """EK-FAC factors of every tracked module, in the order vectors are concatenated."""

    modules: dict[str, ModuleCurvature]

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.modules.values())

    def layer_slices(self) -> dict[str, slice]:
        """Each module's columns in the concatenated vector."""
        slices, start = {}, 0
        for name, module in self.modules.items():
            slices[name] = slice(start, start + module.dim)
            start += module.dim
        return slices

    def projections(self) -> dict[str, Projection]:
        return {name: m.projection for name, m in self.modules.items()}

    def vectors(self, capture: Capture) -> Tensor:
        """Preconditioned vectors `[batch, D]` of a batch's sketches (from its tokens, rotated
        in whichever order costs less: see `rotated_sums`)."""
        return torch.cat(
            [
                m.precondition_tokens(capture.gradients[n], capture.activations[n])
                for n, m in self.modules.items()
            ],
            dim=1,
        )

    def fold(self, vectors: Tensor) -> dict[str, Tensor]:
        """Preconditioned query vectors `[Q, D]` folded, per module, into `M_l [Q, r_out, r_in]`
        (see `ModuleCurvature.fold`)."""
        slices = self.layer_slices()
        return {name: m.fold(vectors[:, slices[name]]) for name, m in self.modules.items()}

    def token_scores(self, capture: Capture, folded: dict[str, Tensor]) -> Tensor:
        """Influence `[Q, batch, tokens]` of each token of a batch on each folded query:
        `Σ_l g_tᵀ M_l a_t`. An example's tokens sum to `⟨q, v_n⟩` (as `vectors` would give it),
        with one module's contraction in memory at a time and no per-example gradient."""
        return sum(
            capture.at_tokens(
                name, m.contract(capture.gradients[name], capture.activations[name], folded[name])
            )
            for name, m in self.modules.items()
        )

    def example_scores(self, capture: Capture, folded: dict[str, Tensor]) -> Tensor:
        """Influence `[Q, batch]` of each example of a batch on each folded query: `token_scores`
        summed over the tokens, contracted in the cheaper order for more than one query: each
        example's gradient of one module `Σ_t g_t a_tᵀ` `[batch, r_out, r_in]` at a time, then
        `⟨M_l, ·⟩` (batch·tokens·r_out·r_in + Q·batch·r_out·r_in multiply-adds, against
        Q·batch·tokens·r_out·r_in token by token)."""
        return sum(
            # A plain matrix product: torch.einsum's own took 7x as long (one thread).
            folded[name].flatten(1) @ capture.sketches_of(name).flatten(1).T
            for name in self.modules
        )

    def norms(
        self, capture: Capture, weights: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`‖v_n‖` `[batch]` (float64) of a batch's preconditioned vectors, module by module:
        never every module's part of `v_n` at once; with query `weights` (per module, see
        `ModuleCurvature.rotated_targets`) also their influence `⟨q, v_n⟩` `[Q, batch]`, from
        the same rotations (None without)."""
        squared, scores = 0, None
        for name, m in self.modules.items():
            weight = None if weights is None else weights[name]
            part, dots = m.squared_norms(capture.gradients[name], capture.activations[name], weight)
            squared = squared + part.double()
            scores = dots if scores is None else scores + dots
        return squared.sqrt(), scores

    def save(self, path: Path) -> None:
        tensors: dict[str, Tensor] = {}
        for name, m in self.modules.items():
            tensors[f"{name}/U_A"] = m.eigvecs_a
            tensors[f"{name}/U_B"] = m.eigvecs_b
            tensors[f"{name}/Lambda"] = m.eigvals
            if m.projection.P is not None:
                tensors[f"{name}/P"] = m.projection.P
                tensors[f"{name}/R"] = m.projection.R
        meta = {
            "modules": list(self.modules),
            "damping": {n: m.damping for n, m in self.modules.items()},
        }
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()},
            path,
            {"curvature": json.dumps(meta)},
        )
        # safetensors writes the file 0600; a server running as another user must read it
        # as it reads the version's other files.
        os.chmod(path, _new_file_mode())

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> Curvature:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["curvature"])
        tensors = load_file(path, device=device)
        modules = {
            name: ModuleCurvature(
                Projection(tensors.get(f"{name}/P"), tensors.get(f"{name}/R")),
                tensors[f"{name}/U_A"],
                tensors[f"{name}/U_B"],
                tensors[f"{name}/Lambda"],
                float(meta["damping"][name]),
            )
            for name in meta["modules"]
        }
        return cls(modules)


class CovarianceAccumulator:
    """Running token sums of `ã ãᵀ` and `g̃ g̃ᵀ` per module: each batch's product in float32
    (a batch holds few tokens, and float64 products cost several times more), the running sums
    in float64."""

    def __init__(self) -> None:
        self.a: dict[str, Tensor] = {}
        self.g: dict[str, Tensor] = {}
        self.tokens = 0

    def add(self, capture: Capture) -> None:
        for name, a in capture.activations.items():
            a2 = a.reshape(-1, a.shape[-1])
            g2 = capture.gradients[name].reshape(-1, capture.gradients[name].shape[-1])
            self.a[name] = self.a.get(name, 0) + (a2.T @ a2).double()
            self.g[name] = self.g.get(name, 0) + (g2.T @ g2).double()
        self.tokens += capture.n_tokens

    def merge(self, other: CovarianceAccumulator) -> None:
        for name in other.a:
            self.a[name] = self.a.get(name, 0) + other.a[name]
            self.g[name] = self.g.get(name, 0) + other.g[name]
        self.tokens += other.tokens

    def all_reduce(self, ranks: Ranks) -> None:
        """Sum the statistics of every rank of a distributed build (each saw its shard)."""
        ranks.sum_([t for name in sorted(self.a) for t in (self.a[name], self.g[name])])
        self.tokens = ranks.sum_int(self.tokens)

    def eigenbases(self) -> dict[str, tuple[Tensor, Tensor]]:
        """`(U_A, U_B)` per module from float64 symmetric eigendecompositions."""
        scale = 1.0 / max(self.tokens, 1)
        return {
            name: (
                torch.linalg.eigh(self.a[name] * scale).eigenvectors.float(),
                torch.linalg.eigh(self.g[name] * scale).eigenvectors.float(),
            )
            for name in self.a
        }


class EigenvalueAccumulator:
    """Running sums of `(U_Bᵀ S_n U_A)²` over examples, per module, in float64."""

    def __init__(self, bases: dict[str, tuple[Tensor, Tensor]]):
        self.bases = bases
        self.sums: dict[str, Tensor] = {}
        self.examples = 0

    def add(self, capture: Capture) -> None:
        for name, activations in capture.activations.items():
            eig_a, eig_b = self.bases[name]
            rotated = rotated_sums(capture.gradients[name], activations, eig_a, eig_b)
            # A batch's squares sum in float32 (a few terms each), the running sums in float64.
            batch = rotated.square().sum(dim=0).double()
            self.sums[name] = self.sums.get(name, 0) + batch
        self.examples += next(iter(capture.activations.values())).shape[0]

    def all_reduce(self, ranks: Ranks) -> None:
        """Sum the statistics of every rank of a distributed build (each saw its shard)."""
        ranks.sum_([self.sums[name] for name in sorted(self.sums)])
        self.examples = ranks.sum_int(self.examples)

    def finish(self, projections: dict[str, Projection], damping: float) -> Curvature:
        """λ = `damping` · mean(Λ) per module; one with no curvature measured (`UNMEASURED`:
        an expert no fitted token was routed to, Λ = 0) takes the modules' average instead, as
        a module of typical curvature: a damping of 0 made every example's vector NaN, and a
        tiny one would let its few tokens outweigh every other module."""
        eigvals = {n: (s / max(self.examples, 1)).float() for n, s in self.sums.items()}
        means = {n: e.mean().item() for n, e in eigvals.items()}
        average = sum(means.values()) / max(len(means), 1)
        if average <= 0:
            raise InvalidInputError(
                "the curvature fit saw no gradient in any tracked module: its examples have no "
                "token to predict"
            )
        modules = {}
        for name, (eig_a, eig_b) in self.bases.items():
            mean = means[name] if means[name] > UNMEASURED * average else average
            modules[name] = ModuleCurvature(
                projections[name], eig_a, eig_b, eigvals[name], damping * mean
            )
        return Curvature(modules)


def subsample(example_ids: Iterable[int], size: int, seed: int) -> list[int]:
    """Sorted rows of the `size` examples whose `int63(seed, id)` is smallest (all rows when
    there are no more): a deterministic random subsample chosen by example id, not by row, so
    it does not move when other examples come or go, and a stream of ids is enough for it
    (memory for `size` rows only)."""
    keyed = ((int63("fit", seed, i), row) for row, i in enumerate(example_ids))
    return sorted(row for _, row in heapq.nsmallest(size, keyed))


@dataclass
class FittedCurvature:
    """The sketch-space factors, and (when asked) the unprojected ones (P = R = I) fitted in
    the same passes with the same sampled labels: what exact re-ranking needs."""

    sketch: Curvature
    unprojected: Curvature | None = None


def fit_curvature(
    example_pass: ExamplePass,
    rows: list[int],
    damping: float,
    *,
    unprojected: bool = False,
    ranks: Ranks | None = None,
) -> FittedCurvature:
    """Two passes over `rows` with sampled labels: covariances -> eigenbases, then Λ in them.

    In a distributed build (`ranks`) each rank passes over its shard of `rows` (every rank
    needs one), the sums are all-reduced, and the eigenbases are computed once, on rank 0, and
    broadcast: every rank ends with the same factors.
    """
    ranks = ranks or Ranks()
    mine = ranks.shard(rows)
    views = ("sketch", "unprojected") if unprojected else ("sketch",)
    covariances = {view: CovarianceAccumulator() for view in views}
    for _, capture in example_pass.run(
        mine, "sampled", "curvature: covariances", keep_unprojected=unprojected
    ):
        for view in views:
            covariances[view].add(_view(capture, view))
    for view in views:
        covariances[view].all_reduce(ranks)
    bases = ranks.broadcast(
        {view: covariances[view].eigenbases() for view in views} if ranks.main else None
    )
    eigenvalues = {view: EigenvalueAccumulator(bases[view]) for view in views}
    for _, capture in example_pass.run(
        mine, "sampled", "curvature: eigenvalues", keep_unprojected=unprojected
    ):
        for view in views:
            eigenvalues[view].add(_view(capture, view))
    for view in views:
        eigenvalues[view].all_reduce(ranks)
    projections = example_pass.sketcher.projections
    identity = {name: Projection(None, None) for name in projections}
    return FittedCurvature(
        eigenvalues["sketch"].finish(projections, damping),
        eigenvalues["unprojected"].finish(identity, damping) if unprojected else None,
    )


def _view(capture: Capture, view: str) -> Capture:
    return capture.unprojected if view == "unprojected" else capture
