"""Wall-clock timing shared by the benches: CUDA-synchronised runs, and interleaved rounds.

On a shared, noisy machine the claims are ratios measured side by side: :func:`interleaved` runs every
measurement once per round, in turn, and keeps each one's fastest round (the least disturbed run; interleaving
spreads slow phases of the machine over all measurements alike).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` (GPU work included) and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` rounds per measurement, each round running every function once in turn."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn)[0])
    return best
