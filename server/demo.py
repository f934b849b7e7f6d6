"""The bundled demo, end to end: train (or reuse) the demo model, build (or reuse) its index,
serve it on a free local port, ask its fact queries through the real client, and attribute the
first answer's top hit to its tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from indexer.errors import InvalidInputError
from indexer.query import LabeledQuery, read_queries
from influence.v1 import influence_pb2 as pb
from server.app import InfluenceServer, ServerConfig
from server.client import InfluenceClient

if TYPE_CHECKING:
    from indexer.demo.train import DemoArtifacts


@dataclass(frozen=True)
class DemoOptions:
    cache_dir: Path = field(
        default=Path(".cache"), metadata={"help": "where the demo model and index are kept"}
    )
    top_k: int = field(default=5, metadata={"help": "hits shown", "flags": ("-k", "--top-k")})
    n_queries: int = 3
    load_timeout_s: float = 120.0


@dataclass(frozen=True)
class DemoAnswers:
    """The demo's queries, the server's answers, and the token attribution of the first
    answer's top hit."""

    artifacts: DemoArtifacts
    queries: list[LabeledQuery]
    responses: list[pb.QueryResponse]
    attribution: pb.TokenAttribution

    def gold_ranks(self) -> list[list[int]]:
        """Per query, the ranks of the hits from documents stating its fact."""
        return [
            [rank for rank, hit in enumerate(r.influences, 1) if hit.doc_id in q.gold]
            for q, r in zip(self.queries, self.responses, strict=True)
        ]

    def to_dict(self) -> dict[str, object]:
        answers = zip(self.queries, self.responses, self.gold_ranks(), strict=True)
        return {
            "fact_accuracy": self.artifacts.fact_accuracy,
            "queries": [
                {
                    "id": q.id,
                    "prompt": q.query.prompt,
                    "completion": q.query.completion,
                    "gold": q.gold,
                    "gold_ranks": ranks,
                    "response": MessageToDict(r, preserving_proto_field_name=True),
                }
                for q, r, ranks in answers
            ],
            "top_attribution": MessageToDict(self.attribution, preserving_proto_field_name=True),
        }


def ask_demo(options: DemoOptions, *, rebuild: bool, progress: bool) -> DemoAnswers:
    """Run the demo; `rebuild` publishes a new index version even when CURRENT's would do."""
    # The demo's training code pulls in much of transformers: loaded only when the demo runs.
    from indexer.demo.index import ensure_demo_index
    from indexer.demo.train import ensure_demo_model

    artifacts = ensure_demo_model(options.cache_dir / "demo", progress=progress)
    root = options.cache_dir / "demo-index"
    ensure_demo_index(artifacts, root, rebuild, progress=progress)
    queries = read_queries(artifacts.queries_path)[: options.n_queries]
    with InfluenceServer(ServerConfig(index_root=root, port=0)) as server:
        if not server.wait_until_serving(timeout_s=options.load_timeout_s):
            raise InvalidInputError(f"the demo server did not load its index from {root}")
        with InfluenceClient(f"127.0.0.1:{server.port}") as client:
            responses = [
                client.query(q.query.prompt, q.query.completion, top_k=options.top_k)
                for q in queries
            ]
            first = queries[0].query
            attribution = client.attribute_tokens(
                first.prompt, first.completion, [responses[0].influences[0].example_id]
            ).attributions[0]
    return DemoAnswers(artifacts, queries, responses, attribution)
