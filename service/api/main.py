"""The FastAPI application: ``create_app(settings)``. On start it migrates the database and sweeps the
ledger (expired leases back to the queue, their shards enqueued again), so no job stays "running" after a
crash. Every route but ``/healthz`` needs a bearer token; the dashboard (``/ui``) a session cookie made
from one."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import text
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool

from service import ledger
from service.api.datasets import router as datasets_router
from service.api.deps import Read, Runtime, RuntimeDep
from service.api.limits import BodyLimit
from service.api.metrics import queue_depths
from service.api.metrics import router as metrics_router
from service.api.models import router as models_router
from service.api.routes import router as jobs_router
from service.api.schedules import router as schedules_router
from service.auth import TokenCache
from service.config import Settings
from service.db import make_engine, session_factory, transaction, upgrade
from service.ui.app import mount_dashboard

logger = logging.getLogger(__name__)


def _operation_id(route: APIRoute) -> str:
    return route.name  # stable ids: the function names


def _sweep(runtime: Runtime, *, all_queued: bool, broker_url: str | None = None) -> None:
    """Expired leases back to the queue (and, on start, every queued unit enqueued again). Periodically,
    also the units never delivered although their stage began a sweep ago, when their broker queue is empty
    (their task was lost: an enqueue that failed after the job's commit)."""
    settings, now = runtime.settings, time.time()
    with transaction(runtime.sessions) as session:
        units = ledger.sweep(session, now=now, max_attempts=settings.max_attempts, all_queued=all_queued)
        lost = [] if all_queued else ledger.undelivered(session, now=now, older_than=settings.sweep_seconds)
    if lost and broker_url is not None:
        depths = queue_depths(broker_url, tuple({unit[3] for unit in lost}))
        units += [u for u in lost if depths[u[3]] == 0 and u not in units]
    for job_id, stage, index, queue in units:
        runtime.enqueue(job_id, stage, index, queue)


async def _sweep_every(runtime: Runtime, seconds: float, broker_url: str | None) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(_sweep, runtime, all_queued=False, broker_url=broker_url)
        except Exception:  # a database or broker hiccup: log it, try again next time
            logger.exception("ledger sweep failed")


def create_app(settings: Settings | None = None, *, enqueue=None) -> FastAPI:
    """The API over ``settings`` (default: the ``DISTILL_*`` environment). ``enqueue(job_id, stage, index,
    queue)`` defaults to sending ``distill.run_unit`` to the Celery broker."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        upgrade(settings.database)
        engine = make_engine(settings.database)
        send = enqueue
        celery = None
        app.state.broker_url = None
        if send is None:
            from workers.app import DEFAULT_BROKER, make_celery

            app.state.broker_url = settings.redis_url or DEFAULT_BROKER

            celery = make_celery(settings)

            def send(job_id: int, stage: str, index: int, queue: str) -> None:
                celery.send_task("distill.run_unit", args=[job_id, stage, index], queue=queue)

        storage = settings.open_storage()
        storage.fs.makedirs(storage.root or ".", exist_ok=True)  # a fresh data dir is ready, not 503
        runtime = Runtime(settings, session_factory(engine), storage, send)
        _sweep(runtime, all_queued=True)
        app.state.runtime = runtime
        sweeper = asyncio.create_task(_sweep_every(runtime, settings.sweep_seconds, app.state.broker_url))
        yield
        sweeper.cancel()
        if celery is not None:
            celery.close()
        engine.dispose()

    app = FastAPI(title="distill", lifespan=lifespan, generate_unique_id_function=_operation_id)
    app.state.tokens = TokenCache(settings.token_cache_seconds)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    async def out_of_range(request: Request, exc: Exception) -> JSONResponse:
        # an id or number the database cannot hold (SQLite: OverflowError, PostgreSQL: DataError)
        return JSONResponse(
            {"detail": f"{request.url.path}: a number is out of range (ids are 1 .. 2**63-1)"}, 422
        )

    @app.get("/healthz", operation_id="healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz", tags=["health"], dependencies=[Read])
    def readyz(runtime: RuntimeDep, response: Response) -> dict[str, str]:
        checks = {"database": "ok", "storage": "ok"}
        if app.state.broker_url is not None:
            reachable = queue_depths(app.state.broker_url, ("gpu",))["gpu"] >= 0
            checks["broker"] = "ok" if reachable else "unreachable"
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
    app.include_router(metrics_router)
    app.include_router(datasets_router)
    app.include_router(models_router)
    app.include_router(schedules_router)
    mount_dashboard(app)
    return app


def __getattr__(name: str):  # ``uvicorn service.api.main:app`` builds the app from the environment
    if name == "app":
        return create_app()
    raise AttributeError(name)
