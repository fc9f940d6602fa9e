"""The model registry: model directories in storage, grouped by name into numbered versions, with lineage.

A model is registered when it is uploaded (``POST /v1/models``) or when a job's training stage completes
(teacher, student, a plain training job). Registering the same storage key twice returns the first row, so
a redelivered stage registers nothing new. The promotion gate and rollback build on this (schedules).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import Job, Model


def register_model(
    session: Session,
    *,
    name: str,
    key: str,
    backend: str,
    source: str,
    role: str = "",
    job_id: int | None = None,
    parent_id: int | None = None,
    datasets: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Model:
    """The model at storage ``key`` as the next version of ``name`` (or its existing row)."""
    for _ in range(10):  # two registrations of one name at once: the loser takes the next version
        existing = session.scalar(select(Model).where(Model.key == key))
        if existing is not None:
            return existing
        version = (session.scalar(select(func.max(Model.version)).where(Model.name == name)) or 0) + 1
        model = Model(
            name=name, version=version, key=key, backend=backend, source=source, role=role, job_id=job_id,
            parent_id=parent_id, datasets=datasets or {}, info=info or {},
        )  # fmt: skip
        try:
            with session.begin_nested():  # a savepoint: a unique violation undoes only this insert
                session.add(model)
        except IntegrityError:
            continue
        return model
    raise RuntimeError(f"model {name!r}: no free version after 10 tries")


def model_by_key(session: Session, key: str) -> Model | None:
    return session.scalar(select(Model).where(Model.key == key))


def register_job_models(session: Session, job: Job, models: list[dict[str, Any]]) -> list[Model]:
    """Register what a job's stage trained, under the job's model name: a student's parent is its
    teacher (registered or given), a teacher trained by the job has no parent."""
    rows = []
    name = job.spec.get("model_name") or f"job-{job.id}"
    datasets = dict(job.spec.get("datasets") or {})
    for model in models:
        parent = None
        if model["role"] == "student":
            parent = model_by_key(session, _teacher_key(job, model["key"]))
        elif model["role"] == "teacher" and job.spec.get("parent_model_id"):
            parent = session.get(Model, job.spec["parent_model_id"])
        row = register_model(
            session, name=name, key=model["key"], backend=model["backend"], source="job",
            role=model["role"], job_id=job.id, parent_id=None if parent is None else parent.id,
            datasets=datasets, info=model.get("info", {}),
        )  # fmt: skip
        rows.append(row)
    return rows


def _teacher_key(job: Job, student_key: str) -> str:
    """The teacher of the student at ``jobs/ID/round_K/student``: round K-1's student, or round 1's
    teacher (trained by the job, or the given model)."""
    round_dir = student_key.rsplit("/", 1)[0]
    k = int(round_dir.rsplit("_", 1)[1])
    root = round_dir.rsplit("/", 1)[0]
    if k > 1:
        return f"{root}/round_{k - 1}/student"
    given = job.spec.get("config", {}).get("teacher", {}).get("model")
    return given or f"{root}/round_1/teacher"


def record_metrics(session: Session, key: str, eval_dataset: Any, metrics: dict[str, Any]) -> None:
    """Store a model's metrics on an eval dataset (by id, or ``"eval"`` when the job has none named)."""
    model = model_by_key(session, key)
    if model is not None:
        model.metrics = {**(model.metrics or {}), str(eval_dataset): metrics}


def lineage(session: Session, model: Model, *, limit: int = 1000) -> list[Model]:
    """The chain of ``model``'s parents, its parent first, up to the root (a model without a parent). A
    cycle (rows edited by hand) ends the chain at the first model seen again."""
    chain: list[Model] = []
    seen = {model.id}
    parent_id = model.parent_id
    while parent_id is not None and parent_id not in seen and len(chain) < limit:
        parent = session.get(Model, parent_id)
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.id)
        parent_id = parent.parent_id
    return chain
