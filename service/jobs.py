"""Starting jobs: a job's plan (its stages and their units, :mod:`workers.stages`), its spec, and the
first stage enqueued.

Every job's spec holds a :class:`~distill.pipeline.PipelineConfig` (``config``) whose data fields are
storage keys. The job row, its units and its input snapshots are committed before anything is enqueued, so
a task never looks for a job that is not there yet; a lost enqueue is recovered by the ledger sweep.

- ``pipeline``: [``teacher``] [``evaluate_teacher``] ``infer`` × shards, ``pseudo_label``, ``student``,
  [``evaluate_student``], ``decide`` — and again from ``infer@2`` for each further round;
- ``distill``: ``infer`` × shards, ``pseudo_label`` (a given teacher);
- ``train``: ``train``; ``evaluate``: ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from distill.data.images import iter_image_refs
from distill.pipeline import PipelineConfig
from distill.steps import shard_slice
from distill.storage import Storage
from service import ledger
from service.db import transaction
from service.ledger import Unit
from workers.stages import QUEUES, stage_name

Enqueue = Callable[[int, str, int, str], None]  # (job id, stage, index, queue)


def shard_sizes(count: int, shard_size: int) -> list[int]:
    """Images per inference shard: ``ceil(count / shard_size)`` contiguous shards (at least one)."""
    shards = max(1, -(-count // shard_size))
    return [len(range(count)[shard_slice(count, (i, shards))]) for i in range(shards)]


def _unit(kind: str, round_number: int = 1, index: int = 0, images: int = 0) -> Unit:
    return Unit(stage_name(kind, round_number), index, QUEUES[kind], images)


def _infer_round(sizes: list[int], round_number: int) -> list[Unit]:
    units = [_unit("infer", round_number, i, n) for i, n in enumerate(sizes)]
    return [*units, _unit("pseudo_label", round_number)]


def pipeline_units(config: PipelineConfig, sizes: list[int]) -> list[Unit]:
    """The units of a pipeline job over ``config`` with inference shards of ``sizes`` images."""
    evaluated = config.data.test is not None
    units: list[Unit] = []
    for k in range(1, config.rounds + 1):
        if k == 1 and config.teacher.model is None:
            units.append(_unit("teacher"))
        if k == 1 and evaluated:
            units.append(_unit("evaluate_teacher"))
        units += _infer_round(sizes, k)
        units.append(_unit("student", k))
        if evaluated:
            units.append(_unit("evaluate_student", k))
        units.append(_unit("decide", k))
    return units


def distill_units(sizes: list[int]) -> list[Unit]:
    return _infer_round(sizes, 1)


def single_unit(kind: str) -> list[Unit]:
    return [_unit(kind)]


def submit(
    sessions: sessionmaker[Session],
    *,
    type: str,
    units: list[Unit],
    make_spec: Callable[[Session, int], dict[str, Any]],
    enqueue: Enqueue,
    created_by: int | None = None,
) -> int:
    """Create a job of ``units``, let ``make_spec(session, job_id)`` write its inputs and return its spec,
    commit, then enqueue the first stage's units; returns the job's id. Nothing is enqueued when
    ``make_spec`` raises (and nothing is committed)."""
    with transaction(sessions) as session:
        job = ledger.create_job(session, type=type, spec={}, units=units, created_by=created_by)
        job.spec = make_spec(session, job.id)
        job_id, first = job.id, [(u.stage, u.index, u.queue) for u in units if u.stage == job.plan[0]]
    for stage, index, queue in first:
        enqueue(job_id, stage, index, queue)
    return job_id


def celery_enqueue() -> Enqueue:
    from workers.tasks import send_unit

    return send_unit


def submit_distill_job(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    model: str,
    unlabeled: str,
    unlabeled_images: str | None,
    labeled: str,
    labeled_images: str | None = None,
    inference: Any = None,
    shard_size: int,
    calibration: dict[str, Any] | None = None,
    enqueue: Enqueue | None = None,
) -> int:
    """A distill job over files already in storage (keys): the teacher ``model`` on ``unlabeled``,
    calibrated to ``labeled``'s density."""
    count = len(iter_image_refs(storage.local(unlabeled), images_dir=None if unlabeled_images is None
                                else storage.local(unlabeled_images, members=[])))  # fmt: skip
    config = PipelineConfig.model_validate(
        {
            "data": {
                "labeled": labeled, "labeled_images": labeled_images or unlabeled_images or "",
                "unlabeled": unlabeled, "unlabeled_images": unlabeled_images,
            },
            "teacher": {"model": model},
            "inference": {} if inference is None else inference.model_dump(mode="json"),
            "calibration": calibration or {},
        }
    )  # fmt: skip
    spec = {"config": config.model_dump(mode="json")}
    return submit(
        sessions,
        type="distill",
        units=distill_units(shard_sizes(count, shard_size)),
        make_spec=lambda _session, _job_id: spec,
        enqueue=enqueue or celery_enqueue(),
    )
