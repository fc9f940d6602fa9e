"""The service's settings: one pydantic-settings class, every field a ``DISTILL_*`` environment variable.

::

    DISTILL_DATA_DIR=./var                      state of a one-machine install: database, storage, Redis, logs
    DISTILL_DATABASE_URL=postgresql+psycopg://… default: SQLite (WAL) at DATA_DIR/distill.db
    DISTILL_STORAGE_URL=s3://bucket/distill     default: the folder DATA_DIR/storage (any fsspec URL)
    DISTILL_STORAGE_OPTIONS='{"endpoint_url": …}' JSON: keyword arguments of that fsspec filesystem
    DISTILL_LEASE_SECONDS=600                   a shard's lease; a worker's heartbeat renews it
    DISTILL_MAX_ATTEMPTS=3                      deliveries of one unit of work before the job fails
    DISTILL_SHARD_SIZE=64                       unlabeled images per inference shard (one task each)
    DISTILL_ERROR_BUDGET=0.05                   unreadable unlabeled images a job tolerates (fraction)
    DISTILL_DEVICE=auto                         the workers' torch device: auto (CUDA when there), cpu, cuda:N
    DISTILL_SWEEP_SECONDS=60                    how often the API sweeps the ledger for expired leases
    DISTILL_VISIBILITY_TIMEOUT=21600            Redis redelivers an unacknowledged task after this (s)
    DISTILL_TASK_TIME_LIMIT=                    hard limit of one unit of work (s); default none
    DISTILL_INFERENCE_CACHE=true                keep fused predictions per (teacher, image, views, fusion)
    DISTILL_SCHEDULE_TICK_SECONDS=30            how often celery beat asks whether a schedule is due
    DISTILL_UI_SESSION_HOURS=12                 how long a dashboard login lasts
    DISTILL_TOKEN_CACHE_SECONDS=5               an API process trusts a token it found live this long (so a
                                                revoked token may work this long there; 0: look up each time)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from distill.storage import Storage


class Settings(BaseSettings):
    # an empty variable is an unset one (compose passes ``VAR:`` through empty when the host has it empty)
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="forbid", env_ignore_empty=True)

    data_dir: Path = Path("var")
    database_url: str | None = None
    storage_url: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    redis_url: str | None = None
    lease_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    shard_size: int = Field(64, ge=1)
    error_budget: float = Field(0.05, ge=0, le=1)
    device: str = "auto"
    sweep_seconds: float = Field(60.0, gt=0)
    visibility_timeout: float = Field(6 * 3600.0, gt=0)
    task_time_limit: float | None = Field(None, gt=0)
    inference_cache: bool = True
    schedule_tick_seconds: float = Field(30.0, gt=0)
    ui_session_hours: float = Field(12.0, gt=0, le=24 * 30)
    token_cache_seconds: float = Field(5.0, ge=0)  # how long the API trusts a token it found live
    max_body_bytes: int = Field(2**20, ge=1024)  # JSON and form bodies; uploads are limited per file

    @property
    def cache_prefix(self) -> str | None:
        """The storage key prefix of the inference cache (None: off)."""
        return "cache/infer" if self.inference_cache else None

    @property
    def database(self) -> str:
        """The SQLAlchemy URL: ``database_url`` or the SQLite file under ``data_dir``."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'distill.db').resolve()}"

    @property
    def storage(self) -> str:
        return self.storage_url or str((self.data_dir / "storage").resolve())

    def open_storage(self) -> Storage:
        """The service's :class:`~distill.storage.Storage`: ``storage`` with ``storage_options``."""
        return Storage(self.storage, options=self.storage_options)
