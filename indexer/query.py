"""Queries: the one shape a (prompt, completion) question takes from a request to the engine,
its tokenization (done once), and the preconditioned query vectors it becomes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from indexer.config import ScoreKind
from indexer.curvature import Curvature
from indexer.errors import InvalidInputError
from indexer.sketch import Capture, GradientSketcher, TokenBatch, make_batch


@dataclass(frozen=True)
class Query:
    """One question: which training examples made `completion` likely after `prompt`?

    The completion's tokens carry the query loss. `score_kind` None means the index's own kind;
    `rerank_depth` None means the engine's default (0: no exact re-ranking);
    `lexical_candidates` BM25 matches of prompt + completion join the re-ranked candidates.
    """

    prompt: str
    completion: str
    top_k: int = 10
    score_kind: ScoreKind | None = None
    include_text: bool = False
    include_layer_scores: bool = False
    rerank_depth: int | None = None
    lexical_candidates: int = 0


@dataclass(frozen=True)
class TokenizedQuery:
    """A query's token ids (prompt then completion); the loss covers positions `>= loss_start`.

    `tokenized_by` names what tokenized it (an index version), so that a query is tokenized
    again only when another version, maybe with another tokenizer, answers it.
    """

    query: Query
    token_ids: list[int]
    loss_start: int
    tokenized_by: str = ""

    @property
    def n_completion_tokens(self) -> int:
        return len(self.token_ids) - self.loss_start


# A token's text may grow under normalisation (e.g. accents stripped); this much slack keeps
# the character bound a bound.
_CHARS_PER_TOKEN_SLACK = 4


def max_query_chars(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters beyond which a text surely has more than `max_length` tokens: each token
    covers at most as many characters as the longest vocabulary entry (times some slack)."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_length * longest * _CHARS_PER_TOKEN_SLACK


def check_unicode(name: str, text: str) -> None:
    """InvalidInputError unless `text` encodes as UTF-8 (what gRPC sends): a lone surrogate, from
    JSON's "\\ud800" or a command-line byte that is not UTF-8, does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{name} is not valid Unicode text ({e.reason})") from None


def tokenize_query(
    tokenizer: PreTrainedTokenizerBase,
    query: Query,
    max_length: int,
    tokenized_by: str = "",
    max_chars: int | None = None,
    prefix: list[int] | None = None,
) -> TokenizedQuery:
    """Tokenize prompt (with the tokenizer's special prefix) and completion separately.

    Separate tokenization keeps the prompt/completion boundary exact: no completion token ever
    merges with the prompt's last characters. The prompt starts with `prefix` (the index's
    framing, see `indexer.corpus.framing`), or by default with the tokenizer's special tokens.
    A text longer than `max_chars` (see `max_query_chars`) is refused before any tokenization,
    so a huge request costs nothing.
    """
    for name in ("prompt", "completion"):
        check_unicode(name, getattr(query, name))
    chars = len(query.prompt) + len(query.completion)
    if max_chars is not None and chars > max_chars:
        raise InvalidInputError(
            f"prompt + completion is {chars} characters, surely more than this index's limit "
            f"of {max_length} tokens"
        )
    if prefix is None:
        prompt_ids = list(tokenizer(query.prompt, add_special_tokens=True)["input_ids"])
    else:
        prompt_ids = prefix + list(tokenizer(query.prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(query.completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise InvalidInputError("completion is empty: the query loss needs at least one token")
    if not prompt_ids:
        raise InvalidInputError("prompt is empty and the tokenizer adds no BOS token to start from")
    total = len(prompt_ids) + len(completion_ids)
    if total > max_length:
        raise InvalidInputError(
            f"prompt + completion is {total} tokens; this index's limit is {max_length} tokens"
        )
    return TokenizedQuery(query, prompt_ids + completion_ids, len(prompt_ids), tokenized_by)


def query_token_batch(queries: list[TokenizedQuery], pad_id: int) -> TokenBatch:
    return make_batch(
        [q.token_ids for q in queries], [q.loss_start for q in queries], pad_id, [0] * len(queries)
    )


def query_capture(
    sketcher: GradientSketcher,
    queries: list[TokenizedQuery],
    pad_id: int,
    *,
    keep_unprojected: bool = False,
) -> Capture:
    """One forward/backward of the completion-only loss for the whole batch of queries."""
    batch = query_token_batch(queries, pad_id)
    return sketcher.run(batch, "data", keep_unprojected=keep_unprojected)


def query_vectors(
    sketcher: GradientSketcher, curvature: Curvature, queries: list[TokenizedQuery], pad_id: int
) -> Tensor:
    """Preconditioned query vectors `[n_queries, D]`."""
    return curvature.vectors(query_capture(sketcher, queries, pad_id))


@dataclass(frozen=True)
class LabeledQuery:
    """A query from a queries file; `gold` lists the documents known to teach the fact."""

    id: str
    query: Query
    gold: list[str] = field(default_factory=list)


def _labeled_query(record: object, where: str) -> LabeledQuery:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    for key in ("id", "prompt", "completion"):
        if not isinstance(record.get(key), str | int) or isinstance(record.get(key), bool):
            raise InvalidInputError(f"{where}: missing or non-string {key!r}")
    gold = record.get("gold") or []
    if not isinstance(gold, list) or not all(isinstance(g, str | int) for g in gold):
        raise InvalidInputError(f"{where}: 'gold' must be a list of document ids")
    query = Query(str(record["prompt"]), str(record["completion"]))
    return LabeledQuery(str(record["id"]), query, [str(g) for g in gold])


def read_queries(path: Path) -> list[LabeledQuery]:
    """Queries from JSONL: `{"id", "prompt", "completion", "gold": [doc ids, optional]}` a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidInputError(f"cannot read queries file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"queries file {path} is not UTF-8 (byte {e.start})") from e
    queries, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{where}: not valid JSON ({e.msg})") from e
        labeled = _labeled_query(record, where)
        if labeled.id in seen:
            raise InvalidInputError(f"{where}: duplicate query id {labeled.id!r}")
        seen.add(labeled.id)
        queries.append(labeled)
    if not queries:
        raise InvalidInputError(f"queries file has no queries: {path}")
    return queries
