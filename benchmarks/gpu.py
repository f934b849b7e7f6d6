"""Every GPU figure of issue 13 in one bounded run, printed as JSON (and written with --out).

    python -m benchmarks.gpu --device cuda --budget-s 360 --out gpu.json    # on a GPU host
    .venv/bin/python -m benchmarks.gpu --device cpu --small \\
        --out benchmarks/results/gpu-cpu-smoke.json                          # CPU smoke test
    .venv/bin/python -m benchmarks.gpu --device cpu --sections fidelity \\
        --out benchmarks/results/autocast-fidelity-cpu.json                  # bf16 cost, CPU

The model is GPT-2-small-shaped (`--shape 12x768`: 48 tracked modules) with random weights
(the demo generator's `build_model`) and a demo-style BPE tokenizer trained here (vocabulary
2,048, like the demo's: GPT-2's 50,257 would make the LM head dearer); its sketch is the
default budget's allocation (`indexer.budget`, D from it unless `--dim`). Sections, each in a
child process with its share of `--budget-s` (time a section leaves goes to the next; a
section that fails or runs out of time is recorded with its reason, and what it measured
before that is kept):

- `gradient`: a query's gradient stage (forward/backward, sketch, preconditioning), batch of
  one, sketch-only and with the unprojected capture the exact stage needs: p50 ms.
- `scan`: `indexer.scan.CodeScan` over `--examples` synthetic 8-bit codes of dimension D
  (scaled down to what the device's memory holds), top-200 as the engine asks: p50 per query at
  batches 1 and 32, and its agreement with a float64 decode of the codes.
- `rerank`: `indexer.exact.ExactReranker` of K′ (`--depths`) candidates of `--candidate-tokens`
  random tokens; full factors of the right shapes with identity eigenbases (timing only: their
  values do not change the cost): p50 ms.
- `build`: the main pass's tokens/s (`build_index` on `--build-documents` demo-style
  documents) against a bare forward/backward over the same examples, float32 and bf16
  autocast.
- `fidelity`: the demo model's index built with and without bf16 autocast: top-10 agreement
  of their sketch-only answers to the demo queries, and the correlation of their sketch
  scores of every example.

`gradient` and `rerank` run at torch's default float32 matmul precision ("highest", what the
library runs at) and at "high" (TF32 on GPUs). `targets` combines the sections as an answer
adds them up: sketch-only = gradient + scan; default answer = gradient (unprojected) + scan +
re-rank of K′. On `--device cpu` every figure is labelled a CPU smoke test, not a GPU figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.budget_cost import HEAD_WIDTH, random_model
from benchmarks.build_throughput import bare_forward_backward_seconds
from benchmarks.common import comma_ints, demo_artifacts, emit, synthetic_corpus
from indexer.budget import module_ranks, total_dim
from indexer.build import build_index
from indexer.config import (
    Autocast,
    BuildConfig,
    CalibrationConfig,
    CorpusConfig,
    CurvatureConfig,
    ScoreKind,
    SketchConfig,
    StoreConfig,
)
from indexer.curvature import Curvature, ModuleCurvature
from indexer.demo.corpus import generate_corpus
from indexer.demo.train import save_tokenizer, train_tokenizer
from indexer.engine import QueryEngine
from indexer.exact import ExactReranker
from indexer.model import load_model, module_shape, tracked_modules
from indexer.query import Query, query_capture, read_queries, tokenize_query
from indexer.scan import CodeScan
from indexer.sketch import GradientSketcher, Projection, gaussian_projection

SECTIONS = ("gradient", "scan", "rerank", "build", "fidelity")
SHARES = {"gradient": 1.5, "scan": 2.0, "rerank": 1.5, "build": 4.0, "fidelity": 2.0}
PRECISIONS = ("highest", "high")  # float32 matmuls: exact, or TF32 on GPUs
SEARCH_K = 200  # what the engine asks of the index at the default re-rank depth
QUERY_BATCH = 32
CHECK_ROWS = 1024  # rows of the scan's check against a float64 decode
MEMORY_SHARE = 0.6  # of the device's free memory the synthetic codes may take
CPU_CODES_BYTES = 2 << 30  # the most synthetic codes a CPU run holds
DEMO_VOCAB = 2048
CONTEXT = 128  # the demo generator's context, tokens
BUILD_BATCH = 16  # the build's default batch, and the bare pass's
BUILD_CALIBRATION_QUERIES = 8  # of the default 32: the build section's time goes to its passes

# Sizes by mode: full (a GPU host) or --small (a CPU smoke test)
SIZES = {
    False: {
        "shape": "12x768",
        "examples": 1_000_000,
        "candidate_tokens": 64,
        "build_documents": 2000,
        "fit_examples": 500,
        "fidelity_documents": 0,  # 0: the whole demo corpus
        "repeats": 20,
    },
    True: {
        "shape": "2x128",
        "examples": 2000,
        "candidate_tokens": 32,
        "build_documents": 60,
        "fit_examples": 30,
        "fidelity_documents": 150,
        "repeats": 3,
    },
}


class Recorder:
    """A section's results, rewritten to `path` as JSON after each one (what a killed child
    leaves is read back by the parent)."""

    def __init__(self, path: Path):
        self.path, self.results = path, {}

    def __setitem__(self, key: str, value: object) -> None:
        self.results[key] = value
        self.path.write_text(json.dumps(self.results, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.section:
        run_section(args)
        return 0
    emit(run_all(args, argv), args.out)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU smoke-test sizes")
    parser.add_argument("--budget-s", type=float, default=360.0, help="wall time of all sections")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--shape", help="LAYERSxWIDTH (default 12x768; --small 2x128)")
    parser.add_argument("--dim", type=int, help="code dimension (default: the budget's D)")
    parser.add_argument("--examples", type=int, help="synthetic codes scanned (default 1M)")
    parser.add_argument("--depths", type=comma_ints, default=(50, 200), help="K′ re-ranked")
    parser.add_argument("--candidate-tokens", type=int)
    parser.add_argument("--build-documents", type=int)
    parser.add_argument("--fit-examples", type=int, help="the build section's curvature fit")
    parser.add_argument("--fidelity-documents", type=int, help="0: the whole demo corpus")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here (after each section)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child: run this one section
    parser.add_argument("--partial", type=Path, help=argparse.SUPPRESS)  # where it records
    parser.add_argument("--section-budget-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)  # shared by sections
    args = parser.parse_args(argv)
    for name, value in SIZES[args.small].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# The parent: sections in child processes, each bounded ---------------------------------------


def run_all(args: argparse.Namespace, argv: list[str]) -> dict:
    cpu = torch.device(args.device).type == "cpu"
    result = {
        "benchmark": "gpu",
        "label": "CPU smoke test: not GPU figures" if cpu else "GPU figures",
        "command": "python -m benchmarks.gpu " + " ".join(argv),
        "environment": environment(args.device),
        "budget_s": args.budget_s,
        "sections": {},
    }
    wanted = [s for s in args.sections.split(",") if s]
    unavailable = device_unavailable(args.device)
    end = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu-models-") as models:
        for k, name in enumerate(wanted):
            if unavailable:
                result["sections"][name] = {"status": f"skipped: {unavailable}"}
                continue
            share = SHARES[name] / sum(SHARES[s] for s in wanted[k:])
            budget = share * (end - time.monotonic())
            result["sections"][name] = run_child(name, [*argv, "--models-dir", models], budget)
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["targets"] = targets(result["sections"])
    return result


def run_child(name: str, argv: list[str], budget_s: float) -> dict:
    """One section in a child process killed after `budget_s`: its results, status, seconds."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-{name}-") as tmp:
        partial = Path(tmp) / "partial.json"
        command = [sys.executable, "-m", "benchmarks.gpu", *argv, "--section", name,
                   "--partial", str(partial), "--section-budget-s", f"{budget_s:.0f}"]  # fmt: skip
        start = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=budget_s)
            status = "ok" if done.returncode == 0 else f"failed: {last_line(done.stderr)}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {budget_s:.0f} s (results before that kept)"
        seconds = round(time.monotonic() - start, 1)
        found = json.loads(partial.read_text()) if partial.exists() else {}
    return {"status": status, "seconds": seconds, "budget_s": round(budget_s, 1), **found}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-500:] if lines else "no error output"


