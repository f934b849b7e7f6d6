"""A build across processes (`torchrun --nproc-per-node N -m server.cli build ...`).

Every rank loads the model and stages the corpus; each sketches its shard of the rows (row k
goes to rank k mod N) for the curvature fit and for the main pass; covariance and eigenvalue
sums are all-reduced and the eigendecomposition is done once, on rank 0, and broadcast. Each
rank writes its vectors and their norms and losses to its own shard files in the shared
staging directory; rank 0 assembles the index and metadata from the shards and publishes. A
rank that fails fails the build (torchrun stops the others): nothing is published, CURRENT is
untouched, and the next build removes the staging directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a build: rank `rank` of `size` (size 1: a single process)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that locks ROOT, assembles the version and publishes it."""
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows of `rows`: every `size`-th one, from its rank on."""
        return rows[self.rank :: self.size]

    def sum_(self, tensors: list[Tensor]) -> None:
        """Replace each tensor by its sum over ranks (in place; same order on every rank),
        through the CPU: gloo reduces CPU tensors."""
        if self.size > 1:
            for tensor in tensors:
                reduced = tensor.cpu()
                dist.all_reduce(reduced)
                tensor.copy_(reduced)

    def sum_int(self, value: int) -> int:
        """`value` summed over ranks."""
        total = torch.tensor([value], dtype=torch.int64)
        self.sum_([total])
        return int(total.item())

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank (any picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join() -> Ranks:
    """The process group torchrun describes in the environment (WORLD_SIZE > 1), joined over
    gloo (CPU tensors: the collectives carry float64 sums, never activations); a single
    process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())
