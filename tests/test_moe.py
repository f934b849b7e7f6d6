"""Mixture-of-experts weights tracked per expert: every expert's sketch, and its full gradient,
equal what plain autograd gives for that expert's slice of the fused parameter; the router is
tracked as the linear map it is; EK-FAC over experts matches the dense solve."""

from __future__ import annotations

import pytest
import torch

from indexer.curvature import Curvature, ModuleCurvature, fit_curvature
from indexer.errors import InvalidInputError
from indexer.experts import ExpertMatrix
from indexer.model import coverage, tracked_modules
from indexer.passes import ExamplePass
from indexer.query import Query, TokenizedQuery, query_vectors
from indexer.sketch import GradientSketcher, Projection, gaussian_projection, make_batch
from tests.test_curvature import SEED, dense_check, examples_from
from tests.test_sketch import autograd_gradients
from tests.tiny import MOE_ARCHITECTURES, random_sequences, tiny_causal_lm


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
def test_expert_and_router_sketches_equal_autograd_gradients(architecture: str) -> None:
    """Projected and unprojected, with padding: each expert's `Σ_t g_t a_tᵀ` over the tokens
    routed to it is autograd's gradient of the example's loss wrt its slice."""
    model = tiny_causal_lm(architecture, width=16)
    modules = tracked_modules(model)
    assert {type(m) for m in modules.values()} >= {ExpertMatrix}
    assert any(n.endswith(("mlp.gate", "mlp.router")) for n in modules)  # the router
    projections = {n: gaussian_projection(n, m, 4, 3, seed=7) for n, m in modules.items()}
    sequences = random_sequences([9, 5, 12])
    batch = make_batch(sequences, [1, 1, 1], pad_id=0, sample_seeds=[0, 1, 2])
    capture = GradientSketcher(model, modules, projections).run(batch, keep_unprojected=True)
    for b, tokens in enumerate(sequences):
        expected = autograd_gradients(model, tokens)
        for name, P, R in ((n, p.P, p.R) for n, p in projections.items()):
            full = capture.unprojected.sketches_of(name)[b]
            torch.testing.assert_close(full, expected[name], rtol=1e-4, atol=1e-5)
            projected = capture.sketches_of(name)[b]
            torch.testing.assert_close(projected, P @ expected[name] @ R.T, rtol=1e-4, atol=1e-5)


def test_an_expert_no_token_reaches_has_a_zero_gradient() -> None:
    model = tiny_causal_lm("mixtral", width=16)
    _route_to_experts_0_and_1(model.model.layers[0].mlp.gate)
    modules = tracked_modules(model)
    identity = {n: Projection(None, None) for n in modules}
    tokens = random_sequences([6])[0]
    batch = make_batch([tokens], [1], pad_id=0, sample_seeds=[0])
    sketches = GradientSketcher(model, modules, identity).run(batch).sketches()
    expected = autograd_gradients(model, tokens)
    for e in range(4):
        for parameter in ("gate_up_proj", "down_proj"):
            name = f"model.layers.0.mlp.experts.{parameter}.{e}"
            assert (sketches[name].abs().max() > 0) == (e < 2)
            torch.testing.assert_close(sketches[name][0], expected[name], rtol=1e-4, atol=1e-5)


def test_an_expert_no_fitted_token_reaches_is_damped_not_divided_by_zero() -> None:
    """Its Λ is 0, so was its damping (0.1 · mean Λ): every example's vector was NaN, those
    of examples that never reach the expert too."""
    model = tiny_causal_lm("mixtral", width=8)
    for layer in model.model.layers:
        _route_to_experts_0_and_1(layer.mlp.gate)
    examples = examples_from(random_sequences([9, 6, 12, 4, 10, 7], seed=1))
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 3, 4, seed=5) for n, m in modules.items()}
    example_pass = ExamplePass(
        GradientSketcher(model, modules, projections), examples, 0, 3, seed=SEED, progress=False
    )
    curvature = fit_curvature(example_pass, list(range(len(examples))), damping=0.1).sketch
    dead = curvature.modules["model.layers.0.mlp.experts.down_proj.3"]
    live = curvature.modules["model.layers.0.mlp.experts.down_proj.0"]
    average = sum(m.eigvals.mean().item() for m in curvature.modules.values())
    average /= len(curvature.modules)
    assert dead.eigvals.abs().max() == 0
    assert dead.damping == pytest.approx(0.1 * average)
    assert live.damping == pytest.approx(0.1 * live.eigvals.mean().item())
    for _, capture in example_pass.run(list(range(len(examples))), "data", "vectors"):
        assert torch.isfinite(curvature.vectors(capture)).all()