def device_unavailable(device: str) -> str:
    """Why `device` cannot run the sections ("" when it can)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return f"--device {device} but torch {torch.__version__} sees no CUDA device"
    return ""


def environment(device: str) -> dict:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        found.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return found


def targets(sections: dict) -> dict:
    """Issue 13's GPU targets from the sections' figures (None where a part is missing): an
    answer's stages, added up, at the library's default float32 precision."""

    def get(*path: str) -> float | None:
        value = sections
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    scan = get("scan", "batch_1", "p50_ms")
    sketch = get("gradient", "highest", "sketch_only", "p50_ms")
    unprojected = get("gradient", "highest", "with_unprojected", "p50_ms")
    found: dict = {"sketch_only_ms": _sum(sketch, scan), "sketch_only_target_ms": 20}
    for depth, stage in (get("rerank", "highest") or {}).items():
        total = _sum(unprojected, scan, stage.get("p50_ms"))
        found[f"default_answer_ms_{depth}"] = total
    found["default_answer_target_ms"] = 100
    found["build_main_pass_vs_bare"] = get("build", "off", "ratio_main_pass_vs_bare")
    found["build_target_ratio"] = 0.8
    return found


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else round(sum(values), 2)


# A child: one section ------------------------------------------------------------------------


def run_section(args: argparse.Namespace) -> None:
    record = Recorder(args.partial)
    deadline = time.monotonic() + 0.8 * (args.section_budget_s or args.budget_s)
    with tempfile.TemporaryDirectory(prefix=f"gpu-{args.section}-") as tmp:
        SECTION_RUNS[args.section](args, record, deadline, Path(tmp))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def p50_ms(run: Callable[[], object], device: torch.device, repeats: int, deadline: float) -> dict:
    """Median wall ms of `run()` (finished on the device) over up to `repeats` calls after a
    warm-up call, fewer once `deadline` (`time.monotonic()`) has passed."""
    run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if time.monotonic() > deadline:
            break
    return {"p50_ms": round(float(np.median(times)), 3), "runs": len(times)}


def shape_of(args: argparse.Namespace) -> tuple[int, int]:
    layers, width = (int(v) for v in args.shape.split("x"))
    return layers, width


def demo_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer like the demo's (vocabulary 2,048), trained on the demo
    corpus's texts in seconds, saved in `directory`."""
    texts = [d["text"] for d in generate_corpus(seed=0).documents]
    save_tokenizer(train_tokenizer(texts, DEMO_VOCAB, CONTEXT), directory)
    return directory


