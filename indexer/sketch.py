"""Gradient sketches from forward/backward hooks: `S = sum_t (P g_t)(R a_t)^T` per module.

No per-example weight gradient is ever materialised (unless P and R are the identity, which is
exactly what the exact reference scorer asks for). The same code serves the build and queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indexer.config import Autocast
from indexer.experts import ExpertMatrix, traced_experts
from indexer.hashing import int63
from indexer.model import Tracked, module_shape

IGNORE = -100
LabelMode = Literal["data", "sampled"]
AUTOCAST_DTYPES = {Autocast.BF16: torch.bfloat16}  # Autocast.OFF: float32, no autocast


@dataclass(frozen=True)
class Projection:
    """Gaussian `P [r_out, d_out]` and `R [r_in, d_in]`; None stands for the identity."""

    P: Tensor | None
    R: Tensor | None


def gaussian_projection(
    name: str, module: Tracked, rank_in: int, rank_out: int, seed: int
) -> Projection:
    """Projection for one module, seeded by (seed, name), scaled to preserve inner products.

    Drawn on the CPU (the same matrices whatever the device), then moved to the module's.
    """
    shape = module_shape(module)
    device = module.weight.device
    generator = torch.Generator().manual_seed(int63(seed, name))
    P = torch.randn(rank_out, shape.d_out, generator=generator) / rank_out**0.5
    R = torch.randn(rank_in, shape.d_in, generator=generator) / rank_in**0.5
    return Projection(P.to(device), R.to(device))


@dataclass
class TokenBatch:
    """A right-padded batch; `targets[b, t]` is the token predicted at position t-1 (or IGNORE)."""

    input_ids: Tensor  # [batch, tokens]
    attention_mask: Tensor  # [batch, tokens]
    targets: Tensor  # [batch, tokens]
    sample_seeds: list[int]  # per example, for labels sampled from the model

    @property
    def loss_mask(self) -> Tensor:
        return self.targets != IGNORE


def make_batch(
    sequences: list[list[int]], loss_starts: list[int], pad_id: int, sample_seeds: list[int]
) -> TokenBatch:
    """Pad token lists; tokens at positions >= loss_starts[b] carry the loss."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, IGNORE)
    for b, (seq, start) in enumerate(zip(sequences, loss_starts, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        targets[b, max(start, 1) : len(seq)] = input_ids[b, max(start, 1) : len(seq)]
    return TokenBatch(input_ids, attention_mask, targets, sample_seeds)


def summed_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example summed token NLL: logits `[batch, tokens, vocab]` -> `[batch]`."""
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return nll.view(targets.shape[0], -1).sum(dim=1)


@torch.no_grad()
def sample_targets(logits: Tensor, batch: TokenBatch) -> Tensor:
    """Targets drawn from the model's own predictive distribution (the true Fisher).

    Inverse-CDF sampling with one uniform stream per example, seeded per example, so a draw
    does not depend on which batch the example lands in.
    """
    width = logits.shape[1] - 1
    uniforms = torch.stack(
        [torch.rand(width, generator=torch.Generator().manual_seed(s)) for s in batch.sample_seeds]
    ).to(logits.device)
    cdf = torch.softmax(logits[:, :-1].float(), dim=-1).cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (uniforms * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    drawn = drawn.clamp(max=logits.shape[-1] - 1)
    targets = batch.targets.to(logits.device).clone()
    targets[:, 1:] = torch.where(batch.loss_mask[:, 1:].to(logits.device), drawn, IGNORE)
    return targets


@dataclass
class Capture:
    """Per module: projected inputs `a [batch, tokens, r_in]`, output grads `g [.., r_out]`.

    `unprojected`, when asked for, holds the same pass without projection: `a [batch, tokens,
    d_in]` (bias column included) and `g [batch, tokens, d_out]`, as identity projections give.

    A module that sees only some tokens (an expert: those routed to it) holds them packed,
    `[batch, tokens_l, ..]` with `tokens_l` the most any example routed to it (zero-filled),
    and `positions[name] [batch, tokens_l]` their positions in the batch: every sum over an
    example's tokens is the same either way (`at_tokens` puts per-token values back).
    """

    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    losses: Tensor  # [batch], the loss that was back-propagated, per example
    n_tokens: int  # non-padding tokens in the batch
    unprojected: Capture | None = None
    positions: dict[str, Tensor] = field(default_factory=dict)
    width: int = 0  # tokens per example of the batch (its padded length)

    def at_tokens(self, name: str, values: Tensor) -> Tensor:
        """Per-token `values [.., batch, tokens_l]` of module `name` at the batch's positions,
        `[.., batch, width]` (zero at the tokens a packed module did not see)."""
        positions = self.positions.get(name)
        if positions is None:
            return values
        zeros = values.new_zeros(*values.shape[:-1], self.width)
        return zeros.scatter_add_(-1, positions.expand_as(values), values)

    def sketches(self) -> dict[str, Tensor]:
        """`S = sum_t g_t a_t^T` per module: `[batch, r_out, r_in]`."""
        return {name: self.sketches_of(name) for name in self.activations}

    def sketches_of(self, name: str) -> Tensor:
        """`S = sum_t g_t a_t^T` of one module: `[batch, r_out, r_in]`."""
        return torch.einsum("bto,bti->boi", self.gradients[name], self.activations[name])


@dataclass
class _Tensors:
    """What the hooks of one pass collect, per module name."""

    activations: dict[str, Tensor] = field(default_factory=dict)
    gradients: dict[str, Tensor] = field(default_factory=dict)


def _project(x: Tensor, matrix: Tensor | None) -> Tensor:
    return x if matrix is None else x @ matrix.T


def _project_inputs(a: Tensor, R: Tensor | None, has_bias: bool) -> Tensor:
    """`R [a; 1]` for inputs `a [.., d]`, without materialising `[a; 1]`."""
    if R is None:
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if has_bias else a
    if has_bias:
        return torch.addmm(R[:, -1], a.reshape(-1, a.shape[-1]), R[:, :-1].T).view(
            *a.shape[:-1], -1
        )
    return a @ R.T


class _Recorder:
    """Records one pass's tokens per tracked module, projected (and, when asked, not): inputs
    `a` as the forward reaches a module, output gradients `g` as the backward does, `[batch,
    tokens, d]` (inputs zero at padding), or packed for a module that sees some tokens only
    (see `Capture`)."""

    def __init__(
        self,
        sketcher: GradientSketcher,
        mask: Tensor,
        projected: _Tensors,
        unprojected: _Tensors | None,
    ):
        self.sketcher = sketcher
        self.mask = mask
        self.keep = mask.reshape(-1, 1).to(torch.float32)  # [batch * tokens, 1]
        self.projected = projected
        self.unprojected = unprojected
        self.positions: dict[str, Tensor] = {}

    def module_hook(self, name: str) -> Callable:
        """A forward hook for a module that sees every token (a router's first output is its
        logits)."""

        def hook(_module: nn.Module, inputs: tuple, output: Tensor | tuple) -> None:
            self.record(name, inputs[0], output[0] if isinstance(output, tuple) else output)

        return hook

    def record(self, name: str, a: Tensor, y: Tensor, rows: Tensor | None = None) -> None:
        """Module `name`'s inputs `a [.., d_in]` now and the gradient at its outputs `y [..,
        d_out]` in the backward: of every token (`rows` None) or of the flat token positions
        `rows [n]` only (ascending)."""
        projection = self.sketcher.projections[name]
        has_bias = module_shape(self.sketcher.modules[name]).has_bias
        place = self._aligned if rows is None else self._packing(name, rows)
        a = a.detach().float().reshape(-1, a.shape[-1])
        keep = self.keep if rows is None else self.keep[rows]  # padding: no input, nor bias 1
        # The sketch's own products stay float32 under the forward's autocast.
        with torch.autocast(a.device.type, enabled=False):
            projected = _project_inputs(a, projection.R, has_bias) * keep
            self.projected.activations[name] = place(projected)
            if self.unprojected is not None:
                unprojected = _project_inputs(a, None, has_bias) * keep
                self.unprojected.activations[name] = place(unprojected)

        def grad_hook(g: Tensor) -> None:
            g = g.detach().float().reshape(-1, g.shape[-1])
            self.projected.gradients[name] = place(_project(g, projection.P))
            if self.unprojected is not None:
                self.unprojected.gradients[name] = place(g)

        y.register_hook(grad_hook)

    def capture(self, losses: Tensor, n_tokens: int) -> Capture:
        """What the pass recorded (once its backward is done)."""
        self._fill_unseen()

        def of(tensors: _Tensors, unprojected: Capture | None = None) -> Capture:
            a, g, width = tensors.activations, tensors.gradients, self.mask.shape[1]
            return Capture(a, g, losses, n_tokens, unprojected, self.positions, width)

        return of(self.projected, None if self.unprojected is None else of(self.unprojected))

    def _fill_unseen(self) -> None:
        """No tokens for the modules the pass never reached (experts nothing was routed to)."""
        for name, module in self.sketcher.modules.items():
            shape, projection = module_shape(module), self.sketcher.projections[name]
            d_in = shape.d_in if projection.R is None else projection.R.shape[0]
            d_out = shape.d_out if projection.P is None else projection.P.shape[0]
            self._empty(self.projected, name, d_in, d_out)
            if self.unprojected is not None:
                self._empty(self.unprojected, name, shape.d_in, shape.d_out)

    def _empty(self, tensors: _Tensors, name: str, d_in: int, d_out: int) -> None:
        batch = self.mask.shape[0]
        for found, d in ((tensors.activations, d_in), (tensors.gradients, d_out)):
            if name not in found:
                found[name] = self.keep.new_zeros(batch, 0, d)
                self.positions[name] = self.mask.new_zeros(batch, 0, dtype=torch.long)

    def _aligned(self, x: Tensor) -> Tensor:
        """`x [batch * tokens, d]` -> `[batch, tokens, d]`."""
        return x.reshape(*self.mask.shape, -1)

    def _packing(self, name: str, rows: Tensor) -> Callable[[Tensor], Tensor]:
        """Packs `x [n, d]` at the flat positions `rows [n]` (ascending) into `[batch,
        tokens_l, d]`; records their positions."""
        batch, tokens = self.mask.shape
        example = rows // tokens
        counts = torch.bincount(example, minlength=batch)
        slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[example]
        width = int(counts.max())
        self.positions[name] = rows.new_zeros(batch, width).index_put_(
            (example, slot), rows % tokens
        )

        def place(x: Tensor) -> Tensor:
            return x.new_zeros(batch, width, x.shape[-1]).index_put_((example, slot), x)

        return place


class GradientSketcher:
    """Runs forward/backward passes with hooks on the tracked modules (and fused experts run
    with `indexer.experts.traced_forward`).

    Parameters never get gradients: only activation gradients flow, which is all a sketch needs.
    """

    def __init__(
        self, model: nn.Module, modules: dict[str, Tracked], projections: dict[str, Projection]
    ):
        self.model = model
        self.modules = modules
        self.projections = projections
        self.device = next(model.parameters()).device

    @contextmanager
    def _hooks(self, recorder: _Recorder) -> Iterator[None]:
        handles = [
            self.model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, out: out.requires_grad_(True)
            )
        ]
        experts = {n: m for n, m in self.modules.items() if isinstance(m, ExpertMatrix)}
        for name, module in self.modules.items():
            if name not in experts:
                handles.append(module.register_forward_hook(recorder.module_hook(name)))
        try:
            with traced_experts(experts, recorder.record):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def run(
        self,
        batch: TokenBatch,
        labels: LabelMode = "data",
        *,
        keep_unprojected: bool = False,
        autocast: Autocast = Autocast.OFF,
    ) -> Capture:
        """One forward and one backward of the summed per-example loss; `keep_unprojected`
        also keeps the unprojected activations and output gradients (`Capture.unprojected`).
        `autocast` runs the model's forward (and so its backward) in bfloat16 where torch's
        autocast does; what the hooks capture is float32 either way."""
        projected = _Tensors()
        unprojected = _Tensors() if keep_unprojected else None
        input_ids = batch.input_ids.to(self.device)
        attention_mask = batch.attention_mask.to(self.device)
        dtype = AUTOCAST_DTYPES.get(autocast)
        recorder = _Recorder(self, attention_mask, projected, unprojected)
        with self._hooks(recorder), torch.enable_grad():
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = batch.targets.to(self.device)
            if labels == "sampled":
                targets = sample_targets(logits, batch)
            losses = summed_nll(logits, targets)
            losses.sum().backward()
        return recorder.capture(losses.detach(), int(batch.attention_mask.sum()))
