"""`influence-index eval`: query-file validation, and one end-to-end run on the demo index."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from indexer.baselines import BM25Scorer
from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig, SketchConfig
from indexer.corpus import document_batches, load_corpus
from indexer.errors import InvalidInputError
from indexer.evaluate import (
    EvalReport,
    MethodReport,
    QueryReport,
    _IndexRun,
    hits_only_scores,
    render_json,
    render_table,
)
from indexer.lds import membership, new_cache, random_subsets, subset_sums, write_cache
from indexer.publish import read_manifest, version_dir
from indexer.query import LabeledQuery, read_queries
from server.cli import main
from tests.conftest import write_jsonl

N_QUERIES = 12


def test_read_queries(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "The capital of X is", "completion": " Y", "gold": ["d1"]}\n'
        "\n"
        '{"id": 7, "prompt": "p", "completion": " c"}\n'
    )
    queries = read_queries(path)
    assert [(q.id, q.gold) for q in queries] == [("a", ["d1"]), ("7", [])]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"id": "b", "prompt": "p"}', "line 2: missing or non-string 'completion'"),
        ('{"id": "b", "prompt": "p", "completion": "c", "gold": "d1"}', "line 2: 'gold' must"),
        ('{"id": "a", "prompt": "p", "completion": "c"}', "line 2: duplicate query id 'a'"),
    ],
)
def test_read_queries_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "completion": "c"}\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=message):
        read_queries(path)


def test_read_queries_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read queries file"):
        read_queries(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInputError, match="no queries"):
        read_queries(tmp_path / "empty.jsonl")


def test_report_renders_as_table_and_strict_json():
    report = EvalReport(
        index="ROOT",
        version="v1",
        score_kind="influence",
        faiss_factory="IDMap,Flat",
        n_examples=3,
        dim=8,
        depth=10,
        ks=[10],
        n_queries=1,
        n_with_gold=1,
        fidelity={"spearman": math.nan, "ann_recall@10": 1.0},
        methods={"index": MethodReport(0.5, 0.5, {"recall@1": 0.0, "recall@10": 1.0, "mrr": 0.25})},
        queries=[QueryReport("q1", True, {"ann_recall@10": 1.0}, {"index": 4}, {"index": 0.5})],
        lds={"index": {"mean": 0.5, "low": 0.25, "high": 0.75, "n": 1}},
        lds_settings={
            "subsets": 50,
            "documents_per_subset": 2,
            "documents": 3,
            "seeds": [0],
            "confidence": 0.95,
        },
    )
    table = render_table(report)
    assert "q1" in table and "rank:index" in table
    assert (
        "Spearman across 50 subsets of 2 of 3 documents, the model retrained on each (seeds [0]"
        in table
    )
    assert "[0.250, 0.750]" in table
    assert "0.250" in table  # MRR
    assert json.loads(render_json(report))["fidelity"]["spearman"] is None  # NaN -> null


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--fit-examples", "0"], "--fit-examples must be at least 1"),
        (["--max-length", "1000"], "--max-length 1000 must be between 2 and the model's context"),
        (["--damping", "-1"], "--damping must be a positive number"),
        (["--damping", "nan"], "--damping must be a positive number"),
        (["-k", "-90"], "-k must be at least 1"),
        (["-k", "0"], "-k must be at least 1"),
    ],
)
def test_exact_refuses_what_build_refuses_in_one_line_exit_2(
    tmp_path, capsys, tiny_model_dir, small_corpus_path, option, error
):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q0", "prompt": "The capital of", "completion": " X"}\n')
    argv = ["-q", "exact", "--model", str(tiny_model_dir), "--data", str(small_corpus_path)]
    assert main([*argv, "--queries", str(queries), "--json", *option]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {error}")
    assert captured.err.count("\n") == 1
    assert captured.out == ""


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--baselines", "grad-cosine", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--plot", "a-file"], "cannot make plot directory"),
    ],
)
def test_eval_refuses_bad_settings_before_any_work(tmp_path, capsys, option, error):
    """Refused before the index is opened (it is absent here), not after the first methods."""
    (tmp_path / "a-file").write_text("")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q0", "prompt": "p", "completion": " c"}\n')
    argv = ["eval", "--index", str(tmp_path / "absent"), "--queries", str(queries)]
    option = [str(tmp_path / o) if o == "a-file" else o for o in option]
    assert main([*argv, *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}")
    assert err.count("\n") == 1


def bm25_cache(path: Path, root: Path, queries: list[LabeledQuery]) -> Path:
    """A cache for the index at `root` whose "retrained" losses are minus the BM25 scores (of
    the examples, as eval scores them) summed over each subset: an oracle for the bm25 method,
    whose LDS must then be 1 (no retraining in a test)."""
    manifest = read_manifest(version_dir(root))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(manifest.model.path)
    documents = [d for batch in document_batches(manifest.corpus) for d in batch]
    examples = load_corpus(manifest.corpus, tokenizer, manifest.max_length).examples
    subsets = random_subsets(len(documents), 12, 0.5, seed=0)
    cache = new_cache(
        documents, queries, subsets, {"oracle": "bm25"}, manifest.model.weights_sha256
    )
    bm25 = BM25Scorer([e.text for e in examples])
    scores = bm25.score([f"{q.query.prompt} {q.query.completion}" for q in queries])
    in_subset = membership(subsets, cache.doc_ids, [e.doc_id for e in examples])
    for m, losses in enumerate(-subset_sums(scores, in_subset).T):
        cache.losses[(m, 0)] = losses.tolist()
    write_cache(cache, path)
    return path


def test_eval_lds_over_a_corpus_with_an_empty_document(
    tmp_path, capsys, tiny_model_dir, small_corpus
):
    """The cache lists every document (as `document_batches` and benchmarks/lds.py do), the
    empty one too, which has no example to score: the cache is still the corpus's."""
    documents = [*small_corpus[:40], {"id": "doc-empty", "text": ""}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    root = tmp_path / "root"
    build_index(
        BuildConfig(
            model=tiny_model_dir,
            out=root,
            corpus=CorpusConfig(str(corpus), max_length=64),
            sketch=SketchConfig(rank_in=8, rank_out=8),
            progress=False,
        )
    )
    words = [d["text"].split() for d in documents[:3]]
    rows = [
        {"id": f"q{i}", "prompt": " ".join(w[:4]), "completion": f" {w[4]}"}
        for i, w in enumerate(words)
    ]
    queries = write_jsonl(tmp_path / "q.jsonl", rows)
    cache = bm25_cache(tmp_path / "lds.json", root, read_queries(queries))
    argv = ["-q", "eval", "--index", str(root), "--queries", str(queries), "--json"]
    argv += ["-k", "5", "--fact-k", "1", "--baselines", "bm25", "--lds", str(cache)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lds_settings"]["documents"] == len(documents)
    assert report["lds"]["bm25"]["mean"] == pytest.approx(1.0)  # the oracle, as on the demo


@pytest.fixture(scope="session")
def eval_run(demo_artifacts, demo_index_root, tmp_path_factory) -> tuple[int, dict, Path]:
    """One CLI eval with every method on a spread of the demo queries (every relation):
    (exit code, JSON report, plot directory)."""
    work = tmp_path_factory.mktemp("eval")
    lines = [line for line in demo_artifacts.queries_path.read_text().splitlines() if line]
    queries = work / "queries.jsonl"
    queries.write_text("\n".join(lines[:: max(1, len(lines) // N_QUERIES)][:N_QUERIES]) + "\n")
    plots = work / "plots"
    cache = bm25_cache(work / "lds.json", demo_index_root, read_queries(queries))
    argv = [
        "-q",
        "eval",
        "--index",
        str(demo_index_root),
        "--queries",
        str(queries),
        "--exact",
        "--baselines",
        "bm25,grad-cosine,no-curvature",
        "--rerank-depth",
        "50",
        "--lds",
        str(cache),
        "--plot",
        str(plots),
        "--json",
    ]
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue()), plots


@pytest.mark.slow
def test_eval_end_to_end(eval_run):
    code, report, plots = eval_run
    assert code == 0
    assert report["n_queries"] == N_QUERIES
    # Floors well under what the current code measures on the demo model (benchmarks/RESULTS.md);
    # near 0 would mean broken.
    fidelity = report["fidelity"]
    assert fidelity["spearman"] > 0.2
    assert fidelity["sketch_recall@10"] > 0.2
    assert fidelity["ann_recall@10"] > 0.95  # the default index is flat for the demo corpus
    assert fidelity["rerank_recall@10"] > 0.8  # exact re-ranking of 50 (+100 BM25) candidates
    # the sketch's estimates of every exact score: better than the mean of the exact ones
    assert 0 < fidelity["estimate_error"] < 1
    floors = {
        "index": 0.4,
        "index+rerank": 0.7,
        "index+lexical+rerank": 0.7,
        "exact": 0.7,
        "bm25": 0.8,
        "grad-cosine": 0.6,
        "no-curvature": 0.2,
    }
    methods = report["methods"]
    assert set(methods) == set(floors)
    for name, floor in floors.items():
        assert methods[name]["fact"]["recall@10"] > floor, name
        assert methods[name]["seconds"] > 0
    assert len(report["fidelity_curves"]["sketch"]) == report["depth"]
    assert {p.name for p in plots.iterdir()} >= {"fact-recall.png", "scatter-1.png", "lds.png"}
    lds = report["lds"]
    hits_only = {f"{m} hits" for m in ("index+rerank", "index+lexical+rerank")}
    assert set(lds) == set(floors) | hits_only
    assert lds["bm25"]["mean"] == pytest.approx(1.0)  # the cache's losses are BM25's: an oracle
    assert lds["bm25"]["n"] == N_QUERIES
    for estimate in lds.values():
        assert estimate["low"] <= estimate["mean"] <= estimate["high"]
    assert all(set(q["lds"]) == set(floors) | hits_only for q in report["queries"])
    assert report["lds_settings"]["subsets"] == 12


def test_the_hits_alone_keep_their_scores_and_say_nothing_of_the_rest():
    estimates = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    run = _IndexRun(
        rows=[[3, 0], [1]], docs=[["d", "a"], ["b"]], scores=[[10.0, 9.0], [5.0]],
        exact=[[True, False], [False]],
    )  # fmt: skip
    # exact hits keep their exact score, the others their estimate; the rest the row's mean
    expected = [[1.0, 3.0, 3.0, 10.0], [1.0, 0.0, 1.0, 1.0]]
    np.testing.assert_allclose(hits_only_scores(estimates, run), expected)
