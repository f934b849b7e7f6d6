"""Mixture-of-experts weights tracked as linear maps: each expert's slice of a fused expert
parameter, for the tokens routed to it, and the router.

Hugging Face stores an MoE block's experts as fused 3-D parameters (`gate_up_proj [experts,
2·inner, hidden]`, `down_proj [experts, hidden, inner]`; `[experts, d_in, d_out]` where the
experts module says `is_transposed`). Expert e's matrix is a linear map applied to the tokens
routed to e only, so its weight gradient is `Σ_t g_t a_tᵀ` over those tokens: the other tokens
contribute nothing. The routing weight multiplies the expert's output after the down
projection, so `g_t` (the gradient at the projection's output) already carries it.

While hooked (`traced_experts`), an experts module runs `traced_forward` instead of its own
forward: the same function of its inputs (the eager per-expert loop of transformers), with
each expert's two matrices applied as separate ops whose inputs and outputs are recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The fused parameters of an experts module, in the order its forward applies them.
FUSED_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
# What `transformers.integrations.use_experts_implementation` gives an experts module: the
# attributes `traced_forward` reads to run it (and `_apply_gate`, or without a gate `act_fn`).
_EXPERTS_ATTRIBUTES = ("num_experts", "has_gate", "has_bias", "is_transposed")

# `record(name, a [n, d_in], y [n, d_out], rows [n])`: the inputs of expert matrix `name` at
# the flat token positions `rows`, and its outputs (whose gradient is recorded later).
Record = Callable[[str, Tensor, Tensor, Tensor], None]


@dataclass(eq=False)
class ExpertMatrix:
    """Expert `index`'s matrix of `experts.<parameter>`, as a linear map `[d_out, d_in]`."""

    experts: nn.Module
    parameter: str
    index: int

    @property
    def weight(self) -> Tensor:
        """`[d_out, d_in]`: a view of the fused parameter's slice."""
        matrix = getattr(self.experts, self.parameter)[self.index]
        return matrix.T if self.experts.is_transposed else matrix

    @property
    def bias(self) -> Tensor | None:
        """`[d_out]`, or None."""
        if not self.experts.has_bias:
            return None
        return getattr(self.experts, f"{self.parameter}_bias")[self.index]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is an experts module whose fused weights `traced_forward` can run."""
    fused = [p for p in FUSED_PARAMETERS if isinstance(getattr(module, p, None), nn.Parameter)]
    if not all(hasattr(module, a) for a in _EXPERTS_ATTRIBUTES):
        return False
    activation = "_apply_gate" if module.has_gate else "act_fn"
    return hasattr(module, activation) and "down_proj" in fused and len(fused) == 2


def expert_matrices(name: str, experts: nn.Module) -> dict[str, ExpertMatrix]:
    """Every expert's matrices of a fused experts module `name`, by `<name>.<parameter>.<e>`."""
    parameters = [p for p in FUSED_PARAMETERS if hasattr(experts, p)]
    return {
        f"{name}.{parameter}.{e}": ExpertMatrix(experts, parameter, e)
        for parameter in parameters
        for e in range(experts.num_experts)
    }


def is_router(module: nn.Module, experts: nn.Module) -> bool:
    """Whether `module` (a sibling of fused `experts`) is their router: a linear map `weight
    [experts, hidden]` (and maybe a bias), whose forward's first output is the logits."""
    weight = getattr(module, "weight", None)
    own = dict(module.named_parameters(recurse=False))
    return (
        not isinstance(module, nn.Linear)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[0] == experts.num_experts
        and set(own) <= {"weight", "bias"}
    )


def traced_forward(
    experts: nn.Module, names: Mapping[tuple[str, int], str], record: Record
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The eager forward of `experts` that records the matrices named in `names` (by
    `(parameter, expert)`): hidden states `[tokens, hidden]`, routing `top_k_index [tokens, k]`
    and `top_k_weights [tokens, k]` -> `[tokens, hidden]`."""
    first, down = [p for p in FUSED_PARAMETERS if hasattr(experts, p)]

    def apply(parameter: str, e: int, x: Tensor, rows: Tensor) -> Tensor:
        matrix = ExpertMatrix(experts, parameter, e)
        y = F.linear(x, matrix.weight, matrix.bias)
        name = names.get((parameter, e))
        if name is not None:
            record(name, x, y, rows)
        return y

    def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < experts.num_experts:
                continue  # expert-parallel sentinels
            rows, slot = torch.where(top_k_index == e)
            h = apply(first, e, hidden_states[rows], rows)
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            y = apply(down, e, h, rows)
            if getattr(experts, "has_post_expert_norm", False):
                y = experts.post_expert_norm(y)
            out.index_add_(0, rows, (y * top_k_weights[rows, slot, None]).to(out.dtype))
        return out

    return forward


@contextmanager
def traced_experts(matrices: Mapping[str, ExpertMatrix], record: Record) -> Iterator[None]:
    """Run every experts module that holds one of `matrices` with `traced_forward`, recording
    those matrices; their own forward again afterwards."""
    names: dict[nn.Module, dict[tuple[str, int], str]] = {}
    for name, m in matrices.items():
        names.setdefault(m.experts, {})[(m.parameter, m.index)] = name
    for experts, named in names.items():
        experts.forward = traced_forward(experts, named, record)
    try:
        yield
    finally:
        for experts in names:
            del experts.forward
