"""``GET /metrics``: Prometheus text read from the ledger at scrape time (so every API replica answers the
same), plus the broker's queue depths. Needs a read token, like every route but ``/healthz``
(Prometheus: ``authorization: {credentials: TOKEN}`` in the scrape config).

- ``distill_jobs{state,type}``: jobs by state and type;
- ``distill_images_inferred``: unlabeled images of finished inference shards, all jobs;
- ``distill_unit_seconds{stage}``: histogram of finished units' durations (last attempt), by stage kind;
- ``distill_queue_depth{queue}``: tasks waiting in the broker's ``gpu`` / ``cpu`` queues (-1: unreachable).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from service.api.deps import Read, Runtime, RuntimeDep
from service.models import Job, Shard
from workers.stages import parse_stage

router = APIRouter(tags=["health"])
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))


def queue_depths(redis_url: str | None, queues: tuple[str, ...] = ("gpu", "cpu")) -> dict[str, int]:
    """Waiting tasks per queue (kombu's Redis transport keeps each queue as a list of its name)."""
    if not redis_url:
        return {q: -1 for q in queues}
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {q: int(client.llen(q)) for q in queues}
        finally:
            client.close()
    except redis.RedisError:
        return {q: -1 for q in queues}


class LedgerCollector:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Any:
        with self.runtime.sessions() as session:
            counts = select(Job.state, Job.type, func.count()).group_by(Job.state, Job.type)
            by_state = session.execute(counts).all()
            jobs = GaugeMetricFamily("distill_jobs", "jobs by state and type", labels=["state", "type"])
            for state, kind, count in by_state:
                jobs.add_metric([state, kind], count)
            yield jobs
            images = session.scalar(
                select(func.coalesce(func.sum(Shard.images), 0)).where(
                    Shard.state == "done", Shard.stage.like("infer%")
                )
            )
            yield GaugeMetricFamily(
                "distill_images_inferred", "unlabeled images of finished inference shards", value=images
            )
            rows = session.execute(
                select(Shard.stage, Shard.finished_at - Shard.claimed_at).where(
                    Shard.state == "done", Shard.claimed_at.is_not(None), Shard.finished_at.is_not(None)
                )
            ).all()
        yield _histogram(rows)
        depth = GaugeMetricFamily("distill_queue_depth", "tasks waiting in the broker", labels=["queue"])
        for queue, count in queue_depths(self.runtime.settings.redis_url).items():
            depth.add_metric([queue], count)
        yield depth


def _histogram(rows: list[Any]) -> HistogramMetricFamily:
    durations: dict[str, list[float]] = defaultdict(list)
    for stage, seconds in rows:
        durations[parse_stage(stage)[0]].append(float(seconds))
    family = HistogramMetricFamily("distill_unit_seconds", "finished units' durations", labels=["stage"])
    for stage, values in sorted(durations.items()):
        buckets = [(_bound(b), sum(v <= b for v in values)) for b in BUCKETS]
        family.add_metric([stage], buckets, sum_value=sum(values))
    return family


def _bound(bucket: float) -> str:
    return "+Inf" if bucket == float("inf") else f"{bucket:g}"


@router.get("/metrics", operation_id="metrics", dependencies=[Read], response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(runtime))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
