"""What the calibration's exact scores cost in the build's main pass, against a pass of their own.

    python -m benchmarks.calibration_cost --setting mid --examples 256 --threads 1 [--out r.json]

On a sample of the setting's examples (the corpus's first `--examples`, framed as the build
frames them) with factors fitted on that sample, CPU seconds (`time.process_time`, one torch
thread) of each way the main pass can run over it, and of the calibration's own pass over the
same examples as candidates. Per example, the main pass's extra for the pseudo-queries' scores:

- cosine: exact norms and scores from the same rotations, less exact norms alone;
- influence: the sketches with the unprojected tokens kept and each example's gradient
  contracted with the folded queries, less the sketches alone;

each against the separate pass's cost per candidate (forward/backward and contraction): the
ratios `indexer.calibration` decides with.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit, start_run
from benchmarks.rerank import load_setting
from indexer.budget import module_ranks
from indexer.calibration import cut_queries, query_batch
from indexer.config import CalibrationConfig, SketchConfig, example_max_length
from indexer.corpus import load_corpus
from indexer.curvature import fit_curvature
from indexer.exact import ExactReranker
from indexer.model import load_model, module_shape, tracked_modules
from indexer.passes import ExamplePass
from indexer.sketch import Capture, GradientSketcher, gaussian_projection


def cpu_seconds(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("demo", "mid", "large"), default="mid")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start_run(args.threads)
    setting = load_setting(args.setting, None)
    loaded = load_model(setting.model_dir)
    max_length = example_max_length(setting.corpus.max_length, loaded.context_length)
    examples = load_corpus(setting.corpus, loaded.tokenizer, max_length).examples
    examples = examples[: args.examples]
    sketch = SketchConfig()
    modules = tracked_modules(loaded.model, sketch.modules)
    ranks = module_ranks({n: module_shape(m) for n, m in modules.items()}, sketch)
    projections = {
        n: gaussian_projection(n, m, ranks[n].rank_in, ranks[n].rank_out, sketch.seed)
        for n, m in modules.items()
    }
    pad = loaded.tokenizer.pad_token_id
    example_pass = ExamplePass(
        GradientSketcher(loaded.model, modules, projections), examples, pad, args.batch_size, 0,
        progress=False,
    )  # fmt: skip
    rows = list(range(len(examples)))
    fitted = fit_curvature(example_pass, rows, 0.1, unprojected=True)
    full = fitted.unprojected
    reranker = ExactReranker(loaded.model, full, pad, args.batch_size)
    by_id = {e.example_id: e.token_ids for e in examples}
    calibration = CalibrationConfig()
    ids = np.array(list(by_id))
    pseudo = cut_queries(ids, calibration.queries, sketch.seed, lambda c: {i: by_id[i] for i in c})
    capture = reranker.sketcher.run(query_batch(pseudo, pad), "data")
    with torch.no_grad():
        folded = reranker.targets(capture)
        rotated = reranker.targets(capture, rotated=True)

    def main_pass(extra: Callable[[Capture], object] | None) -> Callable[[], None]:
        def run() -> None:
            keep = extra is not None
            for _, batch in example_pass.run(rows, "data", "main", keep_unprojected=keep):
                fitted.sketch.vectors(batch)
                if keep:
                    extra(batch.unprojected)

        return run

    seconds = {
        "sketch": cpu_seconds(main_pass(None)),
        "exact_norms": cpu_seconds(main_pass(full.norms)),
        "exact_norms_and_scores": cpu_seconds(
            main_pass(lambda c: full.norms(c, rotated.per_module))
        ),
        "sketch_and_influence_scores": cpu_seconds(
            main_pass(lambda c: full.example_scores(c, folded.per_module))
        ),
        "separate_pass": cpu_seconds(lambda: reranker.dots(folded, by_id)),
    }
    per_example = {k: v / len(examples) for k, v in seconds.items()}
    separate = per_example["separate_pass"]
    cosine = per_example["exact_norms_and_scores"] - per_example["exact_norms"]
    influence = per_example["sketch_and_influence_scores"] - per_example["sketch"]
    emit(
        {
            "benchmark": "calibration_cost",
            "setting": args.setting,
            "examples": len(examples),
            "tokens": sum(len(e.token_ids) for e in examples),
            "pseudo_queries": len(pseudo),
            "full_space_dim": full.dim,
            "torch_threads": args.threads,
            "load_average": os.getloadavg(),
            "cpu_seconds": seconds,
            "main_pass_scores_vs_separate_pass_per_example": {
                "cosine": cosine / separate,
                "influence": influence / separate,
            },
        },
        args.out,
    )


if __name__ == "__main__":
    main()
