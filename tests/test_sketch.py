"""The sketch of one example equals P · G · Rᵀ with G its weight gradient from plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from indexer.config import Autocast
from indexer.experts import ExpertMatrix
from indexer.model import Tracked, module_shape, tracked_modules
from indexer.sketch import (
    GradientSketcher,
    Projection,
    gaussian_projection,
    make_batch,
    sample_targets,
    summed_nll,
)
from tests.tiny import random_sequences, tiny_gpt2, tiny_llama


def autograd_gradients(
    model, tokens: list[int], loss_start: int = 1, targets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Weight gradients `[d_out, d_in(+1 bias)]` of every tracked module, from plain autograd.

    The loss is the summed NLL of one unpadded sequence over positions `>= loss_start`,
    predicting `targets` (default: the sequence itself).
    """
    model = copy.deepcopy(model).requires_grad_(True)
    batch = make_batch([tokens], [loss_start], pad_id=0, sample_seeds=[0])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    summed_nll(logits, batch.targets if targets is None else targets).sum().backward()
    return {name: weight_gradient(m) for name, m in tracked_modules(model).items()}


def weight_gradient(module: Tracked) -> torch.Tensor:
    """`[d_out, d_in(+1 bias)]`: the gradient autograd left in a tracked module's parameters
    (an expert's slice of its fused parameters)."""
    if isinstance(module, ExpertMatrix):
        experts, e = module.experts, module.index
        weight = getattr(experts, module.parameter).grad[e]
        weight = weight.T if experts.is_transposed else weight
        bias = getattr(experts, f"{module.parameter}_bias").grad[e] if experts.has_bias else None
    else:
        weight = module.weight.grad.T if isinstance(module, Conv1D) else module.weight.grad
        bias = module.bias.grad if getattr(module, "bias", None) is not None else None
    return weight if bias is None else torch.cat([weight, bias[:, None]], 1)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
def test_sketch_equals_projected_autograd_gradient_with_padding(make_model):
    model = make_model()
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 4, 3, seed=7) for n, m in modules.items()}
    sequences = random_sequences([9, 5, 12])
    batch = make_batch(sequences, [1, 1, 1], pad_id=0, sample_seeds=[0, 1, 2])
    sketches = GradientSketcher(model, modules, projections).run(batch).sketches()
    for name in modules:
        P, R = projections[name].P, projections[name].R
        for b, tokens in enumerate(sequences):
            expected = P @ autograd_gradients(model, tokens)[name] @ R.T
            torch.testing.assert_close(sketches[name][b], expected, rtol=1e-4, atol=1e-5)


def test_identity_projection_gives_the_full_gradient():
    model = tiny_gpt2()
    modules = tracked_modules(model)
    name = next(iter(modules))
    projections = {n: Projection(None, None) for n in modules}
    tokens = random_sequences([7])[0]
    batch = make_batch([tokens, tokens[:3]], [1, 1], pad_id=0, sample_seeds=[0, 1])
    sketch = GradientSketcher(model, modules, projections).run(batch).sketches()[name][0]
    shape = module_shape(modules[name])
    assert sketch.shape == (shape.d_out, shape.d_in)
    torch.testing.assert_close(
        sketch, autograd_gradients(model, tokens)[name], rtol=1e-4, atol=1e-5
    )


def test_default_tracking_skips_embeddings_and_head():
    names = list(tracked_modules(tiny_gpt2()))
    assert names and all(n.startswith("transformer.h.") for n in names)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block


def test_sampled_labels_do_not_depend_on_the_batch():
    model = tiny_gpt2()
    sequences = random_sequences([9, 5, 12])

    def draw(rows: list[int]) -> list[list[int]]:
        batch = make_batch([sequences[r] for r in rows], [1] * len(rows), 0, [10 + r for r in rows])
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = sample_targets(logits, batch)
        return [targets[b, 1 : len(sequences[r])].tolist() for b, r in enumerate(rows)]

    together = draw([0, 1, 2])
    assert [draw([r])[0] for r in range(3)] == together
    assert together[0] != sequences[0][1:]  # drawn from the model, not the data


def test_bf16_autocast_sketches_are_float32_and_close():
    """The forward runs in bfloat16; the hooks' products and what they capture stay float32,
    within bfloat16's rounding (~1%) of the float32 pass's sketches."""
    model = tiny_gpt2(n_embd=32)
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 6, 5, seed=0) for n, m in modules.items()}
    sketcher = GradientSketcher(model, modules, projections)
    batch = make_batch(random_sequences([12, 7, 20]), [1, 1, 1], pad_id=0, sample_seeds=[0, 1, 2])
    exact = sketcher.run(batch, keep_unprojected=True)
    reduced = sketcher.run(batch, keep_unprojected=True, autocast=Autocast.BF16)
    for capture in (reduced, reduced.unprojected):
        tensors = [*capture.activations.values(), *capture.gradients.values()]
        assert all(t.dtype == torch.float32 for t in tensors)
    for name, expected in exact.sketches().items():
        found = reduced.sketches_of(name)
        assert not torch.equal(found, expected)  # the forward did run in bfloat16
        assert (found - expected).norm() <= 0.05 * expected.norm()


def test_padding_tokens_have_no_inputs_not_even_a_bias_column():
    """Padding adds nothing to the curvature's input covariances (`ã ãᵀ` per token)."""
    model = tiny_gpt2()
    modules = tracked_modules(model)
    projections = {n: gaussian_projection(n, m, 4, 3, seed=7) for n, m in modules.items()}
    batch = make_batch(random_sequences([9, 5]), [1, 1], pad_id=0, sample_seeds=[0, 1])
    capture = GradientSketcher(model, modules, projections).run(batch, keep_unprojected=True)
    for found in (capture, capture.unprojected):
        assert all(a[1, 5:].abs().max() == 0 for a in found.activations.values())
        assert all(a[1, :5].abs().max() > 0 for a in found.activations.values())
