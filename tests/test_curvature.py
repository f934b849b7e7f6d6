"""EK-FAC preconditioning against dense computations from plain autograd on a tiny model.

For every module the test builds, from per-example autograd gradients, the dense Fisher
`F = E_n[vec(S̃_n) vec(S̃_n)ᵀ]` (labels sampled from the model) and checks that
1. the eigenvalue correction Λ is exactly `diag(Qᵀ F Q)` with `Q = U_B ⊗ U_A`, and
2. every score `⟨q, v_n⟩` equals `vec(S_q)ᵀ (Q diag(Λ) Qᵀ + λI)⁻¹ vec(S_n)` from a dense solve.
It does so in sketch space (the build's path) and with P = R = I (the exact reference scorer).
The per-token contraction with folded queries (re-ranking, token attribution) and the exact
norms are checked against the same dense formula, with random factors.
"""

from __future__ import annotations

import pytest
import torch

from indexer.config import CurvatureConfig
from indexer.corpus import Example
from indexer.curvature import Curvature, ModuleCurvature, fit_curvature
from indexer.exact import ExactConfig, ExactScorer
from indexer.hashing import int63
from indexer.model import LoadedModel, tracked_modules
from indexer.passes import ExamplePass
from indexer.query import Query, TokenizedQuery, query_vectors
from indexer.sketch import (
    Capture,
    GradientSketcher,
    Projection,
    gaussian_projection,
    make_batch,
    sample_targets,
)
from tests.test_sketch import autograd_gradients
from tests.tiny import random_sequences, tiny_gpt2

SEED = 3


def examples_from(sequences: list[list[int]]) -> list[Example]:
    return [Example(100 + i, f"d{i}", 0, s, "", "test") for i, s in enumerate(sequences)]


def sampled_gradients(model, example: Example) -> dict[str, torch.Tensor]:
    """Autograd weight gradients of one example's loss under labels sampled from the model."""
    batch = make_batch([example.token_ids], [1], 0, [int63(SEED, example.example_id)])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return autograd_gradients(model, example.token_ids, targets=sample_targets(logits, batch))


def dense_check(model, curvature: Curvature, examples, query: TokenizedQuery, scores) -> None:
    assert set(curvature.modules) == set(tracked_modules(model))
    sampled = [sampled_gradients(model, ex) for ex in examples]
    data = [autograd_gradients(model, ex.token_ids) for ex in examples]
    query_grads = autograd_gradients(model, query.token_ids, loss_start=query.loss_start)
    expected = torch.zeros(len(examples), dtype=torch.float64)
    for name, m in curvature.modules.items():
        P, R = m.projection.P, m.projection.R

        def project(g, P=P, R=R):
            return (g if P is None else P @ g @ R.T).flatten().double()

        sampled_sketches = torch.stack([project(g[name]) for g in sampled])
        fisher = sampled_sketches.T @ sampled_sketches / len(examples)
        Q = torch.kron(m.eigvecs_b, m.eigvecs_a).double()
        torch.testing.assert_close(
            m.eigvals.double().flatten(), torch.diagonal(Q.T @ fisher @ Q), rtol=1e-3, atol=1e-7
        )
        ekfac = Q @ torch.diag(m.eigvals.double().flatten()) @ Q.T
        damped = ekfac + m.damping * torch.eye(len(ekfac), dtype=torch.float64)
        solved = torch.linalg.solve(damped, project(query_grads[name]))
        expected += torch.stack([project(g[name]) for g in data]) @ solved
    torch.testing.assert_close(
        torch.as_tensor(scores, dtype=torch.float64), expected, rtol=2e-3, atol=1e-5
    )


@pytest.fixture(scope="module")
def setting():
    model = tiny_gpt2(n_embd=8)
    sequences = random_sequences([9, 6, 12, 4, 10, 7, 11, 5], seed=1)
    query = TokenizedQuery(Query("", ""), random_sequences([8], seed=2)[0], loss_start=5)
    return model, examples_from(sequences), query


def test_sketch_space_preconditioning_matches_dense_solve(setting):
    model, examples, query = setting
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 3, 4, seed=5) for n, m in modules.items()}
    sketcher = GradientSketcher(model, modules, projections)
    example_pass = ExamplePass(sketcher, examples, 0, batch_size=3, seed=SEED, progress=False)
    curvature = fit_curvature(example_pass, list(range(len(examples))), damping=0.1).sketch
    q = query_vectors(sketcher, curvature, [query], 0)[0]
    scores = torch.zeros(len(examples))
    for rows, capture in example_pass.run(list(range(len(examples))), "data", "score"):
        scores[rows] = curvature.vectors(capture) @ q
    dense_check(model, curvature, examples, query, scores)


def test_full_factors_fitted_beside_the_sketch_match_dense_solve(setting):
    model, examples, query = setting
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 3, 4, seed=5) for n, m in modules.items()}
    sketcher = GradientSketcher(model, modules, projections)
    example_pass = ExamplePass(sketcher, examples, 0, batch_size=3, seed=SEED, progress=False)
    rows = list(range(len(examples)))
    full = fit_curvature(example_pass, rows, damping=0.1, unprojected=True).unprojected
    identity = GradientSketcher(model, modules, full.projections())
    q = query_vectors(identity, full, [query], 0)[0]
    scores = torch.zeros(len(examples))
    for batch, capture in example_pass.run(rows, "data", "s", keep_unprojected=True):
        scores[batch] = full.vectors(capture.unprojected) @ q
    dense_check(model, full, examples, query, scores)


