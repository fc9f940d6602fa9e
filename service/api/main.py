"""The FastAPI application: ``create_app(settings)``. On start it migrates the database and sweeps the
ledger (expired leases back to the queue, their shards enqueued again), so no job stays "running" after a
crash. Every route but ``/healthz`` needs a bearer token."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.routing import APIRoute
from sqlalchemy import text

from distill.storage import Storage
from service import ledger
from service.api.datasets import router as datasets_router
from service.api.deps import Read, Runtime, RuntimeDep
from service.api.routes import router as jobs_router
from service.config import Settings
from service.db import make_engine, session_factory, transaction, upgrade


def _operation_id(route: APIRoute) -> str:
    return route.name  # stable ids: the function names


def create_app(settings: Settings | None = None, *, enqueue=None) -> FastAPI:
    """The API over ``settings`` (default: the ``DISTILL_*`` environment). ``enqueue(task, args)`` defaults
    to sending the task to the Celery broker."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        upgrade(settings.database)
        engine = make_engine(settings.database)
        send = enqueue
        celery = None
        if send is None:
            from workers.app import make_celery

            celery = make_celery(settings)

            def send(task: str, args: list[Any]) -> None:
                celery.send_task(task, args=args)

        runtime = Runtime(settings, session_factory(engine), Storage(settings.storage), send)
        with transaction(runtime.sessions) as session:
            requeue = ledger.sweep(session, now=time.time(), max_attempts=settings.max_attempts)
        for job_id, index in requeue:
            send("distill.infer_shard", [job_id, index])
        app.state.runtime = runtime
        yield
        if celery is not None:
            celery.close()
        engine.dispose()

    app = FastAPI(title="distill", lifespan=lifespan, generate_unique_id_function=_operation_id)

    @app.get("/healthz", operation_id="healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz", tags=["health"], dependencies=[Read])
    def readyz(runtime: RuntimeDep, response: Response) -> dict[str, str]:
        checks = {"database": "ok", "storage": "ok"}
        try:
            with runtime.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error: report it, do not crash the probe
            checks["database"] = f"unreachable: {type(exc).__name__}"
        storage = runtime.storage
        if not storage.fs.exists(storage.root or "."):
            checks["storage"] = f"missing: {storage.describe('')}"
        if any(v != "ok" for v in checks.values()):
            response.status_code = 503
        return checks

    app.include_router(jobs_router)
    app.include_router(datasets_router)
    return app


def __getattr__(name: str):  # ``uvicorn service.api.main:app`` builds the app from the environment
    if name == "app":
        return create_app()
    raise AttributeError(name)
