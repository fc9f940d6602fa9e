"""The service's settings: one pydantic-settings class, every field a ``DISTILL_*`` environment variable.

::

    DISTILL_DATA_DIR=./var                      state of a one-machine install: database, storage, Redis, logs
    DISTILL_DATABASE_URL=postgresql+psycopg://… default: SQLite (WAL) at DATA_DIR/distill.db
    DISTILL_STORAGE_URL=s3://bucket/distill     default: the folder DATA_DIR/storage (any fsspec URL)
    DISTILL_LEASE_SECONDS=600                   a shard's lease; a worker's heartbeat renews it
    DISTILL_MAX_ATTEMPTS=3                      deliveries of one shard before the job fails
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="forbid")

    data_dir: Path = Path("var")
    database_url: str | None = None
    storage_url: str | None = None
    redis_url: str | None = None
    lease_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    shard_size: int = Field(64, ge=1)

    @property
    def database(self) -> str:
        """The SQLAlchemy URL: ``database_url`` or the SQLite file under ``data_dir``."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'distill.db').resolve()}"

    @property
    def storage(self) -> str:
        return self.storage_url or str((self.data_dir / "storage").resolve())
