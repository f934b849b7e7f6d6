"""A budget of dimensions per example: its allocation across modules, and builds that use it."""

from __future__ import annotations

import pytest

from indexer.budget import ModuleRanks, describe, layout_ranks, module_ranks, total_dim
from indexer.config import DEFAULT_DIMS, AllocationRule, SketchConfig
from indexer.engine import QueryEngine
from indexer.errors import InvalidInputError
from indexer.model import ModuleShape
from indexer.publish import verify_version, version_dir
from server.cli import main


def gpt2_shapes(layers: int, width: int) -> dict[str, ModuleShape]:
    """The tracked modules of a GPT-2 block stack (d_in counts the bias)."""
    per_block = {
        "attn.c_attn": (width + 1, 3 * width),
        "attn.c_proj": (width + 1, width),
        "mlp.c_fc": (width + 1, 4 * width),
        "mlp.c_proj": (4 * width + 1, width),
    }
    return {
        f"h.{layer}.{name}": ModuleShape(d_in, d_out, True)
        for layer in range(layers)
        for name, (d_in, d_out) in per_block.items()
    }


SHAPES = [gpt2_shapes(3, 128), gpt2_shapes(12, 768), gpt2_shapes(2, 32)]


@pytest.mark.parametrize("rule", list(AllocationRule))
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dims", [48, 1000, 8000, 24_000])
def test_an_allocation_fits_the_budget_and_the_modules(rule, shapes, dims):
    sketch = SketchConfig(dims=dims, allocation=rule)
    smallest = min(s.d_out for s in shapes.values()) * min(s.d_in for s in shapes.values())
    if rule == AllocationRule.UNIFORM and dims > len(shapes) * smallest:  # the tiny model
        with pytest.raises(InvalidInputError, match="more than the 8 tracked modules can hold"):
            module_ranks(shapes, sketch)
        return
    ranks = module_ranks(shapes, sketch)
    assert list(ranks) == list(shapes)
    assert total_dim(ranks) <= dims
    if dims >= 1000:  # rounding to whole ranks costs a few percent, less at real budgets
        assert total_dim(ranks) >= 0.9 * dims
    for name, r in ranks.items():
        assert 1 <= r.rank_out <= shapes[name].d_out and 1 <= r.rank_in <= shapes[name].d_in
    assert module_ranks(shapes, sketch) == ranks  # deterministic


def test_uniform_is_the_same_everywhere_and_params_favours_big_modules():
    shapes = gpt2_shapes(12, 768)
    uniform = module_ranks(shapes, SketchConfig(dims=32_768, allocation="uniform"))
    assert set(uniform.values()) == {ModuleRanks(26, 26)}
    by_params = module_ranks(shapes, SketchConfig(dims=32_768))
    fc, proj = by_params["h.0.mlp.c_fc"], by_params["h.0.attn.c_proj"]
    assert 3.5 < fc.dim / proj.dim < 4.5  # 3072 x 769 parameters against 768 x 769
    assert all(abs(r.rank_out - r.rank_in) <= 1 for r in by_params.values())  # near-square
    assert describe(by_params) == (
        "h.*.attn.c_attn 26x26 (×12), h.*.attn.c_proj 15x15 (×12), "
        "h.*.mlp.c_fc 30x30 (×12), h.*.mlp.c_proj 30x30 (×12)"
    )


def test_every_module_keeps_a_dimension_and_a_full_budget_keeps_every_module_whole():
    shapes = {"small": ModuleShape(d_in=3, d_out=2, has_bias=False), **gpt2_shapes(1, 16)}
    assert module_ranks(shapes, SketchConfig(dims=100))["small"] == ModuleRanks(1, 1)
    capacity = sum(s.d_out * s.d_in for s in shapes.values())
    whole = module_ranks(shapes, SketchConfig(dims=capacity))
    assert whole == {name: ModuleRanks(s.d_out, s.d_in) for name, s in shapes.items()}


def test_the_default_budget_is_capped_by_what_the_modules_hold():
    assert total_dim(module_ranks(gpt2_shapes(12, 768), SketchConfig())) <= DEFAULT_DIMS
    tiny = gpt2_shapes(1, 8)
    capacity = sum(s.d_out * s.d_in for s in tiny.values())
    assert 0.9 * capacity <= total_dim(module_ranks(tiny, SketchConfig())) <= capacity


def test_explicit_ranks_override_the_budget():
    shapes = gpt2_shapes(2, 32)
    ranks = module_ranks(shapes, SketchConfig(rank_in=8, dims=10))  # --rank-out defaults to it
    assert set(ranks.values()) == {ModuleRanks(8, 8)}
    assert set(module_ranks(shapes, SketchConfig(4, 6)).values()) == {ModuleRanks(6, 4)}
    with pytest.raises(InvalidInputError, match="exceed module"):
        module_ranks(shapes, SketchConfig(rank_out=64))


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (0, "--dims must be positive"),
        (-5, "--dims must be positive"),
        (7, "--dims 7 is fewer than one per tracked module (8 modules)"),
        (10**7, "--dims 10000000 is more than the 8 tracked modules can hold"),
    ],
)
def test_a_bad_budget_names_the_problem(dims, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module_ranks(gpt2_shapes(2, 32), SketchConfig(dims=dims))


def build_command(model, corpus, root, *options: str) -> list[str]:
    return ["--quiet", "build", "--model", str(model), "--data", str(corpus), "--out", str(root),
            "--max-length", "64", "--lexical-index", "off", *options]  # fmt: skip


def test_a_build_records_its_allocation(tmp_path, tiny_model_dir, small_corpus_path, capsys):
    root = tmp_path / "root"
    command = build_command(tiny_model_dir, small_corpus_path, root, "--dims", "3000")
    assert main(command) == 0
    summary = capsys.readouterr().out
    manifest = verify_version(version_dir(root))
    ranks = layout_ranks(manifest.modules)
    assert manifest.dim == total_dim(ranks) <= 3000 and len(set(ranks.values())) > 1
    assert [m.stop - m.start for m in manifest.modules] == [r.dim for r in ranks.values()]
    assert f"dim {manifest.dim} ({describe(ranks)})" in summary
    engine = QueryEngine.open(root)
    assert engine.index.d == manifest.dim
    assert (engine.info.rank_out, engine.info.rank_in) == (0, 0)  # they differ by module
    engine.close()
    assert main(["info", "--index", str(root)]) == 0
    assert describe(ranks) in capsys.readouterr().out


@pytest.mark.parametrize("dims", ["0", "-3", "5", "99999999"])
def test_a_bad_dims_is_one_line_and_exit_2(
    tmp_path, tiny_model_dir, small_corpus_path, capsys, dims
):
    command = build_command(tiny_model_dir, small_corpus_path, tmp_path / "root", "--dims", dims)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dims ") and err.count("\n") == 1
