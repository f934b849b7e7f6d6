"""The linear datamodeling score: its computation against a hand-computed case, and the
retraining cache: written atomically, resumable, a corrupt or mismatched file refused in one line
(CLI exit 2)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from indexer.corpus import Document
from indexer.errors import InvalidInputError
from indexer.lds import (
    RetrainCache,
    bootstrap_mean,
    check_key,
    json_sha256,
    lds_per_query,
    membership,
    new_cache,
    random_subsets,
    read_cache,
    subset_sums,
    write_cache,
)
from indexer.query import LabeledQuery, Query
from server.cli import main

DOCUMENTS = [Document("a", "alpha", "c.jsonl"), Document("b", "beta", "c.jsonl")]
QUERIES = [
    LabeledQuery("q0", Query("The capital of X is", " Y")),
    LabeledQuery("q1", Query("p", " c")),
]


def small_cache() -> RetrainCache:
    cache = new_cache(DOCUMENTS, QUERIES, [[0], [1]], {"epochs": 1}, "ab" * 32)
    cache.losses[(0, 0)] = [1.5, 2.25]
    cache.seconds[(0, 0)] = {"wall": 3.0, "cpu": 2.5}
    return cache


def test_lds_of_a_hand_computed_case():
    # Documents a, b, c; c was cut into two chunks, so the rows' documents are a, b, c, c.
    in_subset = membership([[0, 1], [1, 2], [0, 2]], ["a", "b", "c"], ["a", "b", "c", "c"])
    assert in_subset.tolist() == [
        [True, True, False, False],
        [False, True, True, True],
        [True, False, True, True],
    ]
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, 0.0, 1.0]])
    assert subset_sums(scores, in_subset).tolist() == [[3.0, 9.0, 8.0], [3.0, 1.0, 4.0]]
    losses = np.array([[4.0, 2.0], [5.0, 3.0], [1.0, 1.0]])  # [M, Q]
    # q0: sums rank 1, 3, 2; −losses −4, −5, −1 rank 2, 1, 3: d = −1, 2, −1, so
    # ρ = 1 − 6·6 / (3·8) = −0.5. q1: sums rank 2, 1, 3; −losses rank 2, 1, 3: ρ = 1.
    assert lds_per_query(scores, in_subset, losses).tolist() == pytest.approx([-0.5, 1.0])
    # A lower loss where the scores predict more help: the sign is the influence's.
    assert lds_per_query(scores, in_subset, -losses).tolist() == pytest.approx([0.5, -1.0])


def test_lds_is_undefined_for_a_query_a_method_scores_nothing():
    in_subset = membership([[0], [1], [0, 1]], ["a", "b"], ["a", "b"])
    per_query = lds_per_query(np.zeros((1, 2)), in_subset, np.array([[1.0], [2.0], [3.0]]))
    assert math.isnan(per_query[0])


def test_bootstrap_interval_resamples_queries_and_skips_undefined_ones():
    estimate = bootstrap_mean(np.array([math.nan, 0.2, 0.4, 0.6]))
    assert estimate.n == 3
    assert estimate.mean == pytest.approx(0.4)
    assert 0.2 <= estimate.low < estimate.mean < estimate.high <= 0.6
    assert bootstrap_mean(np.array([0.3, 0.3])).low == pytest.approx(0.3)
    assert math.isnan(bootstrap_mean(np.array([math.nan])).mean)


def test_membership_refuses_other_documents():
    with pytest.raises(InvalidInputError, match="differ in 1 documents"):
        membership([[0]], ["a", "b"], ["a", "b", "z"])


def test_membership_allows_a_cache_document_without_rows():
    """An empty document is in the cache (its corpus) but has no example to score."""
    in_subset = membership([[0, 1], [1, 2]], ["a", "empty", "b"], ["a", "b", "b"])
    assert in_subset.tolist() == [[True, False, False], [False, True, True]]


def test_random_subsets_are_seeded_halves():
    subsets = random_subsets(10, 4, 0.5, seed=3)
    assert subsets == random_subsets(10, 4, 0.5, seed=3) != random_subsets(10, 4, 0.5, seed=4)
    assert all(len(s) == len(set(s)) == 5 and s == sorted(s) for s in subsets)
    with pytest.raises(InvalidInputError, match="fraction"):
        random_subsets(10, 4, 1.0, seed=0)


def test_cache_round_trip_and_resume(tmp_path):
    path = tmp_path / "lds.json"
    cache = small_cache()
    write_cache(cache, path)
    read = read_cache(path)
    assert read.key == cache.key
    assert read.losses == {(0, 0): [1.5, 2.25]}
    assert read.seconds == {(0, 0): {"wall": 3.0, "cpu": 2.5}}
    assert read.missing([0, 1]) == [(1, 0), (0, 1), (1, 1)]  # every seed-0 subset first
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    assert read.usable() == ([0], [0])
    with pytest.raises(InvalidInputError, match="1 retrained subsets, under the 10 an LDS needs"):
        read.loss_matrix(*read.usable())


def test_usable_losses_are_the_first_seeds_subsets_averaged_over_seeds_that_cover_them():
    cache = new_cache(DOCUMENTS, QUERIES, [[0]] * 13, {}, "ab" * 32)
    for m in range(11):
        cache.losses[(m, 0)] = [float(m), 2.0 * m]
        cache.losses[(m, 1)] = [m + 1.0, 2.0 * m + 1.0]
    cache.losses[(12, 1)] = [0.0, 0.0]  # the first seed has not retrained subset 12: unused
    subsets, seeds = cache.usable()
    assert (subsets, seeds) == (list(range(11)), [0, 1])
    losses = cache.loss_matrix(subsets, seeds)
    assert losses.shape == (11, 2)
    assert losses[:, 0].tolist() == [m + 0.5 for m in range(11)]
    del cache.losses[(3, 1)]
    assert cache.usable() == (list(range(11)), [0])  # seed 1 no longer covers them


def corrupt_variants(text: str) -> dict[str, tuple[str, str]]:
    """Ways a cache file goes bad: name -> (its text, the reason the refusal gives)."""
    data = json.loads(text)
    edited = json.loads(text)
    edited["body"]["retrains"][0]["losses"][0] = 9.0  # a changed number, checksum left alone
    malformed = json.loads(text)
    malformed["body"]["retrains"][0]["losses"] = [1.0]  # one loss for two queries
    malformed["sha256"] = json_sha256(malformed["body"])
    return {
        "truncated": (text[: len(text) // 2], "not JSON"),
        "edited": (json.dumps(edited), "checksum mismatch"),
        "malformed": (json.dumps(malformed), "malformed"),
        "other format": (json.dumps({**data, "format": "something/0"}), None),
    }


@pytest.mark.parametrize("variant", ["truncated", "edited", "malformed"])
def test_a_corrupt_cache_is_refused(tmp_path, variant):
    path = tmp_path / "lds.json"
    write_cache(small_cache(), path)
    text, reason = corrupt_variants(path.read_text())[variant]
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=f"LDS cache .* is corrupt \\({reason}"):
        read_cache(path)


NOT_CACHES = {
    "corpus": '{"id": "a", "text": "alpha"}\n{"id": "b", "text": "beta"}\n',
    "one JSON object": '{"id": "a", "text": "alpha"}',
    "JSON list": "[1, 2]",
    "binary": "\x00\udcff PAR1",
}


@pytest.mark.parametrize("name", [*NOT_CACHES, "other format"])
def test_a_file_that_is_no_cache_is_not_called_corrupt(tmp_path, name):
    """Some other file (e.g. the corpus, passed by mistake): nothing advises deleting it."""
    path = tmp_path / "lds.json"
    write_cache(small_cache(), path)
    text = NOT_CACHES.get(name) or corrupt_variants(path.read_text())[name][0]
    path.write_text(text, errors="surrogateescape")
    with pytest.raises(InvalidInputError, match="is not an LDS cache") as refused:
        read_cache(path)
    assert "delete" not in str(refused.value)


def test_a_mismatched_cache_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "lds.json"
    cache = small_cache()
    write_cache(cache, path)
    other = replace(cache.key, corpus="0" * 64, recipe="1" * 64)
    with pytest.raises(InvalidInputError, match="made for another corpus, recipe: delete it"):
        check_key(read_cache(path), other, path)
    check_key(read_cache(path), cache.key, path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"format": "influence-index-lds/1", "sha256": "00", "body": {}}', "is corrupt (checksum"),
        (NOT_CACHES["corpus"], "is not an LDS cache"),
    ],
)
def test_eval_refuses_a_bad_cache_in_one_line_exit_2(tmp_path, capsys, text, error):
    """Read before anything else, so no index is even opened."""
    path = tmp_path / "lds.json"
    path.write_text(text)
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": "q0", "prompt": "p", "completion": " c"}\n')
    argv = ["eval", "--index", str(tmp_path / "absent"), "--queries", str(queries)]
    assert main([*argv, "--lds", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path} {error}" in err
    assert err.count("\n") == 1


def test_benchmark_refuses_a_cache_made_for_other_subsets(tmp_path, capsys, demo_artifacts):
    """benchmarks/lds.py with a cache of other settings: one line, exit 2, the file kept."""
    from benchmarks.lds import main as benchmark

    path = tmp_path / "lds.json"
    cache = small_cache()
    write_cache(cache, path)
    before = path.read_bytes()
    assert benchmark(["--cache", str(path), "--subsets", "2", "--phase", "retrain"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: LDS cache {path} was made for another corpus, recipe")
    assert path.read_bytes() == before


@pytest.mark.slow
def test_eval_refuses_a_cache_made_for_another_model(
    tmp_path, capsys, demo_index_root, demo_artifacts
):
    path = tmp_path / "lds.json"
    write_cache(small_cache(), path)
    argv = ["eval", "--index", str(demo_index_root), "--queries", str(demo_artifacts.queries_path)]
    assert main([*argv, "--lds", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: LDS cache {path} was made for another model (sha256 ababab")
    assert err.count("\n") == 1
