"""``/v1/jobs``: submit a distill job, read its state, cancel it, download its artifacts."""

from __future__ import annotations

import mimetypes
import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from distill.errors import InputError
from distill.specs import CalibrationSpec, InferenceSpec
from service import ledger
from service.api.deps import Read, RuntimeDep, SessionDep, Write
from service.jobs import submit_distill_job
from service.models import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class DistillJobCreate(BaseModel):
    """A distill job over files in the service's storage (keys relative to its root)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["distill"]
    model: str = Field(description="model directory key of the teacher")
    unlabeled: str = Field(description="COCO json key of the unlabeled images")
    unlabeled_images: str = Field(description="folder key of the unlabeled json's file names")
    labeled: str = Field(description="labeled COCO json key (the target density)")
    inference: InferenceSpec = InferenceSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    shard_size: int | None = Field(None, ge=1, description="images per shard (default: the setting)")


class JobPublic(BaseModel):
    id: int
    type: str
    state: str
    stage: str
    progress: dict[str, int]
    eta_s: float | None
    warnings: list[Any]
    metrics: dict[str, Any]
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


def _public(job: Job) -> JobPublic:
    eta = None
    if job.started_at is not None and 0 < job.progress_done < job.progress_total and not job.finished_at:
        elapsed = time.time() - job.started_at.timestamp()
        eta = round(elapsed / job.progress_done * (job.progress_total - job.progress_done), 1)
    return JobPublic(
        id=job.id, type=job.type, state=job.state, stage=job.stage,
        progress={"done": job.progress_done, "total": job.progress_total}, eta_s=eta,
        warnings=list(job.warnings or []), metrics=dict(job.metrics or {}), error=job.error,
        created_at=job.created_at.isoformat(),
        started_at=job.started_at.isoformat() if job.started_at else None,
        finished_at=job.finished_at.isoformat() if job.finished_at else None,
    )  # fmt: skip


def _job(session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist")
    return job


@router.post("", status_code=status.HTTP_202_ACCEPTED, operation_id="create_job", dependencies=[Write])
def create_job(body: DistillJobCreate, runtime: RuntimeDep) -> dict[str, Any]:
    storage = runtime.storage
    for field in ("model", "unlabeled", "unlabeled_images", "labeled"):
        key = getattr(body, field)
        try:
            found = storage.exists(key)
        except InputError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"{field}: {exc}") from None
        if not found:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"{field}: {key} is not in storage")
    try:
        job_id = submit_distill_job(
            runtime.sessions, storage, model=body.model, unlabeled=body.unlabeled,
            unlabeled_images=body.unlabeled_images, labeled=body.labeled, inference=body.inference,
            calibration=body.calibration.model_dump(mode="json"),
            shard_size=body.shard_size or runtime.settings.shard_size,
            enqueue=lambda job, index: runtime.enqueue("distill.infer_shard", [job, index]),
        )  # fmt: skip
    except InputError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
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
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(query.order_by(Job.id.desc()).offset(offset).limit(limit)).all()
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


def _artifacts(job: Job) -> dict[str, str]:
    """Artifact name -> storage key of a job (what exists of it)."""
    names: dict[str, str] = {}
    pseudo = (job.spec or {}).get("pseudo_label", {}).get("out")
    if pseudo:
        stem = pseudo.rsplit(".", 1)[0]
        names.update(
            {"pseudo.json": pseudo, "calibration.json": f"{stem}.calibration.json",
             "calibration.png": f"{stem}.calibration.png"}
        )  # fmt: skip
    for shard in job.shards:
        if shard.output_key:
            names[f"predictions-{shard.index:05d}.jsonl"] = shard.output_key
    return names


@router.get("/{job_id}/artifacts", operation_id="list_artifacts", dependencies=[Read])
def list_artifacts(job_id: int, session: SessionDep, runtime: RuntimeDep) -> list[dict[str, Any]]:
    out = []
    for name, key in _artifacts(_job(session, job_id)).items():
        if runtime.storage.exists(key):
            size = runtime.storage.fs.size(runtime.storage.path(key))
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            out.append({"name": name, "size": size, "content_type": kind})
    return out


@router.get("/{job_id}/artifacts/{name}", operation_id="get_artifact", dependencies=[Read])
def get_artifact(job_id: int, name: str, session: SessionDep, runtime: RuntimeDep) -> FileResponse:
    key = _artifacts(_job(session, job_id)).get(name)
    if key is None or not runtime.storage.exists(key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    return FileResponse(runtime.storage.local(key), filename=name)