def test_exact_scorer_matches_brute_force(setting):
    model, examples, query = setting
    loaded = LoadedModel(model, tokenizer=_PadOnly(), model_dir=None, weights_sha256="",
                         tokenizer_sha256="", context_length=32, config_sha256="")  # fmt: skip
    config = ExactConfig(curvature=CurvatureConfig(damping=0.1, seed=SEED), batch_size=3)
    scorer = ExactScorer(loaded, examples, config)
    scores = scorer.score([query])[0]
    assert all(m.projection == Projection(None, None) for m in scorer.curvature.modules.values())
    dense_check(model, scorer.curvature, examples, query, scores)


class _PadOnly:
    pad_token_id = 0


def random_module(d_out: int, d_in: int, generator: torch.Generator) -> ModuleCurvature:
    """Unprojected factors with random orthonormal eigenbases and positive eigenvalues."""
    eigvecs_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator)).Q
    eigvecs_b = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator)).Q
    eigvals = torch.rand(d_out, d_in, generator=generator) + 0.05
    return ModuleCurvature(Projection(None, None), eigvecs_a, eigvecs_b, eigvals, damping=0.1)


def dense_inverse(module: ModuleCurvature) -> torch.Tensor:
    """`(Q diag(Λ) Qᵀ + λI)⁻¹` `[d, d]` (float64), `Q = U_B ⊗ U_A`, `d = d_out * d_in`."""
    Q = torch.kron(module.eigvecs_b, module.eigvecs_a).double()
    ekfac = Q @ torch.diag(module.eigvals.double().flatten()) @ Q.T
    return torch.linalg.inv(ekfac + module.damping * torch.eye(len(Q), dtype=torch.float64))


def random_capture(shapes: dict, batch: int, tokens: int, generator: torch.Generator) -> Capture:
    """Tokens `g [batch, tokens, d_out]`, `a [batch, tokens, d_in]` per module."""
    gradients = {
        n: torch.randn(batch, tokens, o, generator=generator) for n, (o, _) in shapes.items()
    }
    activations = {
        n: torch.randn(batch, tokens, i, generator=generator) for n, (_, i) in shapes.items()
    }
    return Capture(activations, gradients, torch.zeros(batch), batch * tokens)


def test_token_contraction_and_exact_norms_match_dense_solve():
    """Token t of example n contributes `Σ_l vec(G_q,l)ᵀ (H_l + λ)⁻¹ vec(g_t a_tᵀ)`, its tokens
    sum to `⟨q, v_n⟩` (as `example_scores` gives it, and `norms` with rotated targets), and
    `norms` is `sqrt(Σ_l vec(G_n,l)ᵀ (H_l + λ)⁻¹ vec(G_n,l))`."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"first": (3, 5), "second": (4, 2)}
    curvature = Curvature({n: random_module(*shape, generator) for n, shape in shapes.items()})
    examples = random_capture(shapes, batch=3, tokens=6, generator=generator)
    queries = random_capture(shapes, batch=2, tokens=4, generator=generator)
    q = curvature.vectors(queries)
    per_token = curvature.token_scores(examples, curvature.fold(q))
    expected = torch.zeros(2, 3, 6, dtype=torch.float64)
    squared_norms = torch.zeros(3, dtype=torch.float64)
    for name, module in curvature.modules.items():
        inverse = dense_inverse(module)
        g, a = examples.gradients[name].double(), examples.activations[name].double()
        tokens = torch.einsum("bto,bti->btoi", g, a).flatten(2)
        query_gradients = queries.sketches()[name].flatten(1).double()
        example_gradients = examples.sketches()[name].flatten(1).double()
        expected += torch.einsum("qd,de,bte->qbt", query_gradients, inverse, tokens)
        squared_norms += torch.einsum("bd,de,be->b", example_gradients, inverse, example_gradients)
    torch.testing.assert_close(per_token.double(), expected, rtol=1e-4, atol=1e-4)
    inner = q.double() @ curvature.vectors(examples).double().T
    torch.testing.assert_close(per_token.sum(dim=2).double(), inner, rtol=1e-4, atol=1e-4)
    per_example = curvature.example_scores(examples, curvature.fold(q))
    torch.testing.assert_close(per_example.double(), inner, rtol=1e-4, atol=1e-4)
    norms, none = curvature.norms(examples)
    torch.testing.assert_close(norms, squared_norms.sqrt(), rtol=1e-5, atol=0)
    assert none is None
    slices = curvature.layer_slices()
    weights = {n: m.rotated_targets(q[:, slices[n]]) for n, m in curvature.modules.items()}
    same_norms, rotated = curvature.norms(examples, weights)
    torch.testing.assert_close(same_norms, norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(rotated.double(), inner, rtol=1e-4, atol=1e-4)
