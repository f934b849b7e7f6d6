"""A budget of stored dimensions per example, allocated across the tracked modules.

Module l keeps an `r_out x r_in` sketch (`1 <= r_out <= d_out`, `1 <= r_in <= d_in`), so an
example's vector has `D = Σ_l r_out·r_in` dimensions: the budget, not the number of modules,
sets the bytes per example. Rules (`AllocationRule`):

- `uniform`: the same, most nearly square `r_out x r_in` in every module;
- `params`: module l's share of the budget ∝ its parameters `d_out·d_in` (at least one
  dimension each), as nearly square.

Square sketches measured better than sketches shaped like their module (`r_out:r_in` as
`d_out:d_in`), and shares by parameters better than by `sqrt(d_out·d_in)` or uniform ones
(benchmarks/RESULTS.md, issue 13).

Pure functions of the module shapes and the sketch settings: the same inputs always give the
same allocation, which the manifest records (`ModuleLayout.rank_out/rank_in`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from indexer.config import DEFAULT_DIMS, AllocationRule, SketchConfig
from indexer.errors import InvalidInputError
from indexer.manifest import ModuleLayout
from indexer.model import ModuleShape, layer_pattern

Shapes = Mapping[str, ModuleShape]  # tracked module name -> its gradient's shape


@dataclass(frozen=True)
class ModuleRanks:
    """One module's sketch shape: `r_out x r_in` coordinates of every stored vector."""

    rank_out: int
    rank_in: int

    @property
    def dim(self) -> int:
        return self.rank_out * self.rank_in

    def __str__(self) -> str:
        return f"{self.rank_out}x{self.rank_in}"


def module_ranks(shapes: Shapes, sketch: SketchConfig) -> dict[str, ModuleRanks]:
    """Each module's ranks: `sketch.rank_out x rank_in` everywhere when either is given (the
    other defaults to it), else `sketch.dims` (default: DEFAULT_DIMS, or all that the rule can
    hold when less) allocated by `sketch.allocation`. InvalidInputError names a bad option."""
    rank_out, rank_in = sketch.rank_out, sketch.rank_in
    if rank_out is not None or rank_in is not None:
        return _explicit(
            shapes,
            rank_in if rank_out is None else rank_out,
            rank_out if rank_in is None else rank_in,
        )
    allocate, capacity_of = _RULES[sketch.allocation]
    capacity = capacity_of(shapes)
    dims = min(DEFAULT_DIMS, capacity) if sketch.dims is None else sketch.dims
    _check_dims(dims, len(shapes), capacity, sketch.allocation)
    return allocate(shapes, dims)


def total_dim(ranks: Mapping[str, ModuleRanks]) -> int:
    """`D`: the stored dimensions per example."""
    return sum(r.dim for r in ranks.values())


def layout_ranks(layouts: Iterable[ModuleLayout]) -> dict[str, ModuleRanks]:
    """The allocation a manifest records."""
    return {m.name: ModuleRanks(m.rank_out, m.rank_in) for m in layouts}


def describe(ranks: Mapping[str, ModuleRanks]) -> str:
    """The allocation in a few words: `r_out x r_in` per module name with its layer index
    replaced by `*` (`h.*.mlp.c_fc 90x30 (×12)`), in first-seen order."""
    groups: dict[tuple[str, str], int] = {}
    for name, r in ranks.items():
        key = (layer_pattern(name), str(r))
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(
        f"{name} {r}" + (f" (×{count})" if count > 1 else "") for (name, r), count in groups.items()
    )


def _explicit(shapes: Shapes, rank_out: int, rank_in: int) -> dict[str, ModuleRanks]:
    if min(rank_out, rank_in) < 1:
        raise InvalidInputError("--rank-in and --rank-out must be at least 1")
    for name, shape in shapes.items():
        if rank_in > shape.d_in or rank_out > shape.d_out:
            raise InvalidInputError(
                f"ranks {rank_out}x{rank_in} (out x in) exceed module {name} "
                f"({shape.d_out}x{shape.d_in}); lower --rank-out/--rank-in"
            )
    return {name: ModuleRanks(rank_out, rank_in) for name in shapes}


def _check_dims(dims: int, n_modules: int, capacity: int, rule: AllocationRule) -> None:
    if dims < 1:
        raise InvalidInputError(f"--dims must be positive, got {dims}")
    if dims < n_modules:
        raise InvalidInputError(
            f"--dims {dims} is fewer than one per tracked module ({n_modules} modules)"
        )
    if dims > capacity:
        raise InvalidInputError(
            f"--dims {dims} is more than the {n_modules} tracked modules can hold with "
            f"--allocation {rule} ({capacity}); lower --dims"
        )


def _uniform(shapes: Shapes, dims: int) -> dict[str, ModuleRanks]:
    """The most nearly square ranks within `dims / modules` that every module can hold."""
    cap_out = min(s.d_out for s in shapes.values())
    cap_in = min(s.d_in for s in shapes.values())
    ranks = _near_square(dims / len(shapes), cap_out, cap_in)
    return {name: ranks for name in shapes}


def _uniform_capacity(shapes: Shapes) -> int:
    cap_out = min(s.d_out for s in shapes.values())
    return len(shapes) * cap_out * min(s.d_in for s in shapes.values())


def _by_parameters(shapes: Shapes, dims: int) -> dict[str, ModuleRanks]:
    """Shares ∝ `d_out·d_in`, the module's parameters (and the most it can hold)."""
    sizes = {name: s.d_out * s.d_in for name, s in shapes.items()}
    targets = _shares(sizes, dims)
    return {name: _near_square(targets[name], s.d_out, s.d_in) for name, s in shapes.items()}


def _full_capacity(shapes: Shapes) -> int:
    return sum(s.d_out * s.d_in for s in shapes.values())


def _shares(sizes: Mapping[str, int], total: int) -> dict[str, float]:
    """Targets `t_l = max(c·size_l, 1)` with the largest `c <= 1` such that `Σ t_l <= total`:
    proportional, but at least one dimension each (bisection: the sum grows with c). Needs
    `len(sizes) <= total <= Σ sizes`."""

    def targets(c: float) -> dict[str, float]:
        return {name: max(c * size, 1.0) for name, size in sizes.items()}

    low, high = 0.0, 1.0
    if sum(targets(high).values()) <= total:
        return targets(high)  # every module whole
    for _ in range(60):  # halves the interval to far below one dimension
        middle = (low + high) / 2
        low, high = (middle, high) if sum(targets(middle).values()) <= total else (low, middle)
    return targets(low)


def _near_square(target: float, cap_out: int, cap_in: int) -> ModuleRanks:
    """`r_out x r_in <= target` (each >= 1), as nearly square as the caps allow: a side held
    by its cap leaves the rest of the target to the other."""
    rank_out = _clamp(round(math.sqrt(target)), cap_out)
    rank_in = _clamp(math.floor(target / rank_out), cap_in)
    return ModuleRanks(_clamp(math.floor(target / rank_in), cap_out), rank_in)


def _clamp(value: int, cap: int) -> int:
    return min(max(value, 1), cap)


# Per rule: the allocation of a budget, and the most dimensions it can allocate.
_RULES: dict[AllocationRule, tuple[Callable[[Shapes, int], dict[str, ModuleRanks]], Callable]] = {
    AllocationRule.UNIFORM: (_uniform, _uniform_capacity),
    AllocationRule.PARAMS: (_by_parameters, _full_capacity),
}
