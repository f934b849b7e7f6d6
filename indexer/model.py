"""Loading a local Hugging Face causal LM, fingerprinting it, and choosing the tracked modules."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from indexer.config import DEFAULT_MAX_LENGTH
from indexer.errors import InvalidInputError
from indexer.experts import ExpertMatrix, expert_matrices, is_fused_experts, is_router
from indexer.hashing import sha256_files
from indexer.manifest import Coverage

log = logging.getLogger(__name__)

TRACKABLE_TYPES = (nn.Linear, Conv1D)
# A tracked linear map: a Linear or Conv1D module, a router (a module with a `weight [experts,
# hidden]`), or one expert's matrix of fused expert weights.
Tracked = nn.Module | ExpertMatrix


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
    config_sha256: str


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


def config_sha256(model_dir: Path) -> str:
    """sha256 of config.json: the same weights give other gradients under another
    architecture setting (activation, norm epsilon, ...)."""
    return sha256_files([model_dir / "config.json"])


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
    model.to(_device(device)).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH
    )
    return LoadedModel(
        model,
        tokenizer,
        model_dir,
        sha,
        tokenizer_sha256(model_dir),
        int(context),
        config_sha256(model_dir),
    )


def _device(name: str) -> torch.device:
    """`name` as a torch device this machine has; InvalidInputError otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidInputError(f"unknown device {name!r}: use cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} asked for, but this torch has no CUDA device")
    return device


def module_shape(module: Tracked) -> ModuleShape:
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
    else:
        d_out, d_in = module.weight.shape
    has_bias = getattr(module, "bias", None) is not None  # a router may have none
    return ModuleShape(d_in=d_in + int(has_bias), d_out=d_out, has_bias=has_bias)


def _block_list_name(model: nn.Module) -> str:
    """The largest ModuleList: the transformer's stack of blocks."""
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise InvalidInputError("model has no stack of transformer blocks (no nn.ModuleList)")
    return max(lists)[1]


def _routers(model: nn.Module) -> set[nn.Module]:
    """The routers of the model's fused experts (`experts.is_router`)."""
    return {
        child
        for parent in model.modules()
        for experts in parent.children()
        if is_fused_experts(experts)
        for child in parent.children()
        if child is not experts and is_router(child, experts)
    }


def trackable_modules(model: nn.Module) -> dict[str, Tracked]:
    """Every linear map the sketch can track, by name, in the model's order: Linear / Conv1D
    modules, routers, and each expert's matrices of fused experts (`<experts>.<parameter>.<e>`,
    `indexer.experts`)."""
    routers = _routers(model)
    found: dict[str, Tracked] = {}
    for name, module in model.named_modules():
        if isinstance(module, TRACKABLE_TYPES) or module in routers:
            found[name] = module
        elif is_fused_experts(module):
            found |= expert_matrices(name, module)
    return found


def tracked_modules(model: nn.Module, pattern: str | None = None) -> dict[str, Tracked]:
    """The linear maps to sketch, by name (`trackable_modules`).

    Default: every one inside the transformer blocks (not embeddings, not the LM head).
    `pattern` (a regex searched in the full name) replaces the default choice.
    """
    trackable = trackable_modules(model)
    if pattern is None:
        prefix = _block_list_name(model) + "."
        chosen = {n: m for n, m in trackable.items() if n.startswith(prefix)}
    else:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise InvalidInputError(f"--modules is not a valid regex ({e}): {pattern!r}") from e
        chosen = {n: m for n, m in trackable.items() if regex.search(n)}
    if not chosen:
        what = f"matching {pattern!r}" if pattern else "inside its transformer blocks"
        kinds = "Linear/Conv1D modules, routers or experts"
        raise InvalidInputError(f"model has no {kinds} {what} to track")
    return chosen


def modules_named(model: nn.Module, names: Iterable[str]) -> dict[str, Tracked]:
    """The tracked modules `names` (a version's), in that order; KeyError names one the model
    lacks."""
    trackable = trackable_modules(model)
    return {name: trackable[name] for name in names}


def layer_pattern(name: str) -> str:
    """`name` with its layer (and expert) indices replaced by `*`: `h.*.mlp.c_fc`."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _parameter_elements(name: str, module: Tracked) -> dict[str, int]:
    """The elements of each model parameter (by full name) that tracked module `name` holds."""
    if isinstance(module, ExpertMatrix):
        fused = name.rsplit(".", 1)[0]
        elements = {fused: module.weight.numel()}
        if module.bias is not None:
            elements[f"{fused}_bias"] = module.bias.numel()
        return elements
    return {f"{name}.{p}": t.numel() for p, t in module.named_parameters(recurse=False)}


def coverage(model: nn.Module, modules: dict[str, Tracked]) -> Coverage:
    """The share of the transformer blocks' parameters that `modules` hold, and the block
    parameters (or parts of them) they leave out, their layer indices as `*`."""
    prefix = _block_list_name(model) + "."
    block = {n: p.numel() for n, p in model.named_parameters() if n.startswith(prefix)}
    held: dict[str, int] = {}
    for name, module in modules.items():
        for parameter, elements in _parameter_elements(name, module).items():
            held[parameter] = held.get(parameter, 0) + elements
    skipped = [n for n, size in block.items() if held.get(n, 0) < size]
    return Coverage(
        tracked=sum(min(held.get(n, 0), size) for n, size in block.items()),
        total=sum(block.values()),
        skipped=tuple(dict.fromkeys(layer_pattern(n) for n in skipped)),
    )


def log_coverage(coverage: Coverage) -> None:
    """One line: a warning when under half of the blocks' parameters are tracked."""
    if coverage.share < 0.5:
        log.warning("tracking only %s: choose what to track with --modules", coverage)
    else:
        log.info("tracking %s", coverage)
