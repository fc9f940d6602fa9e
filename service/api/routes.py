"""``/v1/jobs``: submit a job (pipeline, distill, train, evaluate), read its state and stages, follow its
events, cancel or retry it, download its artifacts."""

from __future__ import annotations

import asyncio
import mimetypes
import posixpath
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from distill.errors import InputError
from service import ledger
from service.api.deps import Read, RuntimeDep, SessionDep, Write, WriteToken, get_or_404, page
from service.db import transaction
from service.job_requests import JobCreate
from service.models import Job
from service.submit import submit_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
EVENT_POLL_SECONDS = 0.5


class StagePublic(BaseModel):
    name: str
    state: str  # queued | running | done | failed
    units: int
    done_units: int
    progress: dict[str, int]


class JobPublic(BaseModel):
    id: int
    type: str
    state: str
    stage: str
    progress: dict[str, int]
    eta_s: float | None
    stages: list[StagePublic]
    warnings: list[Any]
    skipped: list[Any]
    metrics: dict[str, Any]
    datasets: dict[str, Any]
    models: dict[str, Any] = Field(
        description="each model field -> the model it resolved to when the job started: id, name, version, "
        "and by (id, or promoted: named by name)"
    )
    schedule: dict[str, Any] | None = Field(description="the schedule run that started the job, if one did")
    cancel_requested: bool
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


def _stages(job: Job) -> list[StagePublic]:
    by_stage: dict[str, list[Any]] = {}
    for unit in job.shards:
        by_stage.setdefault(unit.stage, []).append(unit)
    out = []
    for name in job.plan or list(by_stage):
        units = by_stage.get(name, [])
        states = {u.state for u in units}
        state = next((s for s in ("failed", "running") if s in states), None)
        state = state or ("done" if states == {"done"} else "queued")
        progress = {"done": sum(u.done for u in units), "total": sum(u.images for u in units)}
        finished = sum(u.state == "done" for u in units)
        out.append(
            StagePublic(name=name, state=state, units=len(units), done_units=finished, progress=progress)
        )
    return out


def _eta(job: Job) -> float | None:
    """Seconds left in the current stage, from its units' pace so far (None when unknown)."""
    units = [u for u in job.shards if u.stage == job.stage and u.claimed_at is not None]
    if job.finished_at is not None or not units or not 0 < job.progress_done < job.progress_total:
        return None
    elapsed = time.time() - min(u.claimed_at for u in units)
    return round(elapsed / job.progress_done * (job.progress_total - job.progress_done), 1)


def _public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id, type=job.type, state=job.state, stage=job.stage,
        progress={"done": job.progress_done, "total": job.progress_total}, eta_s=_eta(job),
        stages=_stages(job), warnings=list(job.warnings or []), skipped=list(job.skipped or []),
        metrics=dict(job.metrics or {}), datasets=dict((job.spec or {}).get("datasets") or {}),
        models=dict((job.spec or {}).get("models") or {}), schedule=(job.spec or {}).get("schedule"),
        cancel_requested=job.cancel_requested, error=job.error, created_at=job.created_at.isoformat(),
        started_at=job.started_at.isoformat() if job.started_at else None,
        finished_at=job.finished_at.isoformat() if job.finished_at else None,
    )  # fmt: skip


def _job(session, job_id: int) -> Job:
    return get_or_404(session, Job, job_id, "job")


@router.post("", status_code=status.HTTP_202_ACCEPTED, operation_id="create_job")
def create_job(body: JobCreate, runtime: RuntimeDep, token: WriteToken) -> dict[str, Any]:
    """Validate a job up front (unknown datasets or models, a dataset without annotations → 422 naming
    it), snapshot its datasets, and queue its first stage; answers at once."""
    try:
        job_id = submit_job(runtime, body, created_by=token.id)
    except InputError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return {"id": job_id, "state": "queued"}


