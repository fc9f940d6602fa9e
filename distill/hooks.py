"""The one hook protocol of every step and long loop: progress events, a cancel check, a logger.

A :class:`StepContext` is handed down from whoever runs a step (the CLI, ``run_pipeline``, a Celery task) to
every loop that can take long: both trainers, streaming multi-view inference, evaluation, synthetic data
generation. Loops call :meth:`StepContext.report` as they go and :meth:`StepContext.check_cancelled` between
units of work (an iteration, a batch, an image); a cancel request raises :class:`~distill.errors.Cancelled`
after the loop has saved what makes a re-run resume (a checkpoint, the ``.partial`` lines).

::

    ctx = StepContext(progress=lambda e: print(e.stage, e.done, e.total), should_cancel=job_is_cancelled)
    steps.train(spec, ctx)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from distill.errors import Cancelled

__all__ = ["NULL_CONTEXT", "ProgressEvent", "StepContext"]


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` (e.g. ``train``: iterations, ``infer``: images)."""

    stage: str
    done: int
    total: int | None
    message: str = ""
    values: Mapping[str, float] = field(default_factory=dict)  # e.g. losses, lr, it/s

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


class StepContext:
    """Progress sink, cancel check and logger for one step (all optional).

    ``progress`` receives :class:`ProgressEvent` objects; ``should_cancel`` is polled between units of work
    and must be cheap (a worker reads a flag its heartbeat refreshed, not the database on every call).
    """

    def __init__(
        self,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._progress = progress
        self._should_cancel = should_cancel
        self.logger = logger or logging.getLogger("distill")

    def report(
        self,
        stage: str,
        done: int,
        total: int | None,
        message: str = "",
        values: Mapping[str, float] | None = None,
    ) -> None:
        """Send a progress event (a no-op without a progress sink)."""
        if self._progress is not None:
            self._progress(ProgressEvent(stage, done, total, message, dict(values or {})))

    def cancelled(self) -> bool:
        return self._should_cancel is not None and bool(self._should_cancel())

    def check_cancelled(self, where: str | Callable[[], str]) -> None:
        """Raise :class:`Cancelled` when a cancel was requested; ``where`` names the interrupted work."""
        if self.cancelled():
            raise Cancelled(where() if callable(where) else where)


NULL_CONTEXT = StepContext()  # no progress, never cancelled, the "distill" logger
