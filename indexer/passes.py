"""Batched passes over corpus examples: pad, run the sketcher, hand each batch's capture on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from indexer.config import Autocast
from indexer.corpus import Example, ExampleTable
from indexer.hashing import int63
from indexer.sketch import Capture, GradientSketcher, LabelMode, make_batch

# Rows read and length-sorted at a time: a pass holds one window of examples, whatever the
# corpus's size; within a window, batches of similar lengths waste little padding.
WINDOW_ROWS = 2048


def fetch(examples: Sequence[Example] | ExampleTable, rows: Sequence[int]) -> list[Example]:
    """The examples of `rows`, in that order, from a list or a staged table."""
    if isinstance(examples, ExampleTable):
        return examples.fetch(rows)
    return [examples[r] for r in rows]


@dataclass
class ExamplePass:
    """Runs the sketcher over corpus rows with the training loss (every token after the first)."""

    sketcher: GradientSketcher
    examples: Sequence[Example] | ExampleTable
    pad_id: int
    batch_size: int
    seed: int
    progress: bool = True
    autocast: Autocast = Autocast.OFF  # the build's passes only: queries run in float32

    def run(
        self,
        rows: Sequence[int],
        labels: LabelMode,
        desc: str,
        *,
        keep_unprojected: bool = False,
    ) -> Iterator[tuple[list[int], Capture]]:
        """Yield `(rows of the batch, capture)`: `rows` are read `WINDOW_ROWS` at a time, in the
        given order, and each window goes in length order; `keep_unprojected`: see
        `GradientSketcher.run`."""
        with tqdm(total=len(rows), desc=desc, unit="ex", disable=not self.progress) as bar:
            for start in range(0, len(rows), WINDOW_ROWS):
                window = [int(r) for r in rows[start : start + WINDOW_ROWS]]
                examples = fetch(self.examples, window)
                order = sorted(range(len(window)), key=lambda i: len(examples[i].token_ids))
                for first in range(0, len(order), self.batch_size):
                    chunk = [examples[i] for i in order[first : first + self.batch_size]]
                    batch = make_batch(
                        [e.token_ids for e in chunk],
                        [1] * len(chunk),
                        self.pad_id,
                        [int63(self.seed, e.example_id) for e in chunk],
                    )
                    batch_rows = [window[i] for i in order[first : first + self.batch_size]]
                    capture = self.sketcher.run(
                        batch, labels, keep_unprojected=keep_unprojected, autocast=self.autocast
                    )
                    yield batch_rows, capture
                    bar.update(len(chunk))
