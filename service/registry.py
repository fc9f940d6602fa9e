"""The model registry: model directories in storage, grouped by name into numbered versions, with lineage.

A model is registered when it is uploaded (``POST /v1/models``) or when a job's training stage completes
(teacher, student, a plain training job). Registering the same storage key twice returns the first row, so
a redelivered stage registers nothing new.

Each name has at most one *promoted* version (``promoted_models``): the one a job that names the model by
name uses. :func:`promote` and :func:`rollback` change it with a compare-and-set on that row, and record
who and why in ``promotions``; a rollback undoes the latest promotion still in force, so rolling back twice
walks two promotions back. The first version registered under a name is promoted with it (there is nothing
else to use).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from distill.errors import InputError
from service.datasets import Conflict, NotFound
from service.models import Job, Model, PromotedModel, Promotion, utcnow

ANY = object()  # promote(expected=ANY): over whichever version is promoted


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
        if version == 1 and _set_promoted(session, name, model.id, expected=None):
            session.add(Promotion(name=name, action="promote", model_id=model.id, reason="first version"))
        return model
    raise RuntimeError(f"model {name!r}: no free version after 10 tries")


def model_by_key(session: Session, key: str) -> Model | None:
    return session.scalar(select(Model).where(Model.key == key))


def register_job_models(session: Session, job: Job, models: list[dict[str, Any]]) -> list[Model]:
    """Register what a job's stage trained, under the job's model name: a student's parent is its
    teacher (registered or given), a teacher trained by the job has no parent. Its ``info`` keeps the
    job's config (less the data keys) and what each input dataset held (``inputs``: images, sha256)."""
    rows = []
    name = job.spec.get("model_name") or f"job-{job.id}"
    datasets = dict(job.spec.get("datasets") or {})
    config = {k: v for k, v in (job.spec.get("config") or {}).items() if k != "data"}
    lineage_info = {"inputs": job.spec.get("inputs") or {}, "config": config}
    for model in models:
        parent = None
        if model["role"] == "student":
            parent = model_by_key(session, _teacher_key(job, model["key"]))
        elif model["role"] == "teacher" and job.spec.get("parent_model_id"):
            parent = session.get(Model, job.spec["parent_model_id"])
        row = register_model(
            session, name=name, key=model["key"], backend=model["backend"], source="job",
            role=model["role"], job_id=job.id, parent_id=None if parent is None else parent.id,
            datasets=datasets, info={**model.get("info", {}), **lineage_info},
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


def promoted_model(session: Session, name: str) -> Model | None:
    """The promoted version of ``name`` (None: no such name, or nothing promoted)."""
    row = session.get(PromotedModel, name, populate_existing=True)
    return None if row is None else session.get(Model, row.model_id)


def resolve_model(session: Session, field: str, ref: int | str) -> tuple[Model, dict[str, Any]]:
    """The model a job field names (an id, or a name: its promoted version now), and how it was resolved
    (recorded on the job)."""
    if isinstance(ref, int):
        model = session.get(Model, ref)
        if model is None:
            raise InputError(f"{field}: model {ref} does not exist")
        return model, {"id": model.id, "name": model.name, "version": model.version, "by": "id"}
    model = promoted_model(session, ref)
    if model is None:
        known = session.scalar(select(func.count(Model.id)).where(Model.name == ref))
        why = "has no promoted version" if known else "is not a registered model name"
        raise InputError(f"{field}: {ref!r} {why}")
    return model, {"id": model.id, "name": model.name, "version": model.version, "by": "promoted"}


def _set_promoted(session: Session, name: str, model_id: int, *, expected: int | None) -> bool:
    """Make ``model_id`` the promoted version of ``name`` if ``expected`` still is (None: none yet)."""
    if expected is None:
        try:
            with session.begin_nested():
                session.add(PromotedModel(name=name, model_id=model_id))
        except IntegrityError:
            return False
        return True
    changed = session.execute(
        update(PromotedModel)
        .where(PromotedModel.name == name, PromotedModel.model_id == expected)
        .values(model_id=model_id, updated_at=utcnow())
    ).rowcount
    return changed == 1


def promote(
    session: Session,
    model: Model,
    *,
    reason: str = "",
    created_by: int | None = None,
    job_id: int | None = None,
    expected: Any = ANY,
) -> Promotion:
    """Promote ``model`` over its name's promoted version. ``expected``: the version (a model, or None for
    none) that must still be promoted for this to happen — the one a gate compared the model with;
    :data:`ANY`: whichever is. :class:`Conflict` when the model already is promoted, or ``expected`` no
    longer is."""
    current = promoted_model(session, model.name)
    if current is not None and current.id == model.id:
        raise Conflict(f"{model.name} v{model.version} is already the promoted version")
    if expected is not ANY and (None if expected is None else expected.id) != (current and current.id):
        was = "none" if expected is None else f"v{expected.version}"
        now = "none" if current is None else f"v{current.version}"
        raise Conflict(f"{model.name}: the promoted version changed from {was} to {now} meanwhile")
    if not _set_promoted(session, model.name, model.id, expected=None if current is None else current.id):
        raise Conflict(f"{model.name}: another promotion happened at the same time; try again")
    row = Promotion(
        name=model.name, action="promote", model_id=model.id,
        previous_id=None if current is None else current.id, reason=reason, created_by=created_by,
        job_id=job_id,
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


def rollback(session: Session, name: str, *, reason: str = "", created_by: int | None = None) -> Promotion:
    """Undo the promotion that made the current version of ``name`` promoted: its previous version is
    promoted again. :class:`NotFound` for an unknown name, :class:`Conflict` with nothing to go back to."""
    current = promoted_model(session, name)
    if current is None:
        raise NotFound(f"model {name!r} has no promoted version")
    last = session.scalar(
        select(Promotion)
        .where(
            Promotion.name == name, Promotion.action == "promote", Promotion.model_id == current.id,
            Promotion.undone.is_(False),
        )
        .order_by(Promotion.id.desc())
        .limit(1)
    )  # fmt: skip
    previous = None if last is None or last.previous_id is None else session.get(Model, last.previous_id)
    if last is None or previous is None:
        raise Conflict(f"{name} v{current.version} has no earlier promoted version to roll back to")
    if not _set_promoted(session, name, previous.id, expected=current.id):
        raise Conflict(f"{name}: another promotion happened at the same time; try again")
    last.undone = True
    row = Promotion(
        name=name, action="rollback", model_id=previous.id, previous_id=current.id, reason=reason,
        created_by=created_by,
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


def promotions(session: Session, name: str) -> list[Promotion]:
    """The promotion history of ``name``, the newest first."""
    return list(
        session.scalars(select(Promotion).where(Promotion.name == name).order_by(Promotion.id.desc()))
    )
