"""Gradient sketches from forward/backward hooks: `S = sum_t (P g_t)(R a_t)^T` per module.

No per-example weight gradient is ever materialised (unless P and R are the identity, which is
exactly what the exact reference scorer asks for). The same code serves the build and queries.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indexer.config import Autocast
from indexer.hashing import int63
from indexer.model import module_shape

IGNORE = -100
LabelMode = Literal["data", "sampled"]
AUTOCAST_DTYPES = {Autocast.BF16: torch.bfloat16}  # Autocast.OFF: float32, no autocast


@dataclass(frozen=True)
class Projection:
    """Gaussian `P [r_out, d_out]` and `R [r_in, d_in]`; None stands for the identity."""

    P: Tensor | None
    R: Tensor | None


def gaussian_projection(
    name: str, module: nn.Module, rank_in: int, rank_out: int, seed: int
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
    """

    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]
    losses: Tensor  # [batch], the loss that was back-propagated, per example
    n_tokens: int  # non-padding tokens in the batch
    unprojected: Capture | None = None

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
    """`R [a; 1]` for inputs `a [batch, tokens, d]`, without materialising `[a; 1]`."""
    if R is None:
        return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if has_bias else a
    if has_bias:
        return torch.addmm(R[:, -1], a.reshape(-1, a.shape[-1]), R[:, :-1].T).view(
            *a.shape[:-1], -1
        )
    return a @ R.T


class GradientSketcher:
    """Runs forward/backward passes with hooks on the tracked modules.

    Parameters never get gradients: only activation gradients flow, which is all a sketch needs.
    """

    def __init__(
        self, model: nn.Module, modules: dict[str, nn.Module], projections: dict[str, Projection]
    ):
        self.model = model
        self.modules = modules
        self.projections = projections
        self.device = next(model.parameters()).device

    @contextmanager
    def _hooks(self, mask: Tensor, projected: _Tensors, unprojected: _Tensors | None):
        handles = [
            self.model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, out: out.requires_grad_(True)
            )
        ]
        token_mask = mask.unsqueeze(-1).to(torch.float32)
        for name, module in self.modules.items():
            handles.append(
                module.register_forward_hook(
                    self._forward_hook(name, token_mask, projected, unprojected)
                )
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(
        self, name: str, token_mask: Tensor, projected: _Tensors, unprojected: _Tensors | None
    ) -> Callable:
        projection = self.projections[name]
        has_bias = module_shape(self.modules[name]).has_bias

        def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
            a = inputs[0].detach().float()
            # The sketch's own products stay float32 under the forward's autocast.
            with torch.autocast(a.device.type, enabled=False):
                projected.activations[name] = (
                    _project_inputs(a, projection.R, has_bias) * token_mask
                )
                if unprojected is not None:
                    unprojected.activations[name] = _project_inputs(a, None, has_bias) * token_mask

            def grad_hook(g: Tensor) -> None:
                g = g.detach().float()
                projected.gradients[name] = _project(g, projection.P)
                if unprojected is not None:
                    unprojected.gradients[name] = g

            output.register_hook(grad_hook)

        return hook

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
        with self._hooks(attention_mask, projected, unprojected), torch.enable_grad():
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = batch.targets.to(self.device)
            if labels == "sampled":
                targets = sample_targets(logits, batch)
            losses = summed_nll(logits, targets)
            losses.sum().backward()
        losses, n_tokens = losses.detach(), int(batch.attention_mask.sum())
        return Capture(
            projected.activations,
            projected.gradients,
            losses,
            n_tokens,
            None
            if unprojected is None
            else Capture(unprojected.activations, unprojected.gradients, losses, n_tokens),
        )