def shape_model(args: argparse.Namespace, work: Path) -> Path:
    """The `--shape` GPT-2 with random weights, saved in `--models-dir` (shared by the
    sections of a run, so made once) or `work`: its directory, renamed into place when
    complete (a killed section leaves none half-written)."""
    root = args.models_dir or work
    directory = root / f"model-{args.shape}"
    if not directory.exists():
        staging = root / f".model-{args.shape}-{os.getpid()}"
        random_model(staging, *shape_of(args), demo_tokenizer(staging / "tokenizer"))
        staging.rename(directory)
    return directory


def default_ranks(model: torch.nn.Module) -> dict:
    """The default budget's `r_out x r_in` per tracked module of `model`."""
    shapes = {n: module_shape(m) for n, m in tracked_modules(model).items()}
    return module_ranks(shapes, SketchConfig())


def synthetic_curvature(model: torch.nn.Module, ranks: dict | None):
    """EK-FAC factors of the right shapes for timing only (identity eigenbases, unit
    eigenvalues): the sketch's at `ranks` (projections as a build draws them), or the full
    space's (no projection) when `ranks` is None."""
    modules = {}
    for name, module in tracked_modules(model).items():
        shape = module_shape(module)
        if ranks is None:
            projection, r_out, r_in = Projection(None, None), shape.d_out, shape.d_in
        else:
            r_out, r_in = ranks[name].rank_out, ranks[name].rank_in
            projection = gaussian_projection(name, module, r_in, r_out, seed=0)
        device = module.weight.device
        modules[name] = ModuleCurvature(
            projection,
            torch.eye(r_in, device=device),
            torch.eye(r_out, device=device),
            torch.ones(r_out, r_in, device=device),
            0.1,
        )
    return Curvature(modules)


