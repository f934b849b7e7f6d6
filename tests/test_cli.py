"""The one command-line layer: global options anywhere, one log level, --version, defaults."""

from __future__ import annotations

import logging

import pytest

from indexer import __version__
from indexer.config import CurvatureConfig, SketchConfig, StoreConfig
from server import cli


def test_global_options_go_before_or_after_the_subcommand() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(
        ["--log-level", "debug", "-q", "--threads", "1", "info", "--index", "x"]
    )
    after = parser.parse_args(
        ["info", "--index", "x", "--log-level", "debug", "-q", "--threads", "1"]
    )
    for args in (before, after):
        assert (args.log_level, args.quiet, args.threads) == ("DEBUG", True, 1)


def test_one_log_level_whatever_the_subcommand(monkeypatch, tmp_path) -> None:
    levels = {}

    def fake_serve(args):
        levels["serve"] = logging.getLogger().level

    serve = cli.Command("serve", cli.serving.add_serve_arguments, fake_serve, log_level="INFO")
    monkeypatch.setitem(cli.COMMANDS, "serve", serve)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(root, "handlers", [])
    assert cli.main(["--log-level", "DEBUG", "serve", "--index", str(tmp_path)]) == 0
    assert levels["serve"] == logging.DEBUG
    monkeypatch.setattr(root, "handlers", [])
    assert cli.main(["serve", "--index", str(tmp_path)]) == 0
    assert levels["serve"] == logging.INFO


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_build_defaults_come_from_the_config_dataclasses(capsys) -> None:
    args = cli.build_parser().parse_args(["build", "--model", "m", "--data", "d", "--out", "o"])
    assert (args.dims, args.allocation) == (SketchConfig().dims, SketchConfig().allocation)
    assert (args.damping, args.fit_examples) == (
        CurvatureConfig().damping,
        CurvatureConfig().fit_examples,
    )
    assert (args.score, args.nprobe) == (StoreConfig().score, StoreConfig().nprobe)
    with pytest.raises(SystemExit):
        cli.main(["build", "--help"])
    shown = capsys.readouterr().out
    assert f"(default: {CurvatureConfig().fit_examples})" in shown
    # A default said in words is not followed by argparse's "(default: None)".
    assert "e.g. its BOS) (default: None)" not in " ".join(shown.split())


def test_library_errors_are_one_line_with_exit_2(tmp_path, capsys) -> None:
    assert cli.main(["info", "--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no published index") and err.count("\n") == 1


@pytest.mark.parametrize("quiet", [[], ["-q"]], ids=["default", "quiet"])
def test_third_party_debug_lines_stay_off_stderr(
    quiet, monkeypatch, capsys, tmp_path, tiny_model_dir, small_corpus_path
) -> None:
    """bm25s sets its own logger to DEBUG; a build with a lexical index logs none of it."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process: the CLI configures it
    command = [*quiet, "build", "--model", str(tiny_model_dir), "--data", str(small_corpus_path),
               "--out", str(tmp_path), "--rank-in", "2", "--rank-out", "2", "--max-length", "16",
               "--fit-examples", "8", "--lexical-index", "on", "--exact-rerank", "off"]  # fmt: skip
    assert cli.main(command) == 0
    err = capsys.readouterr().err
    assert "Building index" not in err and " DEBUG " not in err, err
