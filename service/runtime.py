"""What the service's code needs at hand: its settings, database sessions, storage, and how to enqueue a unit
of work. The API builds one on start; a worker builds one for the tasks that start jobs (schedules)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from distill.storage import Storage
from service.config import Settings


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    enqueue: Callable[[int, str, int, str], None]  # (job id, stage, unit index, queue)
