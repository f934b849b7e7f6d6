"""CUDA: the same sketches and query vectors as on the CPU. Skipped where CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from indexer.model import tracked_modules
from indexer.sketch import GradientSketcher, gaussian_projection, make_batch
from tests.tiny import random_sequences, tiny_gpt2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("labels", ["data", "sampled"])
def test_cuda_sketches_match_cpu(labels):
    sequences = random_sequences([9, 5, 12])
    batch = make_batch(sequences, [1, 1, 1], pad_id=0, sample_seeds=[0, 1, 2])
    sketches = {}
    for device in ("cpu", "cuda"):
        model = tiny_gpt2().to(device)
        modules = tracked_modules(model)
        projections = {n: gaussian_projection(n, m, 4, 3, seed=7) for n, m in modules.items()}
        capture = GradientSketcher(model, modules, projections).run(batch, labels)
        sketches[device] = {n: s.cpu() for n, s in capture.sketches().items()}
    for name, expected in sketches["cpu"].items():
        torch.testing.assert_close(sketches["cuda"][name], expected, rtol=1e-3, atol=1e-4)
