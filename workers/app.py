"""The Celery application: Redis broker, two queues (``gpu``: training, inference shards, evaluation;
``cpu``: calibration and decisions; each unit is sent to its queue), and the settings long GPU tasks need on
Redis.

- ``acks_late`` + ``reject_on_worker_lost``: a task whose worker dies is delivered again (the ledger caps the
  attempts and makes the redelivery safe);
- prefetch 1: a worker holds one shard at a time, so a lost worker strands nothing else;
- a visibility timeout above the longest unit (``DISTILL_VISIBILITY_TIMEOUT``, default 6 h), or Redis
  redelivers a task that is still running (the ledger's lease makes that redelivery wait, not run twice);
- no result backend: outcomes are recorded in the job ledger, never read from Celery;
- beat (exactly one process; a second one does no harm) sends ``distill.tick_schedules`` to the cpu queue
  every ``DISTILL_SCHEDULE_TICK_SECONDS``, each tick expiring after one interval so a busy queue does not
  pile them up; the database, not beat, decides which schedule slot runs (:mod:`service.schedules`).

``celery -A workers.app worker -Q gpu,cpu`` runs a worker with the ``DISTILL_*`` environment;
``celery -A workers.app beat`` the ticks.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.config import Settings

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def make_celery(settings: Settings) -> Celery:
    app = Celery("distill", broker=settings.redis_url or DEFAULT_BROKER, include=["workers.tasks"])
    visibility = settings.visibility_timeout
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
        task_time_limit=settings.task_time_limit,
        beat_schedule={
            "tick-schedules": {
                "task": "distill.tick_schedules",
                "schedule": settings.schedule_tick_seconds,
                "options": {"queue": "cpu", "expires": settings.schedule_tick_seconds},
            }
        },
    )
    return app


app = make_celery(Settings())