def demo_queries(tokenizer) -> list:
    """The demo's fact queries, tokenized."""
    queries = generate_corpus(seed=0).queries
    return [
        tokenize_query(tokenizer, Query(q["prompt"], q["completion"]), CONTEXT) for q in queries
    ]


def section_gradient(args, record: Recorder, deadline: float, work: Path) -> None:
    loaded = load_model(shape_model(args, work), args.device)
    curvature = synthetic_curvature(loaded.model, default_ranks(loaded.model))
    record["dim"] = curvature.dim
    named = dict(loaded.model.named_modules())
    modules = {n: named[n] for n in curvature.modules}
    sketcher = GradientSketcher(loaded.model, modules, curvature.projections())
    queries, pad = demo_queries(loaded.tokenizer), loaded.tokenizer.pad_token_id
    record["query_tokens_mean"] = float(np.mean([len(q.token_ids) for q in queries]))
    turns = itertools.cycle(queries)

    def gradient(keep: bool) -> Callable[[], object]:
        def run() -> object:  # the engine's gradient stage: vectors back on the host
            capture = query_capture(sketcher, [next(turns)], pad, keep_unprojected=keep)
            return curvature.vectors(capture).cpu()

        return run

    for precision in PRECISIONS:
        torch.set_float32_matmul_precision(precision)
        record[precision] = {
            name: p50_ms(gradient(keep), torch.device(args.device), args.repeats, deadline)
            for name, keep in (("sketch_only", False), ("with_unprojected", True))
        }


def section_scan(args, record: Recorder, deadline: float, work: Path) -> None:
    device = torch.device(args.device)
    dim = args.dim or scan_dim(args)
    rng = np.random.default_rng(0)
    vmin = rng.normal(0, 0.01, dim)
    vdiff = rng.uniform(0.01, 0.1, dim)
    queries = rng.standard_normal((QUERY_BATCH, dim)).astype(np.float32)
    record["dim"] = dim
    record["check_vs_float64_decode"] = scan_check(device, dim, vmin, vdiff, queries[:4])
    n = fitting_examples(args.examples, dim, device)
    record["examples"] = n
    if n < args.examples:
        record["scaled_down_from"] = args.examples
    start = time.perf_counter()
    scan = CodeScan.from_blocks(
        (random_codes(rows, dim, device, seed) for seed, rows in enumerate(blocks_of(n))),
        vmin,
        vdiff,
        np.arange(n),
        device,
    )
    synchronize(device)
    record["load_seconds"] = round(time.perf_counter() - start, 2)
    for batch in (1, QUERY_BATCH):
        timing = p50_ms(
            lambda b=batch: scan.search(queries[:b], SEARCH_K), device, args.repeats, deadline
        )
        timing["p50_ms_per_query"] = round(timing["p50_ms"] / batch, 3)
        timing["codes_gb_per_s"] = round(n * dim / timing["p50_ms"] / 1e6, 1)
        record[f"batch_{batch}"] = timing


