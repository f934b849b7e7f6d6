"""Tiny models built in the tests themselves (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB = 40

# Two-block random configurations per architecture, `width` wide; MoE families with four
# experts, two per token (Qwen2-MoE also has its shared expert and its gate).
_ATTENTION = {"num_attention_heads": 2, "num_key_value_heads": 2}
_MOE = {"num_experts_per_tok": 2, "norm_topk_prob": True}
ARCHITECTURES: dict[str, dict] = {
    "llama": {"intermediate_size": 2, **_ATTENTION},
    "gpt_neox": {"intermediate_size": 2, "num_attention_heads": 2},
    "qwen2": {"intermediate_size": 2, **_ATTENTION},
    "mixtral": {
        "intermediate_size": 1,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        **_ATTENTION,
    },
    "qwen2_moe": {
        "moe_intermediate_size": 1,
        "shared_expert_intermediate_size": 1,
        "num_experts": 4,
        **_MOE,
        **_ATTENTION,
    },
    "olmoe": {"intermediate_size": 1, "num_experts": 4, **_MOE, **_ATTENTION},
    "qwen3_moe": {"moe_intermediate_size": 1, "num_experts": 4, **_MOE, **_ATTENTION},
    # Experts stored transposed, with biases; a router with a bias; attention sinks (skipped).
    "gpt_oss": {
        "intermediate_size": 1,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "layer_types": ["full_attention"] * 2,
        **_ATTENTION,
    },
    # Shared experts beside the routed ones; low-rank attention projections.
    "deepseek_v3": {
        "moe_intermediate_size": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "q_lora_rank": 8,
        "kv_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        **_ATTENTION,
    },
}
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "gpt_oss", "deepseek_v3")


def tiny_causal_lm(
    architecture: str, width: int = 64, vocab: int = VOCAB, seed: int = 0, **extra
) -> PreTrainedModel:
    """A random 2-block `architecture` model, `width` wide; its `*intermediate_size` settings
    are multiples of `width`."""
    settings = {
        k: v * width if k.endswith("intermediate_size") else v
        for k, v in ARCHITECTURES[architecture].items()
    }
    config = AutoConfig.for_model(
        architecture,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        hidden_size=width,
        num_hidden_layers=2,
        max_position_embeddings=64,
        **settings,
        **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def tiny_gpt2(seed: int = 0, n_embd: int = 16, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_sequences(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]