@router.get("", operation_id="list_jobs", dependencies=[Read])
def list_jobs(
    session: SessionDep,
    state: str | None = None,
    type: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> JobsPublic:
    query = select(Job)
    if state is not None:
        query = query.where(Job.state == state)
    if type is not None:
        query = query.where(Job.type == type)
    jobs, count = page(session, query, Job.id.desc(), offset, limit)
    return JobsPublic(data=[_public(j) for j in jobs], count=count)


@router.get("/{job_id}", operation_id="get_job", dependencies=[Read])
def get_job(job_id: int, session: SessionDep) -> JobPublic:
    return _public(_job(session, job_id))


@router.post("/{job_id}/cancel", operation_id="cancel_job", dependencies=[Write])
def cancel_job(job_id: int, session: SessionDep) -> JobPublic:
    job = _job(session, job_id)
    if not ledger.request_cancel(session, job_id=job_id):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} has ended ({job.state}): nothing to cancel"
        )
    session.flush()
    session.refresh(job)
    return _public(job)


@router.post("/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED, operation_id="retry_job",
             dependencies=[Write])  # fmt: skip
def retry_job(job_id: int, runtime: RuntimeDep) -> JobPublic:
    """Queue a failed or cancelled job again where it stopped: finished units and checkpoints are kept."""
    with transaction(runtime.sessions) as session:
        job = _job(session, job_id)
        units = ledger.retry_job(session, job_id=job_id)
        if units is None:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"job {job_id} is {job.state}: only failed or cancelled jobs retry"
            )
        public = _public(job)
    for stage, index, queue in units:
        runtime.enqueue(job_id, stage, index, queue)
    return public


@router.get("/{job_id}/events", operation_id="job_events", dependencies=[Read])
async def job_events(job_id: int, runtime: RuntimeDep, request: Request) -> EventSourceResponse:
    """Server-sent events: ``job`` (the job, as ``GET /v1/jobs/{id}``) whenever its state, stage or progress
    changes, then ``end`` once it has finished."""

    def read() -> JobPublic | None:
        with runtime.sessions() as session:
            job = session.get(Job, job_id)
            return None if job is None else _public(job)

    first = await run_in_threadpool(read)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist")

    async def stream():
        last, job = None, first
        while job is not None:
            seen = (job.state, job.stage, job.progress["done"], job.progress["total"], len(job.warnings))
            if seen != last:
                yield {"event": "job", "data": job.model_dump_json()}
                last = seen
            if job.state in ledger.FINISHED:
                yield {"event": "end", "data": job.model_dump_json()}
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_SECONDS)
            job = await run_in_threadpool(read)

    return EventSourceResponse(stream(), ping=15)


def _artifacts(runtime, job: Job) -> dict[str, str]:
    """Artifact name (its path under the job's folder) -> storage key, for every file the job wrote (not its
    inputs, hidden files, or the ``.lock`` files that keep two writers off one predictions stream)."""
    root = f"jobs/{job.id}"
    storage = runtime.storage
    if not storage.exists(root):
        return {}
    base = storage.path(root).rstrip("/") + "/"
    names = {}
    for path in sorted(storage.fs.find(storage.path(root))):
        name = str(path)[len(base) :] if str(path).startswith(base) else posixpath.basename(str(path))
        base_name = posixpath.basename(name)
        if (
            not name.startswith("inputs/")
            and not base_name.startswith(".")
            and not base_name.endswith(".lock")
        ):
            names[name] = f"{root}/{name}"
    return names


@router.get("/{job_id}/artifacts", operation_id="list_artifacts", dependencies=[Read])
def list_artifacts(job_id: int, session: SessionDep, runtime: RuntimeDep) -> list[dict[str, Any]]:
    """Every file the job wrote: name, size, content type, and ``partial`` (a ``.partial`` stream, or any
    file of a job that did not succeed)."""
    job = _job(session, job_id)
    out = []
    for name, key in _artifacts(runtime, job).items():
        size = runtime.storage.fs.size(runtime.storage.path(key))
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        partial = name.endswith(".partial") or job.state != "succeeded"
        out.append({"name": name, "size": size, "content_type": kind, "partial": partial})
    return out


@router.get("/{job_id}/artifacts/{name:path}", operation_id="get_artifact", dependencies=[Read])
def get_artifact(job_id: int, name: str, session: SessionDep, runtime: RuntimeDep) -> FileResponse:
    key = _artifacts(runtime, _job(session, job_id)).get(name)  # only names the listing has: no traversal
    if key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    return FileResponse(runtime.storage.local(key), filename=posixpath.basename(name))
