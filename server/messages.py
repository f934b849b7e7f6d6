"""Conversions between protobuf messages and the library's types, in one place.

The servicer turns requests into library objects with these and answers back with them; the
client builds its requests with them. Nothing here computes.
"""

from __future__ import annotations

from indexer.config import ScoreKind
from indexer.engine import Hit, IndexInfo, QueryResult, TokenAttribution
from indexer.errors import InvalidInputError
from indexer.query import Query
from indexer.rerank import StopReason
from influence.v1 import influence_pb2 as pb

_TO_PB = {ScoreKind.INFLUENCE: pb.SCORE_KIND_INFLUENCE, ScoreKind.COSINE: pb.SCORE_KIND_COSINE}
_FROM_PB = {value: kind for kind, value in _TO_PB.items()}
_STOP_TO_PB = {
    None: pb.RERANK_STOP_UNSPECIFIED,
    StopReason.CERTAIN: pb.RERANK_STOP_CERTAIN,
    StopReason.DEPTH: pb.RERANK_STOP_DEPTH,
    StopReason.DEADLINE: pb.RERANK_STOP_DEADLINE,
}


def score_kind_to_pb(kind: ScoreKind | str | None) -> int:
    """A score kind (None: the index's own) as the proto enum value."""
    return pb.SCORE_KIND_UNSPECIFIED if kind is None else _TO_PB[ScoreKind(kind)]


def score_kind_from_pb(value: int) -> ScoreKind | None:
    if value == pb.SCORE_KIND_UNSPECIFIED:
        return None
    if value not in _FROM_PB:
        raise InvalidInputError(f"unknown score_kind {value}")
    return _FROM_PB[value]


def query_from_request(request: pb.QueryRequest) -> Query:
    return Query(
        prompt=request.prompt,
        completion=request.completion,
        top_k=request.top_k,
        score_kind=score_kind_from_pb(request.score_kind),
        include_text=request.include_text,
        include_layer_scores=request.include_layer_scores,
        rerank_depth=request.rerank_depth if request.HasField("rerank_depth") else None,
        lexical_candidates=request.lexical_candidates,
    )


def query_request(query: Query) -> pb.QueryRequest:
    return pb.QueryRequest(
        prompt=query.prompt,
        completion=query.completion,
        top_k=query.top_k,
        score_kind=score_kind_to_pb(query.score_kind),
        include_text=query.include_text,
        include_layer_scores=query.include_layer_scores,
        rerank_depth=query.rerank_depth,
        lexical_candidates=query.lexical_candidates,
    )


def query_response(
    result: QueryResult, version: str, stage_us: dict[str, int], *, final: bool = True
) -> pb.QueryResponse:
    """`stage_us`: microseconds per stage, keyed by the Timings field names without `_us`;
    `final`: False for a streamed answer's first (sketch) message."""
    return pb.QueryResponse(
        influences=[influence_message(hit) for hit in result.hits],
        index_version=version,
        timings=pb.Timings(**{f"{stage}_us": us for stage, us in stage_us.items()}),
        n_completion_tokens=result.n_completion_tokens,
        score_kind=score_kind_to_pb(result.score_kind),
        candidates_reranked=result.candidates_reranked,
        rerank_stop=_STOP_TO_PB[result.rerank_stop],
        final=final,
    )


def influence_message(hit: Hit) -> pb.Influence:
    message = pb.Influence(
        example_id=hit.example_id,
        doc_id=hit.doc_id,
        chunk=hit.chunk,
        score=hit.score,
        influence=hit.influence,
        cosine=hit.cosine,
        exact=hit.exact,
    )
    if hit.text is not None:
        message.text = hit.text
    if hit.layer_scores:
        message.layer_scores.update(hit.layer_scores)
    return message


def attribution_message(attribution: TokenAttribution) -> pb.TokenAttribution:
    return pb.TokenAttribution(
        example_id=attribution.example_id,
        doc_id=attribution.doc_id,
        tokens=attribution.tokens,
        scores=attribution.scores,
        total=attribution.total,
    )


def index_info_fields(info: IndexInfo) -> dict[str, object]:
    """The GetIndexInfoResponse fields that describe the served version."""
    return {
        "serving": True,
        "version": info.version,
        "model_path": str(info.model_path),
        "model_sha256": info.model_sha256,
        "n_examples": info.n_examples,
        "dim": info.dim,
        "score_kind": score_kind_to_pb(info.score_kind),
        "faiss_factory": info.faiss_factory,
        "build_time": info.build_time,
        "tracked_modules": info.tracked_modules,
        "rank_in": info.rank_in,
        "rank_out": info.rank_out,
        "damping": info.damping,
        "max_length": info.max_length,
        "rerank_available": info.rerank_available,
        "rerank_depth": info.rerank_depth,
        "max_rerank_depth": info.max_rerank_depth,
        "lexical_available": info.lexical_available,
        "allocation": info.allocation,
        "index_bytes_per_example": info.index_bytes_per_example,
        "tracked_parameter_share": info.tracked_parameter_share,
        "skipped_parameters": info.skipped_parameters,
        "retrieval_code": info.retrieval_code,
        "retrieval_candidates": info.retrieval_candidates,
    }