def _route_to_experts_0_and_1(router: torch.nn.Module) -> None:
    def hook(_module, _inputs, output):
        logits, weights, indices = output
        return logits, weights, torch.arange(2).expand_as(indices)

    router.register_forward_hook(hook)


def test_coverage_counts_experts_and_names_what_is_skipped() -> None:
    model = tiny_causal_lm("mixtral", width=16)
    full = coverage(model, tracked_modules(model))
    assert full.share > 0.95
    assert full.skipped == (
        "model.layers.*.input_layernorm.weight",
        "model.layers.*.post_attention_layernorm.weight",
    )
    attention = coverage(model, tracked_modules(model, r"self_attn"))
    assert attention.share < 0.5 and "model.layers.*.mlp.experts.down_proj" in attention.skipped
    some = tracked_modules(model, r"experts\.\w+\.[01]$")  # two of the four experts
    assert len(some) == 2 * 2 * 2
    assert "model.layers.*.mlp.experts.gate_up_proj" in coverage(model, some).skipped
    with pytest.raises(InvalidInputError, match="no Linear/Conv1D modules, routers or experts"):
        tracked_modules(model, "nothing-matches")


def test_ekfac_over_experts_matches_the_dense_solve() -> None:
    """Sketch-space EK-FAC of a tiny Mixtral, checked as the dense path is
    (`tests.test_curvature.dense_check`)."""
    model = tiny_causal_lm("mixtral", width=8)
    examples = examples_from(random_sequences([9, 6, 12, 4, 10, 7, 11, 5], seed=1))
    query = TokenizedQuery(Query("", ""), random_sequences([8], seed=2)[0], loss_start=5)
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 3, 4, seed=5) for n, m in modules.items()}
    sketcher = GradientSketcher(model, modules, projections)
    example_pass = ExamplePass(sketcher, examples, 0, batch_size=3, seed=SEED, progress=False)
    rows = list(range(len(examples)))
    curvature = fit_curvature(example_pass, rows, damping=0.1).sketch
    q = query_vectors(sketcher, curvature, [query], 0)[0]
    scores = torch.zeros(len(examples))
    for batch, capture in example_pass.run(rows, "data", "score"):
        scores[batch] = curvature.vectors(capture) @ q
    dense_check(model, curvature, examples, query, scores)


def test_token_scores_of_packed_experts_sit_at_their_tokens() -> None:
    """Experts hold only their routed tokens, packed; per-token influence puts them back at
    their positions: each example's tokens sum to its score, padding scores nothing."""
    model = tiny_causal_lm("olmoe", width=16)
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 4, 3, seed=7) for n, m in modules.items()}
    sketcher = GradientSketcher(model, modules, projections)
    lengths = [9, 5, 12]
    batch = make_batch(random_sequences(lengths), [1, 1, 1], pad_id=0, sample_seeds=[0, 1, 2])
    capture = sketcher.run(batch)
    expert = "model.layers.1.mlp.experts.down_proj.2"
    assert capture.activations[expert].shape[1] < max(lengths)  # packed: fewer than all
    curvature = Curvature(
        {
            n: ModuleCurvature(p, torch.eye(4), torch.eye(3), torch.rand(3, 4), 0.1)
            for n, p in projections.items()
        }
    )
    folded = curvature.fold(torch.randn(2, curvature.dim))
    tokens = curvature.token_scores(capture, folded)
    assert tokens.shape == (2, 3, max(lengths))
    torch.testing.assert_close(tokens.sum(-1), curvature.example_scores(capture, folded))
    assert tokens[:, 1, 5:].abs().max() == 0
