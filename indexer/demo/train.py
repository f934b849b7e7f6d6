"""Train the demo tokenizer and a small GPT-2 on the synthetic corpus, on CPU, deterministically.

The result is cached: a finished model directory carries a marker JSON (written last) holding the
hash of every setting that shaped it, and is built under a temporary name and renamed into place,
so a killed run never leaves something that looks finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from indexer.demo.corpus import DEFAULT_N_ENTITIES, DemoCorpus, generate_corpus, write_corpus

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MARKER_NAME = "demo.json"
# Bump when a code change alters what gets trained, so stale caches are not reused.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class DemoTrainingConfig:
    """Corpus size, tokenizer, model shape and optimisation settings of the demo model."""

    n_entities: int = DEFAULT_N_ENTITIES
    vocab_size: int = 2048
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128
    epochs: int = 16
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    # One intra-op thread: the matrices are too small to gain from more, results do not depend on
    # the machine's core count, and it avoids the heavy slowdown of oversubscribed cores.
    num_threads: int = 1
    # True: the tokenizer prepends BOS and each document is trained on alone (the demo).
    # False: GPT-2's conventions: the tokenizer adds nothing, and training packs the documents
    # into full windows, each document preceded by the separator `<|endoftext|>`; index such a
    # model with `--prefix-token '<|endoftext|>'`.
    add_bos: bool = True


# Fields added after FORMAT_VERSION 2 enter the settings hash only when they differ from their
# default, so the caches of earlier configurations stay valid.
_HASHED_WHEN_SET = ("add_bos",)


@dataclass(frozen=True)
class DemoArtifacts:
    """Where the demo model and its corpus live, and how well the model learned the facts.

    ``fact_accuracy`` is the fraction (0..1) of queries answered exactly by greedy decoding;
    ``train_seconds`` is the wall time of tokenizer plus model training when it was built.
    """

    model_dir: Path
    corpus_path: Path
    queries_path: Path
    fact_accuracy: float
    train_seconds: float


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int, add_bos: bool = True
) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose ``add_special_tokens=True`` prepends the bos token and nothing else
    (with ``add_bos``), or adds nothing at all (without, as GPT-2's tokenizer).

    bos and eos are the same token (id 0); pad is id 1. ``max_length`` becomes
    ``model_max_length`` (tokens).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        padding_side="right",
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """``save_pretrained``, naming the class so transformers 4.x can load the tokenizer as well.

    transformers 5 records its ``TokenizersBackend`` class, which 4.x does not know; both accept
    ``PreTrainedTokenizerFast``.
    """
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def encode_windows(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], window: int
) -> list[list[int]]:
    """Tokenise each text with bos and cut it into consecutive windows of at most ``window`` ids."""
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    return [ids[i : i + window] for ids in encoded for i in range(0, len(ids), window)]


def encode_packed(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], window: int
) -> list[list[int]]:
    """GPT-2-style packing: every text preceded by the separator (bos = eos), all concatenated
    and cut into consecutive windows of ``window`` ids (only the last one shorter)."""
    separator = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream = [token for ids in encoded for token in (separator, *ids)]
    return [stream[i : i + window] for i in range(0, len(stream), window)]


def training_windows(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], config: DemoTrainingConfig
) -> list[list[int]]:
    """The training windows the config asks for: one text per window run, or packed."""
    encode = encode_windows if config.add_bos else encode_packed
    return encode(tokenizer, texts, config.n_positions)


def prompt_prefix(tokenizer: PreTrainedTokenizerFast, config: DemoTrainingConfig) -> list[int]:
    """Token ids a query's prompt starts with, as documents started in training: the bos the
    tokenizer adds, or (without) the separator."""
    if config.add_bos:
        return list(tokenizer("", add_special_tokens=True)["input_ids"])
    return [tokenizer.convert_tokens_to_ids(BOS_TOKEN)]


def epoch_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffled batches of window indices, grouped by similar length to waste little padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = 16 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(windows: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest window: ``input_ids``, ``attention_mask``, ``labels`` [B, T].

    Labels are -100 on padding so padding adds nothing to the loss.
    """
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[row, : len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def build_model(config: DemoTrainingConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A fresh GPT-2; dropout is off because the point is to memorise the facts."""
    gpt_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(gpt_config)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (e.g. while saving) for the block."""
    previous = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if previous else hf_logging.disable_progress_bar)()


def next_token_loss(model: GPT2LMHeadModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL (nats) of each token given its prefix, over non-padding targets of [B, T] inputs."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train_model(
    model: GPT2LMHeadModel,
    windows: Sequence[list[int]],
    config: DemoTrainingConfig,
    *,
    pad_id: int,
    seed: int,
    progress: bool,
) -> float:
    """Train in place with AdamW; returns the mean token loss (nats) of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(w) for w in windows]
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total, max(1, int(config.warmup_fraction * total)))
    )
    model.train()
    bar = tqdm(total=total, desc="training demo model", unit="step", disable=not progress)
    epoch_loss = math.nan
    for epoch in range(config.epochs):
        loss_sum, token_sum = 0.0, 0
        for batch in epoch_batches(lengths, config.batch_size, generator):
            inputs = collate([windows[i] for i in batch], pad_id)
            loss = next_token_loss(model, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            n_targets = int((inputs["labels"][:, 1:] != -100).sum())
            loss_sum += loss.item() * n_targets
            token_sum += n_targets
            bar.update(1)
        epoch_loss = loss_sum / token_sum
        bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
        logger.debug("epoch %d: mean token loss %.4f", epoch + 1, epoch_loss)
    bar.close()
    model.eval()
    return epoch_loss


@torch.no_grad()
def greedy_matches(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    completion: str,
    prefix: Sequence[int] | None = None,
) -> bool:
    """Whether greedy decoding after ``prompt`` reproduces ``completion``'s tokens. The prompt
    starts with ``prefix``, by default with the tokenizer's special tokens (bos)."""
    if prefix is None:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = [*prefix, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    target = tokenizer(completion, add_special_tokens=False)["input_ids"]
    for expected in target:
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        if int(logits.argmax()) != expected:
            return False
        ids.append(expected)
    return True


def fact_accuracy(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    queries: Sequence[dict],
    prefix: Sequence[int] | None = None,
) -> float:
    """Fraction of queries whose completion the model reproduces greedily (0..1)."""
    model.eval()
    hits = sum(
        greedy_matches(model, tokenizer, q["prompt"], q["completion"], prefix) for q in queries
    )
    return hits / len(queries)


def _hashed_config(config: DemoTrainingConfig) -> dict:
    """The config's fields as hashed: later fields only when they differ from their default."""
    values = asdict(config)
    for f in fields(DemoTrainingConfig):
        if f.name in _HASHED_WHEN_SET and values[f.name] == f.default:
            del values[f.name]
    return values


def settings_hash(seed: int, config: DemoTrainingConfig) -> str:
    """sha256 (hex) of everything that determines the trained artifacts."""
    settings = {"format": FORMAT_VERSION, "seed": seed, "config": _hashed_config(config)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_finished(run_dir: Path, digest: str) -> DemoArtifacts | None:
    """The artifacts in ``run_dir`` if its marker says they were finished for ``digest``."""
    try:
        marker = json.loads((run_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("settings_hash") != digest:
        return None
    return DemoArtifacts(
        model_dir=run_dir / "model",
        corpus_path=run_dir / "corpus.jsonl",
        queries_path=run_dir / "queries.jsonl",
        fact_accuracy=float(marker["fact_accuracy"]),
        train_seconds=float(marker["train_seconds"]),
    )


def _build(
    run_dir: Path, corpus: DemoCorpus, seed: int, config: DemoTrainingConfig, progress: bool
) -> dict:
    """Write the corpus, train tokenizer and model into ``run_dir``; returns marker fields."""
    write_corpus(corpus, run_dir)
    texts = [d["text"] for d in corpus.documents]
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, config.vocab_size, config.n_positions, config.add_bos)
    windows = training_windows(tokenizer, texts, config)
    # Seed a forked RNG so the caller's global torch RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config, tokenizer)
    logger.info(
        "training demo model: %d documents, %d windows, %d tokens, %.2fM parameters, vocab %d",
        len(texts),
        len(windows),
        sum(len(w) for w in windows),
        model.num_parameters() / 1e6,
        len(tokenizer),
    )
    with _torch_threads(config.num_threads):
        final_loss = train_model(
            model, windows, config, pad_id=tokenizer.pad_token_id, seed=seed, progress=progress
        )
        train_seconds = time.perf_counter() - started
        prefix = None if config.add_bos else prompt_prefix(tokenizer, config)
        accuracy = fact_accuracy(model, tokenizer, corpus.queries, prefix)
    model_dir = run_dir / "model"
    with _transformers_progress(progress):
        model.save_pretrained(model_dir, safe_serialization=True)
    save_tokenizer(tokenizer, model_dir)
    return {
        "fact_accuracy": accuracy,
        "train_seconds": round(train_seconds, 3),
        "final_loss": final_loss,
        "n_documents": len(texts),
        "n_queries": len(corpus.queries),
    }


def ensure_demo_model(
    cache_dir: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    config: DemoTrainingConfig | None = None,
) -> DemoArtifacts:
    """Return the cached demo model for these settings, training it first if needed.

    Artifacts live in ``cache_dir/demo-seed<seed>-<hash12>/``: ``model/`` (safetensors weights and
    tokenizer), ``corpus.jsonl``, ``queries.jsonl`` and the marker ``demo.json``.
    """
    config = config or DemoTrainingConfig()
    digest = settings_hash(seed, config)
    run_dir = Path(cache_dir) / f"demo-seed{seed}-{digest[:12]}"
    return ensure_trained_model(
        run_dir,
        digest,
        lambda: generate_corpus(seed=seed, n_entities=config.n_entities),
        seed=seed,
        config=config,
        progress=progress,
    )


def ensure_trained_model(
    run_dir: Path,
    digest: str,
    make_corpus: Callable[[], DemoCorpus],
    *,
    seed: int,
    config: DemoTrainingConfig,
    progress: bool,
) -> DemoArtifacts:
    """The model cached in ``run_dir`` if its marker holds ``digest``; otherwise train it on
    ``make_corpus()`` first (built under a temporary name, then renamed into place).

    ``digest`` must hash everything that determines the artifacts, the corpus included.
    """
    found = _read_finished(run_dir, digest)
    if found is not None:
        logger.info("reusing demo model in %s", run_dir)
        return found
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    # mkdtemp makes the directory private; the model is meant to be readable by other users.
    tmp_dir.chmod(0o755)
    try:
        built = _build(tmp_dir, make_corpus(), seed, config, progress)
        marker = {"settings_hash": digest, "seed": seed, "config": asdict(config), **built}
        (tmp_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2))
        _publish(tmp_dir, run_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        "demo model ready in %s (fact accuracy %.3f, %.1f s)",
        run_dir,
        built["fact_accuracy"],
        built["train_seconds"],
    )
    found = _read_finished(run_dir, digest)
    if found is None:
        raise RuntimeError(f"demo model in {run_dir} has no valid marker after training")
    return found


def _publish(tmp_dir: Path, run_dir: Path) -> None:
    """Rename the finished build into place, replacing a leftover unfinished directory."""
    if run_dir.exists() and not (run_dir / MARKER_NAME).exists():
        shutil.rmtree(run_dir)
    try:
        os.rename(tmp_dir, run_dir)
    except OSError:
        # A concurrent build finished first; its result is equivalent, so keep it.
        if not (run_dir / MARKER_NAME).exists():
            raise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m indexer.demo.train --cache-dir DIR``: build or reuse, print artifacts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    artifacts = ensure_demo_model(args.cache_dir, seed=args.seed, progress=not args.quiet)
    report = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(artifacts).items()}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
