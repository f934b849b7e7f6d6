from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_KIND_UNSPECIFIED: _ClassVar[ScoreKind]
    SCORE_KIND_INFLUENCE: _ClassVar[ScoreKind]
    SCORE_KIND_COSINE: _ClassVar[ScoreKind]

class RerankStop(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERANK_STOP_UNSPECIFIED: _ClassVar[RerankStop]
    RERANK_STOP_CERTAIN: _ClassVar[RerankStop]
    RERANK_STOP_DEPTH: _ClassVar[RerankStop]
    RERANK_STOP_DEADLINE: _ClassVar[RerankStop]
SCORE_KIND_UNSPECIFIED: ScoreKind
SCORE_KIND_INFLUENCE: ScoreKind
SCORE_KIND_COSINE: ScoreKind
RERANK_STOP_UNSPECIFIED: RerankStop
RERANK_STOP_CERTAIN: RerankStop
RERANK_STOP_DEPTH: RerankStop
RERANK_STOP_DEADLINE: RerankStop

class QueryRequest(_message.Message):
    __slots__ = ("prompt", "completion", "top_k", "score_kind", "include_text", "include_layer_scores", "rerank_depth", "lexical_candidates")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LAYER_SCORES_FIELD_NUMBER: _ClassVar[int]
    RERANK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    top_k: int
    score_kind: ScoreKind
    include_text: bool
    include_layer_scores: bool
    rerank_depth: int
    lexical_candidates: int
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., top_k: _Optional[int] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., include_text: _Optional[bool] = ..., include_layer_scores: _Optional[bool] = ..., rerank_depth: _Optional[int] = ..., lexical_candidates: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("tokenize_us", "gradient_us", "search_us", "lookup_us", "queue_us", "total_us", "rerank_us")
    TOKENIZE_US_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_US_FIELD_NUMBER: _ClassVar[int]
    SEARCH_US_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    RERANK_US_FIELD_NUMBER: _ClassVar[int]
    tokenize_us: int
    gradient_us: int
    search_us: int
    lookup_us: int
    queue_us: int
    total_us: int
    rerank_us: int
    def __init__(self, tokenize_us: _Optional[int] = ..., gradient_us: _Optional[int] = ..., search_us: _Optional[int] = ..., lookup_us: _Optional[int] = ..., queue_us: _Optional[int] = ..., total_us: _Optional[int] = ..., rerank_us: _Optional[int] = ...) -> None: ...

class Influence(_message.Message):
    __slots__ = ("example_id", "doc_id", "chunk", "score", "influence", "cosine", "text", "layer_scores", "exact")
    class LayerScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EXAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LAYER_SCORES_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    example_id: int
    doc_id: str
    chunk: int
    score: float
    influence: float
    cosine: float
    text: str
    layer_scores: _containers.ScalarMap[str, float]
    exact: bool
    def __init__(self, example_id: _Optional[int] = ..., doc_id: _Optional[str] = ..., chunk: _Optional[int] = ..., score: _Optional[float] = ..., influence: _Optional[float] = ..., cosine: _Optional[float] = ..., text: _Optional[str] = ..., layer_scores: _Optional[_Mapping[str, float]] = ..., exact: _Optional[bool] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("influences", "index_version", "timings", "n_completion_tokens", "score_kind", "candidates_reranked", "rerank_stop", "final")
    INFLUENCES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    N_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_RERANKED_FIELD_NUMBER: _ClassVar[int]
    RERANK_STOP_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    influences: _containers.RepeatedCompositeFieldContainer[Influence]
    index_version: str
    timings: Timings
    n_completion_tokens: int
    score_kind: ScoreKind
    candidates_reranked: int
    rerank_stop: RerankStop
    final: bool
    def __init__(self, influences: _Optional[_Iterable[_Union[Influence, _Mapping]]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., n_completion_tokens: _Optional[int] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., candidates_reranked: _Optional[int] = ..., rerank_stop: _Optional[_Union[RerankStop, str]] = ..., final: _Optional[bool] = ...) -> None: ...

class QueryBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[QueryRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[QueryRequest, _Mapping]]] = ...) -> None: ...

class QueryBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[QueryResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[QueryResponse, _Mapping]]] = ...) -> None: ...

