"""CUDA: the same sketches, query vectors and searches as on the CPU. Skipped where CUDA is
absent."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from indexer.engine import QueryEngine
from indexer.model import tracked_modules
from indexer.query import Query
from indexer.scan import CodeScan
from indexer.sketch import GradientSketcher, gaussian_projection, make_batch
from tests.test_scan import as_search, assert_same_search, sketch_only_index, sq8_index
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


def test_cuda_scan_matches_faiss(monkeypatch):
    index, queries = sq8_index(5000, 777)  # neither rows nor columns aligned
    scan = CodeScan.from_index(index, "cuda")
    for k in (1, 50):
        assert_same_search(index.search(queries, k), scan.search(queries, k))
    monkeypatch.setattr("indexer.scan._chunk_rows", lambda *_: 256)
    assert_same_search(index.search(queries, 50), scan.search(queries, 50))


def test_cuda_engine_scans_the_codes_on_the_gpu(tmp_path, tiny_model_dir, small_corpus_path):
    root = sketch_only_index(tmp_path, tiny_model_dir, small_corpus_path)
    query = Query("The capital of", " the city", top_k=8, rerank_depth=0)
    cpu, cuda = QueryEngine.open(root), QueryEngine.open(root, device="cuda")
    assert isinstance(cuda.searcher, CodeScan) and cuda.searcher.device.type == "cuda"
    expected = cpu.query([replace(query, top_k=30)])[0].hits
    found = cuda.query([query])[0].hits
    # the GPU's float32 query gradient differs from the CPU's in the last bits
    assert_same_search(as_search(expected), as_search(found), rtol=1e-3)


def test_cuda_exact_scores_match_cpu(tmp_path, capsys, tiny_model_dir, small_corpus_path):
    """`influence-index exact --device cuda` turned CUDA scores into numpy without a copy."""
    from server.cli import main

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q0", "prompt": "The capital of", "completion": " the"}\n')
    argv = ["-q", "exact", "--model", str(tiny_model_dir), "--data", str(small_corpus_path)]
    argv += ["--queries", str(queries), "-k", "5", "--json"]
    scores = {}
    for device in ("cpu", "cuda"):
        assert main([*argv, "--device", device]) == 0
        hits = json.loads(capsys.readouterr().out)[0]["hits"]
        scores[device] = [h["score"] for h in hits]
    assert scores["cuda"] == pytest.approx(scores["cpu"], rel=1e-3)
