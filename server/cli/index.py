"""Subcommands that write or describe a published index: build, info, pin, rollback."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from indexer.config import Backend, BackendConfig, BuildConfig
from server.cli.options import add_options, from_args
from server.metrics import check_build_metric_targets, export_build_metrics


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BuildConfig)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--metrics-textfile",
        type=Path,
        metavar="PATH",
        help="on success, atomically write the build's metrics (last-success time, duration, "
        "examples) here, for node-exporter's textfile collector (name it *.prom)",
    )
    parser.add_argument(
        "--pushgateway", metavar="URL", help="on success, push the same metrics to this Pushgateway"
    )


def run_build(args: argparse.Namespace) -> tuple[object, str] | None:
    from indexer.build import build_index

    check_build_metric_targets(args.metrics_textfile, args.pushgateway)
    start = time.monotonic()
    s = build_index(from_args(BuildConfig, args, progress=not args.quiet))
    duration = time.monotonic() - start
    if os.environ.get("RANK", "0") != "0":
        return None  # under torchrun, rank 0 reports the build
    export_build_metrics(
        s.version, s.n_examples, duration, textfile=args.metrics_textfile,
        pushgateway=args.pushgateway,
    )  # fmt: skip
    text = (
        f"published {s.version} in {s.root}: {s.n_examples} examples from {s.n_documents} "
        f"documents ({s.n_empty_skipped} empty skipped), dim {s.dim} ({s.allocation}), "
        f"{s.index_factory}, {s.index_bytes_per_example:.0f} index bytes/example, compact "
        f"retrieval code {s.retrieval_code or 'none'}, exact "
        f"re-rank factors {s.full_curvature_bytes / 2**20:.1f} MiB, "
        f"{s.tokens_per_second:.0f} tokens/s\ntracked {s.coverage}\n"
    )
    if s.retrieval_check is not None:
        text += f"retrieval {s.retrieval_check}\n"
    if s.collection:
        text += f"milvus collection {s.collection}\n"
    if s.built_from is None:
        return s.to_dict(), text + f"full build: {s.full_reason}"
    return s.to_dict(), text + (
        f"incremental from {s.built_from}: {s.reused} reused, {s.new} new, "
        f"{s.changed} changed, {s.deleted} deleted"
    )


def _pointers(args: argparse.Namespace):
    """CURRENT and PINNED of --index under the backend the options name."""
    from indexer.backend import open_pointers

    return open_pointers(args.index, from_args(BackendConfig, args))


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index ROOT")
    parser.add_argument("--version", help="a version id (default: CURRENT)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every file's sha256 (Milvus: and read the collection back)",
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_options(parser, BackendConfig)


def run_info(args: argparse.Namespace) -> tuple[object, str]:
    from indexer.budget import describe, layout_ranks
    from indexer.errors import IndexVerificationError
    from indexer.manifest import INDEX_FILE
    from indexer.publish import list_versions, read_current, read_manifest, verify_version
    from indexer.publish import version_dir as find_version

    pointers = _pointers(args)
    path = find_version(args.index, args.version, pointers)
    m = verify_version(path) if args.verify else read_manifest(path)
    milvus = args.backend == Backend.MILVUS
    if milvus and args.verify:
        pointers.check(m, path.name)
        pointers.verify(m.collection, path)
    current, versions = read_current(args.index, pointers), list_versions(args.index)
    index_file = m.files.get(INDEX_FILE)
    if index_file is None:
        raise IndexVerificationError(f"version {path.name}: its manifest lists no {INDEX_FILE}")
    index_bytes = index_file.bytes
    retrieval = f"{m.retrieval.name}, scanned first" if m.retrieval else "flat scan only"
    lines = [
        f"index {args.index}: CURRENT = {current}; versions: {len(versions)}",
        f"version   {path.name} (built {m.created})",
        f"model     {m.model.path} sha256 {m.model.weights_sha256[:16]}",
        f"examples  {m.counts.examples} from {m.counts.documents} documents",
        f"vectors   dim {m.dim}, {index_bytes / max(m.counts.examples, 1):.0f} index "
        f"bytes/example, score {m.score}, faiss {m.index_factory}",
        f"retrieval {m.retrieval_check or retrieval}",
        f"modules   {len(m.modules)}, r_out x r_in: {describe(layout_ranks(m.modules))}",
        f"tracked   {m.coverage}",
        f"exact     factors {'stored' if m.exact_rerank else 'not stored'}; early stop: "
        f"{m.rerank_bound or 'off (no calibrated bound)'}",
    ]
    if m.collection is not None:
        lines.append(f"milvus    collection {m.collection.name}, {m.collection.rows} rows")
    if args.verify:
        lines.append(f"checksums ok ({len(m.files)} files)")
    info = {"current": current, "versions": versions, "version": path.name}
    info |= {"verified": args.verify, "manifest": json.loads(m.to_json())}
    return info, "\n".join(lines)


def add_pin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, metavar="ROOT", help="index root")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", help="the version every server must serve")
    target.add_argument(
        "--clear", action="store_true", help="remove the pin: servers follow CURRENT again"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_options(parser, BackendConfig)


def run_pin(args: argparse.Namespace) -> tuple[object, str]:
    """Write (after verifying the version) or remove ROOT/PINNED."""
    from indexer.publish import clear_pin, pin

    pointers = _pointers(args)
    if args.clear:
        previous = clear_pin(args.index, pointers)
        line = f"unpinned {args.index} (was {previous}): servers follow CURRENT"
        return {"pinned": None, "previous_pin": previous}, line
    pin(args.index, args.version, pointers)
    line = f"pinned {args.index} to {args.version}: every server serves it until --clear"
    return {"pinned": args.version}, line


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, metavar="ROOT", help="index root")
    text = "the version to serve (default: the newest valid one built before CURRENT's)"
    parser.add_argument("--to", metavar="VERSION", help=text)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_options(parser, BackendConfig)


def run_rollback(args: argparse.Namespace) -> tuple[object, str]:
    """Point CURRENT at a verified earlier version, atomically."""
    from indexer.publish import rollback

    done = rollback(args.index, args.to, _pointers(args))
    line = f"CURRENT of {args.index}: {done.previous} -> {done.current}"
    if done.pinned:
        line += f"; note: ROOT/PINNED pins {done.pinned}, which servers serve instead"
    return {"previous": done.previous, "current": done.current, "pinned": done.pinned}, line
