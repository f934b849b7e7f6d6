"""Every architecture users bring: tiny random Llama, GPT-NeoX, Qwen2 and the MoE families
(Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, gpt-oss, DeepSeek-V3) build, track >= 95% of their
blocks' parameters, serve, and answer with exact re-ranking whose top-10 is the exact
scorer's."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from indexer.build import build_index
from indexer.config import (
    BuildConfig,
    CalibrationConfig,
    CorpusConfig,
    SketchConfig,
    StoreConfig,
)
from indexer.curvature import Curvature
from indexer.engine import EngineOptions, QueryEngine
from indexer.evaluate import matching_corpus
from indexer.exact import ExactConfig, ExactScorer
from indexer.manifest import FULL_CURVATURE_FILE
from indexer.query import Query
from server.cli import build_parser
from server.cli.index import run_info
from tests.conftest import write_jsonl
from tests.tiny import ARCHITECTURES, MOE_ARCHITECTURES, tiny_causal_lm

QUERY = Query("The market", " was busy", top_k=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_corpus) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", small_corpus[:48])


def model_dir(architecture: str, tokenizer_dir: Path, directory: Path) -> Path:
    """A random `architecture` model with the tiny tokenizer, saved as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_causal_lm(architecture, width=64, vocab=len(tokenizer))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def exact_top(engine: QueryEngine, query: Query) -> dict[int, float]:
    """The exact scorer's top-k over the whole corpus, with the version's factors: score by
    example id, best first."""
    full = Curvature.load(engine.path / FULL_CURVATURE_FILE)
    manifest = engine.manifest
    config = ExactConfig(curvature=manifest.curvature, modules=manifest.sketch.modules)
    examples = matching_corpus(engine, None)
    scorer = ExactScorer(engine.loaded, examples, config, curvature=full)
    scores = scorer.score([engine.prepare(replace(query, rerank_depth=0))])[0]
    return {examples[i].example_id: scores[i] for i in scores.argsort()[::-1][: query.top_k]}


def build_config(model: Path, corpus: Path, out: Path, modules: str | None = None) -> BuildConfig:
    return BuildConfig(
        model=model,
        out=out,
        corpus=CorpusConfig(str(corpus), max_length=32),
        sketch=SketchConfig(dims=1024, modules=modules),
        store=StoreConfig(score="influence", lexical_index=False),
        calibration=CalibrationConfig(queries=0),
        progress=False,
    )


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_builds_serves_and_reranks_exactly(architecture, tmp_path, tiny_model_dir, corpus) -> None:
    model = model_dir(architecture, tiny_model_dir, tmp_path / "model")
    config = build_config(model, corpus, tmp_path / "index")
    summary = build_index(config)
    assert summary.coverage.share >= 0.95, summary.coverage
    _, info = run_info(build_parser().parse_args(["info", "--index", str(config.out)]))
    assert f"tracked   {summary.coverage.share:.1%} of the blocks' parameters" in info
    options = EngineOptions(rerank_early_stop=False)
    engine = QueryEngine.open(config.out, options=options)
    try:
        assert engine.manifest.coverage == summary.coverage
        names = engine.info.tracked_modules
        assert any(".experts." in n for n in names) == (architecture in MOE_ARCHITECTURES)
        (result,) = engine.query([replace(QUERY, rerank_depth=summary.n_examples)])
        assert all(hit.exact for hit in result.hits)
        expected = exact_top(engine, QUERY)
        # The same examples (duplicate texts tie, in either order) with the same scores.
        assert {hit.example_id for hit in result.hits} == set(expected)
        found = [hit.score for hit in result.hits]
        np.testing.assert_allclose(found, list(expected.values()), rtol=1e-4)
    finally:
        engine.close()


def test_a_build_tracking_under_half_says_so_in_one_line(
    tmp_path, tiny_model_dir, corpus, caplog
) -> None:
    model = model_dir("mixtral", tiny_model_dir, tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="indexer"):
        summary = build_index(build_config(model, corpus, tmp_path / "index", r"self_attn"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("tracking only"), warnings
    assert "model.layers.*.mlp.experts.gate_up_proj" in warnings[0]
    assert summary.coverage.share < 0.5 and "--modules" in warnings[0]
