"""Starting jobs: a ``distill`` job is the ``infer`` step over shards of the unlabeled images, then the
``pseudo_label`` step over every shard's output (:mod:`workers.tasks`). The job row and its shards are
committed before anything is enqueued, so a task never looks for a job that is not there yet."""

from __future__ import annotations

from typing import Any

from distill.data.images import iter_image_refs
from distill.specs import InferenceSpec, PseudoLabelSpec
from distill.steps import shard_slice
from distill.storage import Storage
from service import ledger
from service.db import transaction


def submit_distill_job(
    sessions,
    storage: Storage,
    *,
    model: str,
    unlabeled: str,
    unlabeled_images: str | None,
    labeled: str,
    inference: InferenceSpec,
    shard_size: int,
    calibration: dict[str, Any] | None = None,
    enqueue=None,
) -> int:
    """Create a distill job (one shard per ``shard_size`` unlabeled images) and enqueue its shards; returns
    its id. ``enqueue(job_id, index)`` defaults to the Celery task."""
    count = len(iter_image_refs(storage.local(unlabeled), images_dir=None if unlabeled_images is None
                                else storage.local(unlabeled_images, members=[])))  # fmt: skip
    shards = max(1, -(-count // shard_size))
    sizes = [len(range(count)[shard_slice(count, (i, shards))]) for i in range(shards)]
    spec = {
        "infer": {"model": model, "images": unlabeled, "images_dir": unlabeled_images,
                  "inference": inference.model_dump(mode="json")},
        "pseudo_label": PseudoLabelSpec(
            predictions=["(the shards)"], unlabeled=unlabeled, unlabeled_images=unlabeled_images,
            labeled=labeled, out="PLACEHOLDER", calibration=calibration or {},
        ).model_dump(mode="json", exclude={"predictions", "out"}),
    }  # fmt: skip
    with transaction(sessions) as session:
        job = ledger.create_job(session, type="distill", spec=spec, shard_images=sizes)
        job_id = job.id
        job.spec = {**spec, "pseudo_label": {**spec["pseudo_label"], "out": f"jobs/{job_id}/pseudo.json"}}
    if enqueue is None:
        from workers.tasks import infer_shard

        def enqueue(job: int, index: int) -> None:
            infer_shard.delay(job, index)

    for index in range(shards):
        enqueue(job_id, index)
    return job_id
