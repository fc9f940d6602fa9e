"""The labeled:pseudo ratio sampler holds its ratio exactly, covers each source, and resumes."""

from __future__ import annotations

from collections import Counter

import pytest

from distill.train.samplers import RatioBatchSampler


def take(sampler: RatioBatchSampler, n: int, start: int = 0) -> list[list[int]]:
    batches = sampler.batches(start)
    return [next(batches) for _ in range(n)]


def test_six_to_four_holds_exactly_with_a_batch_of_four() -> None:
    sampler = RatioBatchSampler([50, 200], [6, 4], 4, seed=3)
    batches = take(sampler, 100)
    assert all(len(b) == 4 for b in batches)
    labeled = sum(i < 50 for b in batches for i in b)
    assert labeled == 240  # 2.4 per batch on average
    per_batch = Counter(sum(i < 50 for i in b) for b in batches)
    assert set(per_batch) == {2, 3}  # rounded per batch, exact over the run
    for i in range(1, 101):  # after every prefix: floor(i * 4 * 0.6) labeled items
        assert sum(j < 50 for b in batches[:i] for j in b) == (i * 4 * 6) // 10


def test_each_source_is_a_permutation_per_epoch() -> None:
    sampler = RatioBatchSampler([10, 30], [1, 1], 4, seed=0)
    items = [i for b in take(sampler, 15) for i in b]  # 30 labeled + 30 pseudo items
    labeled = [i for i in items if i < 10]
    pseudo = [i for i in items if i >= 10]
    assert sorted(labeled[:10]) == sorted(labeled[10:20]) == list(range(10))
    assert sorted(pseudo) == list(range(10, 40))


def test_resume_gives_the_same_batches() -> None:
    sampler = RatioBatchSampler([7, 13], [6, 4], 5, seed=11)
    assert take(sampler, 9, start=21) == take(sampler, 30)[21:]


def test_a_zero_part_and_bad_arguments() -> None:
    only_labeled = RatioBatchSampler([5, 0], [1, 0], 2)
    assert all(i < 5 for b in take(only_labeled, 10) for i in b)
    with pytest.raises(ValueError, match="dataset 1 is empty"):
        RatioBatchSampler([5, 0], [6, 4], 4)
    with pytest.raises(ValueError, match="one ratio per dataset"):
        RatioBatchSampler([5, 5], [1], 4)
    with pytest.raises(ValueError, match="positive sum"):
        RatioBatchSampler([5, 5], [0, 0], 4)
