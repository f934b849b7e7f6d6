"""`influence-index eval`: query-file validation, and one end-to-end run on the demo index."""

from __future__ import annotations

import json

import pytest

from indexer.cli import main
from indexer.errors import InvalidInputError
from indexer.evaluate import read_queries

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


@pytest.fixture(scope="session")
def eval_output(demo_artifacts, demo_index_root, tmp_path_factory):
    """One CLI eval run with every method on a slice of the demo queries: (JSON, plot dir)."""
    work = tmp_path_factory.mktemp("eval")
    lines = demo_artifacts.queries_path.read_text().splitlines()[:N_QUERIES]
    queries = work / "queries.jsonl"
    queries.write_text("\n".join(lines) + "\n")
    plots = work / "plots"
    argv = [
        "-q",
        "eval",
        "--index",
        str(demo_index_root),
        "--queries",
        str(queries),
        "--exact",
        "--baselines",
        "bm25,grad-cosine",
        "--plot",
        str(plots),
        "--json",
    ]
    return argv, plots


@pytest.mark.slow
def test_eval_end_to_end(eval_output, capsys):
    argv, plots = eval_output
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_queries"] == N_QUERIES
    # Floors the current code clears by a wide margin on the demo model; 0 would mean broken.
    fidelity = report["fidelity"]
    assert fidelity["spearman"] > 0.5
    assert fidelity["sketch_recall@10"] > 0.4
    assert fidelity["ann_recall@10"] > 0.95  # the default index is flat for the demo corpus
    methods = report["methods"]
    assert set(methods) == {"index", "exact", "bm25", "grad-cosine"}
    assert methods["index"]["fact"]["recall@10"] > 0.5
    assert methods["exact"]["fact"]["recall@10"] > 0.5
    assert methods["bm25"]["fact"]["recall@10"] > 0.5
    assert all(m["seconds"] > 0 for m in methods.values())
    assert len(report["fidelity_curves"]["sketch"]) == report["depth"]
    assert {p.name for p in plots.iterdir()} >= {"fact-recall.png", "scatter-1.png"}
