"""The Celery application: Redis broker, two queues (``gpu``: inference shards and training; ``cpu``:
finalisation), and the settings long GPU tasks need on Redis.

- ``acks_late`` + ``reject_on_worker_lost``: a task whose worker dies is delivered again (the ledger caps the
  attempts and makes the redelivery safe);
- prefetch 1: a worker holds one shard at a time, so a lost worker strands nothing else;
- a visibility timeout above the longest shard (``DISTILL_VISIBILITY_TIMEOUT``), or Redis redelivers a task
  that is still running;
- no result backend: outcomes are recorded in the job ledger, never read from Celery.

``celery -A workers.app worker -Q gpu,cpu`` runs a worker with the ``DISTILL_*`` environment.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from service.config import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery(
        "distill", broker=settings.redis_url or "redis://127.0.0.1:6379/0", include=["workers.tasks"]
    )
    visibility = float(os.environ.get("DISTILL_VISIBILITY_TIMEOUT", 6 * 3600))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[Queue("gpu"), Queue("cpu")],
        task_default_queue="cpu",
        task_routes={"distill.infer_shard": {"queue": "gpu"}, "distill.finalize": {"queue": "cpu"}},
    )
    return app


app = make_celery(Settings())
