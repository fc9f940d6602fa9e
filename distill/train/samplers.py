"""Batch samplers for iteration-based training.

Deterministic from (seed, iteration), so a resumed run sees the same batches it would have seen without
the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ShuffledBatchSampler:
    """Endless batches of indices into ``range(size)``; each epoch a permutation seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0) -> None:
        if size <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def batches(self, start_iteration: int = 0) -> Iterator[list[int]]:
        """Batches from iteration ``start_iteration`` on (position computed, not replayed)."""
        position = start_iteration * self.batch_size
        epoch, offset = divmod(position, self.size)
        order = self._permutation(epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if offset == self.size:
                    epoch, offset = epoch + 1, 0
                    order = self._permutation(epoch)
                batch.append(order[offset])
                offset += 1
            yield batch