class AttributeTokensRequest(_message.Message):
    __slots__ = ("prompt", "completion", "example_ids")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    example_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., example_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenAttribution(_message.Message):
    __slots__ = ("example_id", "doc_id", "tokens", "scores", "total")
    EXAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    example_id: int
    doc_id: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    total: float
    def __init__(self, example_id: _Optional[int] = ..., doc_id: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., total: _Optional[float] = ...) -> None: ...

class AttributeTokensResponse(_message.Message):
    __slots__ = ("attributions", "index_version")
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    attributions: _containers.RepeatedCompositeFieldContainer[TokenAttribution]
    index_version: str
    def __init__(self, attributions: _Optional[_Iterable[_Union[TokenAttribution, _Mapping]]] = ..., index_version: _Optional[str] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIndexInfoResponse(_message.Message):
    __slots__ = ("version", "model_path", "model_sha256", "n_examples", "dim", "score_kind", "faiss_factory", "build_time", "tracked_modules", "rank_in", "rank_out", "damping", "max_length", "last_reload_error", "pending_version", "serving", "max_top_k", "max_queries_per_batch", "max_attribution_examples", "rerank_available", "rerank_depth", "max_rerank_depth", "lexical_available", "allocation", "index_bytes_per_example", "tracked_parameter_share", "skipped_parameters", "retrieval_code", "retrieval_candidates")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    N_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    FAISS_FACTORY_FIELD_NUMBER: _ClassVar[int]
    BUILD_TIME_FIELD_NUMBER: _ClassVar[int]
    TRACKED_MODULES_FIELD_NUMBER: _ClassVar[int]
    RANK_IN_FIELD_NUMBER: _ClassVar[int]
    RANK_OUT_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    PENDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTRIBUTION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RERANK_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    RERANK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_RERANK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    TRACKED_PARAMETER_SHARE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_CODE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_path: str
    model_sha256: str
    n_examples: int
    dim: int
    score_kind: ScoreKind
    faiss_factory: str
    build_time: str
    tracked_modules: _containers.RepeatedScalarFieldContainer[str]
    rank_in: int
    rank_out: int
    damping: float
    max_length: int
    last_reload_error: str
    pending_version: str
    serving: bool
    max_top_k: int
    max_queries_per_batch: int
    max_attribution_examples: int
    rerank_available: bool
    rerank_depth: int
    max_rerank_depth: int
    lexical_available: bool
    allocation: str
    index_bytes_per_example: float
    tracked_parameter_share: float
    skipped_parameters: _containers.RepeatedScalarFieldContainer[str]
    retrieval_code: str
    retrieval_candidates: int
    def __init__(self, version: _Optional[str] = ..., model_path: _Optional[str] = ..., model_sha256: _Optional[str] = ..., n_examples: _Optional[int] = ..., dim: _Optional[int] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., faiss_factory: _Optional[str] = ..., build_time: _Optional[str] = ..., tracked_modules: _Optional[_Iterable[str]] = ..., rank_in: _Optional[int] = ..., rank_out: _Optional[int] = ..., damping: _Optional[float] = ..., max_length: _Optional[int] = ..., last_reload_error: _Optional[str] = ..., pending_version: _Optional[str] = ..., serving: _Optional[bool] = ..., max_top_k: _Optional[int] = ..., max_queries_per_batch: _Optional[int] = ..., max_attribution_examples: _Optional[int] = ..., rerank_available: _Optional[bool] = ..., rerank_depth: _Optional[int] = ..., max_rerank_depth: _Optional[int] = ..., lexical_available: _Optional[bool] = ..., allocation: _Optional[str] = ..., index_bytes_per_example: _Optional[float] = ..., tracked_parameter_share: _Optional[float] = ..., skipped_parameters: _Optional[_Iterable[str]] = ..., retrieval_code: _Optional[str] = ..., retrieval_candidates: _Optional[int] = ...) -> None: ...