def scan_dim(args: argparse.Namespace) -> int:
    """D of the default budget for the `--shape` model (made on the meta device: its module
    shapes, no memory)."""
    layers, width = shape_of(args)
    config = GPT2Config(
        vocab_size=DEMO_VOCAB,
        n_layer=layers,
        n_embd=width,
        n_head=max(width // HEAD_WIDTH, 1),
        bos_token_id=0,  # GPT-2's 50,256 is past this vocabulary
        eos_token_id=0,
    )
    with torch.device("meta"):
        return total_dim(default_ranks(GPT2LMHeadModel(config)))


def fitting_examples(wanted: int, dim: int, device: torch.device) -> int:
    """`wanted`, or as many codes of `dim` bytes as the device's memory holds."""
    if device.type == "cuda":
        room = MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]
    else:
        room = CPU_CODES_BYTES
    return int(min(wanted, room // dim))


def blocks_of(n: int, rows: int = 65_536) -> list[int]:
    return [min(rows, n - start) for start in range(0, n, rows)]


def random_codes(rows: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    """Uniform 8-bit codes `[rows, dim]`, drawn on `device`."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randint(0, 256, (rows, dim), dtype=torch.uint8, device=device, generator=generator)


def scan_check(device, dim: int, vmin, vdiff, queries: np.ndarray) -> dict:
    """The scan's top-10 of CHECK_ROWS random codes against a float64 decode of them."""
    codes = random_codes(CHECK_ROWS, dim, device, seed=10**6)
    scan = CodeScan.from_blocks([codes], vmin, vdiff, np.arange(CHECK_ROWS), device)
    scores, ids = scan.search(queries, 10)
    decoded = torch.as_tensor(vmin, device=device) + (codes.double() + 0.5) / 255 * torch.as_tensor(
        vdiff, device=device
    )
    exact = torch.as_tensor(queries, device=device).double() @ decoded.T
    top = torch.topk(exact, 10, dim=1)
    return {
        "top10_ids_equal": bool((top.indices.cpu().numpy() == ids).all()),
        "max_relative_score_error": float(
            np.abs(scores - top.values.cpu().numpy()).max() / exact.abs().max().item()
        ),
    }


def section_rerank(args, record: Recorder, deadline: float, work: Path) -> None:
    loaded = load_model(shape_model(args, work), args.device)
    device, pad = torch.device(args.device), loaded.tokenizer.pad_token_id
    full = synthetic_curvature(loaded.model, None)
    record["factors"] = "identity eigenbases, unit eigenvalues: timing only"
    record["candidate_tokens"] = args.candidate_tokens
    reranker = ExactReranker(loaded.model, full, pad, batch_size=32)  # EngineOptions' default
    # Its sketcher (no projection) captures what the engine's `keep_unprojected` pass keeps.
    capture = query_capture(reranker.sketcher, demo_queries(loaded.tokenizer)[:1], pad)
    generator = torch.Generator().manual_seed(0)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    tokens = {
        i: torch.randint(2, vocab, (args.candidate_tokens,), generator=generator).tolist()
        for i in range(max(args.depths))
    }
    norms = dict.fromkeys(tokens)

    def stage(depth: int) -> Callable[[], object]:
        wanted = {i: tokens[i] for i in range(depth)}

        def run() -> object:  # targets once per query, then the candidates' pass
            targets = reranker.targets(capture)
            return reranker.score(targets, [list(wanted)], wanted, norms, ScoreKind.INFLUENCE)

        return run

    for precision in PRECISIONS:
        torch.set_float32_matmul_precision(precision)
        record[precision] = {
            f"k{depth}": p50_ms(stage(depth), device, args.repeats, deadline)
            for depth in sorted(args.depths)
        }


def section_build(args, record: Recorder, deadline: float, work: Path) -> None:
    model = shape_model(args, work)
    corpus = synthetic_corpus(work / "corpus.jsonl", args.build_documents)
    record["settings"] = {
        "documents": args.build_documents,
        "fit_examples": args.fit_examples,
        "calibration_queries": BUILD_CALIBRATION_QUERIES,
        "batch_size": BUILD_BATCH,
        "else": "build defaults",
    }
    for mode in Autocast:
        bare = {
            "bare_forward_backward": bare_forward_backward_seconds(
                model, CorpusConfig(str(corpus)), BUILD_BATCH, args.device, mode
            )
        }
        record[str(mode)] = bare  # kept should the build run out of time
        config = BuildConfig(
            model=model,
            out=work / f"root-{mode}",
            corpus=CorpusConfig(str(corpus)),
            curvature=CurvatureConfig(fit_examples=args.fit_examples),
            calibration=CalibrationConfig(queries=BUILD_CALIBRATION_QUERIES),
            device=args.device,
            autocast=mode,
            progress=False,
        )
        summary = build_index(config)
        record[str(mode)] = {
            **bare,
            "build_phase_seconds": summary.seconds,
            "examples": summary.n_examples,
            "tokens": summary.n_tokens,
            "dim": summary.dim,
            "main_pass_tokens_per_second": round(summary.tokens_per_second),
            "ratio_main_pass_vs_bare": round(
                summary.tokens_per_second / bare["bare_forward_backward"]["tokens_per_second"], 3
            ),
            "build_tokens_per_second": round(summary.n_tokens / sum(summary.seconds.values())),
        }


def section_fidelity(args, record: Recorder, deadline: float, work: Path) -> None:
    demo = demo_artifacts()
    corpus = demo.corpus_path
    if args.fidelity_documents:
        corpus = work / "corpus.jsonl"
        lines = demo.corpus_path.read_text().splitlines(keepends=True)
        corpus.write_text("".join(lines[: args.fidelity_documents]))
    queries = [
        Query(q.query.prompt, q.query.completion, rerank_depth=0)
        for q in read_queries(demo.queries_path)
    ]
    base = BuildConfig(
        model=demo.model_dir,
        out=work,
        corpus=CorpusConfig(str(corpus)),
        store=StoreConfig(exact_rerank=False, lexical_index=False),  # sketch-only answers
        calibration=CalibrationConfig(queries=0),
        device=args.device,
        progress=False,
    )
    engines = {}
    for mode in Autocast:
        summary = build_index(replace(base, out=work / str(mode), autocast=mode))
        record[f"build_{mode}"] = {
            "seconds": summary.seconds,
            "main_pass_tokens_per_second": round(summary.tokens_per_second),
            "dim": summary.dim,
        }
        engines[mode] = QueryEngine.open(work / str(mode), device=args.device)
    hits = {
        mode: [[h.example_id for h in r.hits] for r in e.query(queries)]
        for mode, e in engines.items()
    }
    overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(*hits.values(), strict=True)]
    record["queries"] = len(queries)
    record["examples"] = len(engines[Autocast.OFF].vectors)
    record["sketch_top10_agreement_bf16_vs_float32"] = round(float(np.mean(overlap)), 4)
    record["sketch_score_correlation"] = score_correlation(*engines.values(), queries)


def score_correlation(first: QueryEngine, second: QueryEngine, queries: list[Query]) -> dict:
    """Per query, the correlation of the two indexes' sketch scores of every example (their
    vectors' coordinates are not comparable: each fit has its own eigenbases)."""
    scores = [
        e.vectors[:] @ e.query_vectors([e.prepare(q) for q in queries]).T for e in (first, second)
    ]
    found = [np.corrcoef(a, b)[0, 1] for a, b in zip(*(s.T for s in scores), strict=True)]
    return {"median": round(float(np.median(found)), 6), "min": round(float(np.min(found)), 6)}


SECTION_RUNS = {
    "gradient": section_gradient,
    "scan": section_scan,
    "rerank": section_rerank,
    "build": section_build,
    "fidelity": section_fidelity,
}


if __name__ == "__main__":
    sys.exit(main())
