"""Batch samplers for iteration-based training.

Deterministic from (seed, iteration), so a resumed run sees the same batches it would have seen without
the interruption.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

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


class RatioBatchSampler:
    """Batches that mix several datasets at a fixed ratio, e.g. labeled : pseudo-labeled = 6 : 4.

    The datasets are concatenated (source ``k`` owns indices ``offset_k .. offset_k + sizes[k] - 1``). Each
    source is its own endless stream of seeded permutations. A batch of ``batch_size`` takes ``n_k`` items
    from source ``k``, with ``n_k`` rounded per iteration so that after ``i`` iterations source ``k`` has
    given exactly ``floor(i * batch_size * F_k)`` items minus its predecessors' share (``F_k``: cumulative
    fraction of the ratio). So the ratio holds exactly over any run, even when ``batch_size * fraction`` is
    not an integer (batch 4 at 6:4 alternates 2:2 and 3:1 and averages 2.4:1.6). Deterministic from (seed,
    iteration), like :class:`ShuffledBatchSampler`.
    """

    def __init__(
        self, sizes: Sequence[int], ratio: Sequence[float], batch_size: int, *, seed: int = 0
    ) -> None:
        if len(sizes) != len(ratio) or not sizes:
            raise ValueError(f"need one ratio per dataset, got sizes {list(sizes)} and ratio {list(ratio)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if any(r < 0 for r in ratio) or sum(ratio) <= 0:
            raise ValueError(f"ratio parts must be >= 0 with a positive sum, got {list(ratio)}")
        for k, (size, part) in enumerate(zip(sizes, ratio, strict=True)):
            if part > 0 and size <= 0:
                raise ValueError(f"dataset {k} is empty but its ratio part is {part}")
        parts = [Fraction(r).limit_denominator(1000) for r in ratio]
        total = sum(parts)
        running = Fraction(0)
        self.cumulative = []
        for part in parts:
            running += part / total
            self.cumulative.append(running)
        self.sizes = list(sizes)
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.batch_size = batch_size
        self.seed = seed

    def _taken(self, iteration: int) -> list[int]:
        """Items each source has given before ``iteration``."""
        ends = [math.floor(iteration * self.batch_size * c) for c in self.cumulative]
        return [end - (ends[k - 1] if k else 0) for k, end in enumerate(ends)]

    def batches(self, start_iteration: int = 0) -> Iterator[list[int]]:
        """Batches from iteration ``start_iteration`` on (positions computed, not replayed)."""
        streams = [
            _stream(size, self.seed * 1_000_003 + 7_777 * k, taken) if size > 0 else iter(())
            for k, (size, taken) in enumerate(zip(self.sizes, self._taken(start_iteration), strict=True))
        ]
        iteration = start_iteration
        while True:
            before, after = self._taken(iteration), self._taken(iteration + 1)
            batch = []
            for k, stream in enumerate(streams):
                batch.extend(self.offsets[k] + next(stream) for _ in range(after[k] - before[k]))
            iteration += 1
            yield batch


def _stream(size: int, seed: int, position: int) -> Iterator[int]:
    """Endless seeded permutations of ``range(size)``, starting at item ``position``."""
    epoch, offset = divmod(position, size)
    while True:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0
