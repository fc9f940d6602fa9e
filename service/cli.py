"""The service's ``distill`` commands — ``distill up`` and ``distill token create|list|revoke`` — added to the
library's CLI through the ``distill.cli`` entry point (``register``), so ``distill/`` never imports the
service. Imports beyond typer happen inside the commands: every ``distill`` invocation loads this module."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import InputError

DataDir = Annotated[
    Path,
    typer.Option(
        envvar="DISTILL_DATA_DIR",
        help="state of a one-machine install: database, storage, Redis files, logs",
    ),
]


def up(
    host: Annotated[str, typer.Option(help="address the API listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the API")] = 8000,
    data_dir: DataDir = Path("var"),
    workers_gpu: Annotated[
        int | None,
        typer.Option(
            help="workers on the gpu queue (default: one per GPU, or one on the CPU when there is none)"
        ),
    ] = None,
    api_workers: Annotated[
        int, typer.Option(help="API processes (uvicorn --workers): more concurrent readers, a core each")
    ] = 1,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="DISTILL_REDIS_URL", help="use this Redis (default: start one under DATA_DIR/redis)"
        ),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(
            help="when ready, write {url, admin_token, pid, children, ...} here as JSON (mode 0600)"
        ),
    ] = None,
    worker_stop_timeout: Annotated[
        float, typer.Option(help="seconds a worker may take to finish its task on a stop before SIGKILL")
    ] = 30.0,
    start_timeout: Annotated[float, typer.Option(help="seconds to wait for Redis and then the API")] = 120.0,
) -> None:
    """Run the service on this machine: API, Celery workers and (without DISTILL_REDIS_URL) Redis, until
    Ctrl-C / SIGTERM."""
    from service.up import UpOptions, run_up

    options = UpOptions(
        host=host, port=port, data_dir=data_dir, workers_gpu=workers_gpu, api_workers=api_workers,
        redis_url=redis_url,
        ready_file=ready_file, worker_stop_timeout=worker_stop_timeout, start_timeout=start_timeout,
    )  # fmt: skip
    raise typer.Exit(run_up(options))


token_app = typer.Typer(no_args_is_help=True, help="API tokens of the service's database.")


def _sessions(data_dir: Path):
    """The session factory of the service's database (``DISTILL_DATABASE_URL`` or DATA_DIR/distill.db),
    migrated first; and its engine, for the caller to dispose."""
    from service.db import make_engine, session_factory, upgrade
    from service.up import settings_for

    settings = settings_for(data_dir.expanduser().resolve(), None)
    upgrade(settings.database)
    engine = make_engine(settings.database)
    return session_factory(engine), engine


@token_app.command("create")
def token_create(
    scope: Annotated[str, typer.Option(help="read | write | admin")],
    name: Annotated[str, typer.Option(help="a note saying what the token is for")] = "",
    expires_in: Annotated[
        str | None, typer.Option(help="valid for this long: 90m, 12h, 30d (default: until revoked)")
    ] = None,
    data_dir: DataDir = Path("var"),
) -> None:
    """Print a new token (only the token on stdout, for scripts: TOKEN=$(distill token create ...))."""
    from service import auth
    from service.db import transaction
    from service.models import utcnow

    if scope not in auth.SCOPES:
        raise InputError(f"--scope {scope!r}: expected one of {', '.join(auth.SCOPES)}")
    expires_at = None if expires_in is None else utcnow() + _duration(expires_in)
    sessions, engine = _sessions(data_dir)
    try:
        with transaction(sessions) as session:
            token = auth.create_token(session, scope=scope, name=name, expires_at=expires_at)
    finally:
        engine.dispose()
    typer.echo(token)
    until = "" if expires_at is None else f", valid until {expires_at:%Y-%m-%d %H:%M} UTC"
    typer.echo(f"distill: a {scope} token{until}; it is shown only now", err=True)


_UNITS = {"m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> dt.timedelta:
    """``90m`` / ``12h`` / ``30d`` as a timedelta (a positive whole number and a unit)."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit() or int(number) <= 0 or int(number) > 10**6:
        raise InputError(f"--expires-in {text!r}: expected a positive number with m, h or d (90m, 12h, 30d)")
    return dt.timedelta(seconds=int(number) * _UNITS[unit])


@token_app.command("list")
def token_list(data_dir: DataDir = Path("var")) -> None:
    """The stored tokens: id, scope, created, expiry, state, name (no secrets: only their hashes are kept)."""
    from service import auth
    from service.db import transaction
    from service.models import utcnow

    sessions, engine = _sessions(data_dir)
    now = utcnow()
    try:
        with transaction(sessions) as session:
            rows = [
                (t.id, t.scope, f"{t.created_at:%Y-%m-%d %H:%M}",
                 "never" if t.expires_at is None else f"{t.expires_at:%Y-%m-%d %H:%M}",
                 "revoked" if t.revoked else "live" if t.live(now) else "expired", t.name)
                for t in auth.list_tokens(session)
            ]  # fmt: skip
    finally:
        engine.dispose()
    typer.echo(f"{'id':>5}  {'scope':<6} {'created':<16}  {'expires':<16}  {'state':<8} name")
    for row in rows:
        typer.echo(f"{row[0]:>5}  {row[1]:<6} {row[2]:<16}  {row[3]:<16}  {row[4]:<8} {row[5]}")


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="the id `distill token list` shows")],
    data_dir: DataDir = Path("var"),
) -> None:
    """Revoke a token: requests bearing it get 401 from then on (a running API that checked it in the last
    DISTILL_TOKEN_CACHE_SECONDS, default 5, may accept it until that much time has passed)."""
    from service import auth
    from service.config import Settings
    from service.db import transaction

    sessions, engine = _sessions(data_dir)
    try:
        with transaction(sessions) as session:
            revoked = auth.revoke(session, token_id)
    finally:
        engine.dispose()
    if not revoked:
        raise InputError(f"token {token_id}: no such live token")
    seconds = Settings().token_cache_seconds
    typer.echo(f"revoked token {token_id} (running API processes refuse it within {seconds:g} s)")


def register(app: typer.Typer) -> None:
    """The ``distill.cli`` entry point: add ``up``, ``token`` and ``remote`` to the ``distill`` command."""
    from service.remote_cli import app as remote_app  # typer and the standard library only

    app.command("up")(up)
    app.add_typer(token_app, name="token")
    app.add_typer(remote_app, name="remote")
