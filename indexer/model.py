"""Loading a local Hugging Face causal LM, fingerprinting it, and choosing the tracked modules."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from indexer.config import DEFAULT_MAX_LENGTH
from indexer.errors import InvalidInputError
from indexer.hashing import sha256_files

log = logging.getLogger(__name__)

TRACKABLE_TYPES = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class ModuleShape:
    """A tracked module's gradient shape: `d_out x d_in` (d_in counts the appended 1 of a bias)."""

    d_in: int
    d_out: int
    has_bias: bool


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path
    weights_sha256: str
    tokenizer_sha256: str
    context_length: int


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files; refuses directories that only hold pickled weights."""
    if not model_dir.is_dir():
        raise InvalidInputError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise InvalidInputError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        found = f" (found {', '.join(others)})" if others else ""
        raise InvalidInputError(f"model has no .safetensors weights{found}; only safetensors load")
    return files


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the model's safetensors files in name order: the identity of its weights."""
    return sha256_files(weight_files(model_dir))


def tokenizer_sha256(model_dir: Path) -> str:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
    return sha256_files([model_dir / n for n in names if (model_dir / n).is_file()])


def load_model(model_dir: Path | str, device: str = "cpu") -> LoadedModel:
    """Load weights (float32, eval mode, no parameter gradients) and tokenizer from a local dir."""
    model_dir = Path(model_dir)
    sha = weights_sha256(model_dir)
    hf_logging.disable_progress_bar()  # one weight file loads in milliseconds; the bar is noise
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot load model from {model_dir}: {e}") from e
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH
    )
    return LoadedModel(model, tokenizer, model_dir, sha, tokenizer_sha256(model_dir), int(context))


def module_shape(module: nn.Module) -> ModuleShape:
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
    else:
        d_out, d_in = module.weight.shape
    has_bias = module.bias is not None
    return ModuleShape(d_in=d_in + int(has_bias), d_out=d_out, has_bias=has_bias)


def _block_list_name(model: nn.Module) -> str:
    """The largest ModuleList: the transformer's stack of blocks."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise InvalidInputError("model has no stack of transformer blocks (no nn.ModuleList)")
    return max(lists)[1]


def tracked_modules(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """Linear / Conv1D modules to sketch, by name.

    Default: every one inside the transformer blocks (not embeddings, not the LM head).
    `pattern` (a regex searched in the full module name) replaces the default choice.
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, TRACKABLE_TYPES)}
    if pattern is None:
        prefix = _block_list_name(model) + "."
        chosen = {n: m for n, m in linear.items() if n.startswith(prefix)}
    else:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise InvalidInputError(f"--modules is not a valid regex ({e}): {pattern!r}") from e
        chosen = {n: m for n, m in linear.items() if regex.search(n)}
    if not chosen:
        what = f"matching {pattern!r}" if pattern else "inside its transformer blocks"
        raise InvalidInputError(f"model has no Linear/Conv1D modules {what} to track")
    return chosen
