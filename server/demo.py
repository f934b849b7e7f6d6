"""`influence-index demo`: the embedded default, end to end through the real gRPC path.

Trains (or reuses) the bundled demo model, builds (or reuses) its index, starts a server on a
free localhost port, asks three fact queries through the client, and shows the token-level
attribution of the top influencer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig
from indexer.demo.train import DemoArtifacts, ensure_demo_model
from indexer.evaluate import QuerySpec, read_queries
from indexer.model import weights_sha256
from indexer.publish import read_current, read_manifest, version_dir
from server.app import InfluenceServer, ServerConfig
from server.client import InfluenceClient, format_query_table, format_token_attribution

log = logging.getLogger(__name__)

DEMO_QUERIES = 3


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="model + index")
    parser.add_argument("-k", "--top-k", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="build a new index version")
    parser.add_argument("--json", action="store_true")


def ensure_demo_index(artifacts: DemoArtifacts, root: Path, rebuild: bool, progress: bool) -> str:
    """Reuse the published demo index when it was built from these weights and corpus."""
    if read_current(root) and not rebuild:
        manifest = read_manifest(version_dir(root))
        same_model = manifest["model"]["weights_sha256"] == weights_sha256(artifacts.model_dir)
        if same_model and manifest["corpus"]["data"] == str(artifacts.corpus_path):
            return manifest["version"]
    config = BuildConfig(
        model=artifacts.model_dir,
        out=root,
        corpus=CorpusConfig(str(artifacts.corpus_path)),
        progress=progress,
    )
    return build_index(config).version


def _answer(client: InfluenceClient, query: QuerySpec, top_k: int) -> dict:
    response = client.query(query.prompt, query.completion, top_k=top_k, include_text=True)
    gold_ranks = [i + 1 for i, hit in enumerate(response.influences) if hit.doc_id in query.gold]
    return {"query": query, "response": response, "gold_ranks": gold_ranks}


def run_demo(args: argparse.Namespace) -> int:
    progress = not args.quiet
    artifacts = ensure_demo_model(args.cache_dir / "demo", progress=progress)
    root = args.cache_dir / "demo-index"
    ensure_demo_index(artifacts, root, args.rebuild, progress)
    queries = read_queries(artifacts.queries_path)[:DEMO_QUERIES]
    config = ServerConfig(index_root=root, port=0)
    with InfluenceServer(config) as server:
        if not server.wait_until_serving(timeout_s=120):
            log.error("the demo server did not load its index")
            return 1
        with InfluenceClient(f"127.0.0.1:{server.port}") as client:
            answers = [_answer(client, q, args.top_k) for q in queries]
            top = answers[0]["response"].influences[0]
            attribution = client.attribute_tokens(
                queries[0].prompt, queries[0].completion, [top.example_id]
            ).attributions[0]
    if args.json:
        print(json.dumps(_as_json(artifacts, answers, attribution), indent=2))
    else:
        _print_report(artifacts, answers, attribution)
    return 0


def _as_json(artifacts: DemoArtifacts, answers: list[dict], attribution) -> dict:
    return {
        "fact_accuracy": artifacts.fact_accuracy,
        "queries": [
            {
                "id": a["query"].id,
                "prompt": a["query"].prompt,
                "completion": a["query"].completion,
                "gold": a["query"].gold,
                "gold_ranks": a["gold_ranks"],
                "response": MessageToDict(a["response"], preserving_proto_field_name=True),
            }
            for a in answers
        ],
        "top_attribution": MessageToDict(attribution, preserving_proto_field_name=True),
    }


def _print_report(artifacts: DemoArtifacts, answers: list[dict], attribution) -> None:
    print(
        f"demo model: {artifacts.model_dir} (completes {artifacts.fact_accuracy:.0%} of the "
        f"corpus's fact prompts correctly)\n"
    )
    for answer in answers:
        query = answer["query"]
        print(f"query: {query.prompt!r} -> {query.completion!r}")
        print(format_query_table(answer["response"]))
        ranks = ", ".join(map(str, answer["gold_ranks"])) or "none"
        print(f"documents stating this fact (gold) at ranks: {ranks}\n")
    print("token-level influence of the top result on the first query:")
    print(format_token_attribution(attribution, color=sys.stdout.isatty()))
