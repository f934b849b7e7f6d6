"""The terminal's answers: identical texts grouped, token attribution shaded where colour is on."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from influence.v1 import influence_pb2 as pb
from server.cli import main
from server.client import format_query_table, format_token_attribution, group_identical, use_color
from tests.server_fakes import FakeOpener, publish, running_server

ATTRIBUTION = pb.TokenAttribution(
    example_id=7,
    doc_id="d7",
    tokens=["The", " cat", " sat", " down"],
    scores=[1.0, -0.6, 0.05, -0.95],
    total=-0.5,
)


def hit(doc: str, text: str, score: float) -> pb.Influence:
    return pb.Influence(doc_id=doc, text=text, score=score)


def test_identical_texts_are_one_row_with_their_count_and_ranks() -> None:
    hits = [hit("a", "same", 4), hit("b", "other", 3), hit("c", "same", 2), hit("d", "same", 1)]
    response = pb.QueryResponse(influences=hits, index_version="v1")
    assert group_identical(hits) == [[0, 2, 3], [1]]
    assert group_identical([hit("a", "", 1), hit("b", "", 0)]) == [[0], [1]]
    rows = format_query_table(response).splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("   1") and rows[0].endswith("same  (×3 identical, ranks 1, 3, 4)")
    assert rows[1].startswith("   2") and rows[1].endswith("other")


def test_token_attribution_in_256_colours_or_brackets() -> None:
    shaded = format_token_attribution(ATTRIBUTION, color=True).splitlines()[1]
    assert shaded == (
        "\x1b[48;5;46;38;5;16mThe\x1b[0m"  # the strongest positive: the deepest green
        "\x1b[48;5;210;38;5;16m cat\x1b[0m"  # -0.6: a middle red
        " sat"  # under 10% of the largest: not shaded
        "\x1b[48;5;196;38;5;16m down\x1b[0m"
    )
    plain = format_token_attribution(ATTRIBUTION).splitlines()[1]
    assert plain == "[The +1] [cat -0.6] sat [down -0.95]"


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout", Terminal())
    assert use_color()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color()
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.delenv("NO_COLOR")
    assert not use_color()


def test_query_command_prints_the_attribution_of_a_hit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    publish(tmp_path, "v1")
    with running_server(tmp_path, FakeOpener()) as (server, _):
        target = f"127.0.0.1:{server.port}"
        assert main(["query", "--target", target, "--completion", " sat", "-k", "3"]) == 0
        shown = capsys.readouterr().out
        argv = ["query", "--target", target, "--completion", " sat", "--attribute", "0"]
        assert main(argv) == 0
        without = capsys.readouterr().out
    assert "token attribution of rank 1: example " in shown
    assert shown.rstrip().endswith("[The +0.5] [cat -0.25] [sat +1]")
    assert "token attribution" not in without
