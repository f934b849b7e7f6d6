"""Errors a caller can act on: the CLI prints one line, the server maps them to status codes."""


class InfluenceIndexError(Exception):
    """Base class: the message is written for a person and names the problem."""


class InvalidInputError(InfluenceIndexError):
    """Bad input (a path, a column, a query, an option). CLI exit 2; gRPC INVALID_ARGUMENT."""


class NotFoundError(InfluenceIndexError):
    """A named thing (example id, version) does not exist. gRPC NOT_FOUND."""


class PreconditionError(InfluenceIndexError):
    """The request needs something this index version was built without. FAILED_PRECONDITION."""


class IndexVerificationError(InfluenceIndexError):
    """A published version fails its checksums or does not match the model. Never served."""


class ResourceLimitError(InfluenceIndexError):
    """The requested computation would not fit in memory (e.g. exact EK-FAC factors), or its
    output on disk (a build on a full disk)."""


class UnavailableError(InfluenceIndexError):
    """A service the index lives in (Milvus) cannot be reached or failed. gRPC UNAVAILABLE."""


class BackendError(InfluenceIndexError):
    """The vector engine (Milvus) refused a request for good (a retry would not help)."""
