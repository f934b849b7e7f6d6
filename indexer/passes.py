"""Batched passes over corpus examples: pad, run the sketcher, hand each batch's capture on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from indexer.corpus import Example
from indexer.hashing import int63
from indexer.sketch import Capture, GradientSketcher, LabelMode, make_batch


@dataclass
class ExamplePass:
    """Runs the sketcher over corpus rows with the training loss (every token after the first)."""

    sketcher: GradientSketcher
    examples: list[Example]
    pad_id: int
    batch_size: int
    seed: int
    progress: bool = True

    def run(
        self, rows: list[int], labels: LabelMode, desc: str, keep_full: bool = False
    ) -> Iterator[tuple[list[int], Capture]]:
        """Yield `(rows of the batch, capture)`; rows go in length order to waste little padding."""
        ordered = sorted(rows, key=lambda r: len(self.examples[r].token_ids))
        with tqdm(total=len(ordered), desc=desc, unit="ex", disable=not self.progress) as bar:
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                batch = make_batch(
                    [self.examples[r].token_ids for r in chunk],
                    [1] * len(chunk),
                    self.pad_id,
                    [int63(self.seed, self.examples[r].example_id) for r in chunk],
                )
                yield chunk, self.sketcher.run(batch, labels, keep_full)
                bar.update(len(chunk))
