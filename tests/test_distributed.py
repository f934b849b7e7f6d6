"""`torchrun --nproc-per-node 2` (gloo, CPU): the same version as one process, and a rank
killed mid-build publishes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.engine import QueryEngine
from indexer.publish import VERSIONS, read_current, verify_version, version_dir
from tests.test_build import code_step, tiny_config
from tests.test_calibration import assert_bound_of_separate_passes

METADATA = (
    'SELECT id, "row", doc_id, chunk, text, token_ids, content_hash, source, norm, loss '
    'FROM examples ORDER BY "row"'
)


@contextmanager
def torchrun(
    model: Path, corpus: Path, out: Path, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """The CLI build under torchrun, 2 processes on this host, one thread each, in a session
    of their own: killed, ranks and all, if the test ends before they do."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "server.cli", "--quiet", "--threads", "1", "build",
               "--model", str(model), "--data", str(corpus), "--out", str(out),
               "--max-length", "64", "--rank-in", "8", "--rank-out", "8", "--json"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, small_corpus_path) -> Path:
    root = tmp_path_factory.mktemp("single")
    build_index(tiny_config(tiny_model_dir, small_corpus_path, root))
    return root


def test_two_ranks_publish_what_one_process_does(
    tmp_path, single, tiny_model_dir, small_corpus_path
):
    with torchrun(tiny_model_dir, small_corpus_path, tmp_path) as process:
        out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert out.count('"version"') == 1  # rank 0 alone reports
    one, two = QueryEngine.open(single), QueryEngine.open(tmp_path)
    rows = [e.metadata._con.execute(METADATA).fetchall() for e in (one, two)]
    assert [r[:8] for r in rows[0]] == [r[:8] for r in rows[1]]  # ids, rows, texts, tokens
    stats = [np.array([r[8:] for r in found]) for found in rows]  # norm, loss
    assert np.allclose(stats[0], stats[1], rtol=1e-4, atol=1e-4)
    expected, found = one.vectors.preconditioned[:], two.vectors.preconditioned[:]
    # each build fits its own 8-bit ranges to its (float-noise apart) vectors and rounds a value
    # by half a code step at most: one step apart, besides the sketch's float noise
    step = np.maximum(code_step(one), code_step(two))
    assert np.allclose(found, expected, rtol=2e-3, atol=step + 2e-3 * np.abs(expected).max())
    assert two.manifest.counts == one.manifest.counts
    assert two.manifest.exact_rerank and two.reranker is not None
    assert_bound_of_separate_passes(tmp_path)  # from both ranks' exact scores
    assert not list(version_dir(tmp_path).glob(".*"))  # no scratch file of either rank


def _rank_pid(marker: str, rank: int) -> int | None:
    """The process of `rank` among those whose environment carries `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in environ and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_rank_fails_the_build_and_publishes_nothing(
    tmp_path, single, tiny_model_dir, small_corpus_path
):
    root = tmp_path / "root"
    shutil.copytree(single, root)
    before = read_current(root)
    marker = f"INFLUENCE_TEST_BUILD={uuid.uuid4().hex}"
    key, value = marker.split("=")
    with torchrun(tiny_model_dir, small_corpus_path, root, {key: value}) as process:
        deadline = time.monotonic() + 300
        # Rank 1 is staging its corpus: it cannot finish before rank 0's all-reduces, so the
        # kill lands mid-build however fast the machine (its sketch shard alone can take
        # milliseconds).
        while not list((root / VERSIONS).glob(".staging-*/.corpus.duckdb.1")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "rank 1 never staged its corpus"
            time.sleep(0.05)
        rank = _rank_pid(marker, 1)
        assert rank is not None, "rank 1's process was not found"
        os.kill(rank, signal.SIGKILL)
        process.communicate(timeout=300)
    assert process.returncode != 0
    assert read_current(root) == before
    verify_version(version_dir(root))
    assert sorted(p.name for p in (root / VERSIONS).iterdir() if not p.name.startswith(".")) == [
        before
    ]
