"""The service's tables (SQLAlchemy 2 declarative). Changing them needs a migration in ``migrations/``.

- ``jobs``: one row per job (type, state, stage, progress, the spec it runs, outcome);
- ``shards``: one row per unit of work of a job — a stage (``teacher``, ``infer``, ``pseudo_label``, …) has
  one or more units (inference: one per shard of images); the ledger the workers claim work from (state,
  attempts, lease owner and expiry, heartbeat, output key);
- ``api_tokens``: hashed bearer tokens with a scope;
- ``datasets`` / ``images``: uploaded image sets (labeled, unlabeled, eval), one image row per stored file;
- ``models``: registered models, uploaded or made by jobs, with their lineage;
- ``promoted_models``: the promoted version of each model name (at most one), and ``promotions`` the
  history of every promotion and rollback, with who and why;
- ``ui_sessions``: the dashboard's signed-in browsers, each tied to the API token it signed in with (a revoked
  token ends its sessions);
- ``schedules`` / ``schedule_runs``: scheduled retraining, one run row per (schedule, cron slot) — the
  unique pair is what makes a slot run once however many beat processes tick.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
SHARD_STATES = ("queued", "running", "done", "failed")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(value: dt.datetime) -> dt.datetime:
    """A stored time with its zone: SQLite keeps none, and the service writes UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str] = mapped_column(String(64), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    plan: Mapped[list[Any]] = mapped_column(default=list)  # stage names in order; ``stage``: the current
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    skipped: Mapped[list[Any]] = mapped_column(default=list)  # [{name, reason}] images a step could not use
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    created_by: Mapped[int | None] = mapped_column(Integer, default=None)  # api_tokens.id

    shards: Mapped[list[Shard]] = relationship(back_populates="job", order_by="(Shard.stage, Shard.index)")


class Shard(Base):
    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("job_id", "stage", "index", name="uq_shard_job_stage_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(64), default="infer")
    index: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(16), default="gpu")
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires: Mapped[float | None] = mapped_column(Float, default=None)  # unix seconds
    heartbeat_at: Mapped[float | None] = mapped_column(Float, default=None)
    claimed_at: Mapped[float | None] = mapped_column(Float, default=None)  # this attempt's start (unix s)
    finished_at: Mapped[float | None] = mapped_column(Float, default=None)
    images: Mapped[int] = mapped_column(Integer, default=0)  # items of work: images, iterations
    done: Mapped[int] = mapped_column(Integer, default=0)  # of them done (the unit's progress)
    output_key: Mapped[str | None] = mapped_column(String(512), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    job: Mapped[Job] = relationship(back_populates="shards")


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    def live(self, now: dt.datetime) -> bool:
        """Not revoked and not expired at ``now``."""
        return not self.revoked and (self.expires_at is None or aware(self.expires_at) > now)


class UiSession(Base):
    """A dashboard login: the cookie holds ``secret``, the row only its SHA-256 and the form token (CSRF)."""

    __tablename__ = "ui_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # labeled | unlabeled | eval
    annotations_key: Mapped[str | None] = mapped_column(String(512), default=None)  # validated COCO json
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    images: Mapped[list[Image]] = relationship(
        back_populates="dataset", order_by="Image.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("dataset_id", "name", name="uq_image_dataset_name"),
        UniqueConstraint("dataset_id", "sha256", name="uq_image_dataset_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))  # the file name the COCO json refers to
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(512))  # storage key
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(512), unique=True)  # storage key of the model directory
    backend: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(16))  # upload | job
    role: Mapped[str] = mapped_column(String(16), default="")  # teacher | student | trained | imported
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), default=None)
    datasets: Mapped[dict[str, Any]] = mapped_column(default=dict)  # role -> dataset id
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)  # eval dataset id -> COCO metrics
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)  # categories, iterations, config summary
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PromotedModel(Base):
    """The promoted version of a model name: what jobs that name the model by name use."""

    __tablename__ = "promoted_models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Promotion(Base):
    """One promotion or rollback of a model name. A rollback marks the promotion it undoes ``undone`` and
    restores that promotion's ``previous_id``, so successive rollbacks walk back through the history."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(16))  # promote | rollback
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))  # promoted after it
    previous_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), default=None
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[int | None] = mapped_column(Integer, default=None)  # api_tokens.id
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Schedule(Base):
    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    model: Mapped[str] = mapped_column(String(128))  # a model name: its promoted version is the teacher
    labeled: Mapped[int] = mapped_column(Integer)
    unlabeled: Mapped[int] = mapped_column(Integer)
    eval: Mapped[int] = mapped_column(Integer)
    pipeline: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the job's other settings
    min_new_images: Mapped[int] = mapped_column(Integer, default=0)
    promotion: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {metric, min_gain}
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ScheduleRun(Base):
    """What one slot of a schedule did: started a job (``job_id``), or was skipped (``reason``)."""

    __tablename__ = "schedule_runs"
    __table_args__ = (UniqueConstraint("schedule_id", "slot", name="uq_schedule_run_slot"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"), index=True)
    slot: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))  # the cron time, UTC
    state: Mapped[str] = mapped_column(String(16))  # started | skipped
    reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    teacher_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), default=None)
    images: Mapped[int] = mapped_column(Integer, default=0)  # unlabeled images the run considered
    new_images: Mapped[int] = mapped_column(Integer, default=0)  # of them new since the last successful run
    images_upto: Mapped[int] = mapped_column(Integer, default=0)  # the newest image id considered
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
