"""Turning (prompt, completion) queries into token batches and preconditioned query vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from indexer.curvature import Curvature
from indexer.errors import InvalidInputError
from indexer.sketch import Capture, GradientSketcher, TokenBatch, make_batch


@dataclass(frozen=True)
class EncodedQuery:
    """Token ids of prompt then completion; the loss covers positions `>= loss_start`."""

    token_ids: list[int]
    loss_start: int

    @property
    def n_completion_tokens(self) -> int:
        return len(self.token_ids) - self.loss_start


def encode_query(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> EncodedQuery:
    """Tokenize prompt (with the tokenizer's special prefix) and completion separately.

    Separate tokenization keeps the prompt/completion boundary exact: no completion token ever
    merges with the prompt's last characters.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise InvalidInputError("completion is empty: the query loss needs at least one token")
    if not prompt_ids:
        raise InvalidInputError("prompt is empty and the tokenizer adds no BOS token to start from")
    total = len(prompt_ids) + len(completion_ids)
    if total > max_length:
        raise InvalidInputError(
            f"prompt + completion is {total} tokens; this index's limit is {max_length} tokens"
        )
    return EncodedQuery(prompt_ids + completion_ids, len(prompt_ids))


def query_token_batch(queries: list[EncodedQuery], pad_id: int) -> TokenBatch:
    return make_batch(
        [q.token_ids for q in queries], [q.loss_start for q in queries], pad_id, [0] * len(queries)
    )


def query_capture(sketcher: GradientSketcher, queries: list[EncodedQuery], pad_id: int) -> Capture:
    """One forward/backward of the completion-only loss for the whole batch of queries."""
    return sketcher.run(query_token_batch(queries, pad_id), "data")


def query_vectors(
    sketcher: GradientSketcher, curvature: Curvature, queries: list[EncodedQuery], pad_id: int
) -> Tensor:
    """Preconditioned query vectors `[n_queries, D]`."""
    return curvature.vectors(query_capture(sketcher, queries, pad_id))


def token_influence(capture: Capture, curvature: Curvature, query_vector: Tensor) -> Tensor:
    """Per-token influence `[batch, tokens]` of training sequences on one query.

    `⟨q, v_n⟩ = Σ_l ⟨M_l, S_n,l⟩` with `M_l = U_B (q_l / sqrt(Λ+λ)) U_Aᵀ`, and `S_n = Σ_t g_t a_tᵀ`,
    so token t contributes `Σ_l g_tᵀ M_l a_t`; the tokens sum to the example's score.
    """
    slices = curvature.layer_slices()
    total = 0
    for name, module in curvature.modules.items():
        m = module.unrotate(query_vector[slices[name]].unsqueeze(0))[0]
        total = total + torch.einsum(
            "bto,oi,bti->bt", capture.gradients[name], m, capture.activations[name]
        )
    return total
