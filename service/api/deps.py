"""What routes depend on: the app's runtime (settings, sessions, storage, the Celery app) and the caller's
token, as ``Annotated`` aliases so a route's signature shows what it needs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from distill.errors import InputError
from service import auth
from service.datasets import Conflict, NotFound, TooLarge
from service.db import reading, transaction
from service.runtime import Runtime

T = TypeVar("T")

_STATUS = (
    (NotFound, status.HTTP_404_NOT_FOUND),
    (Conflict, status.HTTP_409_CONFLICT),
    (TooLarge, status.HTTP_413_CONTENT_TOO_LARGE),
    (InputError, status.HTTP_422_UNPROCESSABLE_CONTENT),
)


def http_errors(work: Callable[[], T]) -> T:
    """``work()``, its :class:`~distill.errors.InputError` s as HTTP errors with their message (404 not
    found, 409 conflict, 413 too large, 422 otherwise)."""
    try:
        return work()
    except InputError as error:
        code = next(code for kind, code in _STATUS if isinstance(error, kind))
        raise HTTPException(code, str(error)) from None


M = TypeVar("M")


def get_or_404(session: Session, model: type[M], row_id: int, what: str) -> M:
    """The ``model`` row ``row_id``, or a 404 saying ``{what} {row_id} does not exist``."""
    row = session.get(model, row_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{what} {row_id} does not exist")
    return row


def page(session: Session, query: Select[Any], order: Any, offset: int, limit: int) -> tuple[list[Any], int]:
    """One page of ``query``'s rows in ``order``, and how many rows it has in all (``{data, count}``)."""
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    return list(session.scalars(query.order_by(order).offset(offset).limit(limit)).all()), count


async def get_runtime(request: Request) -> Runtime:  # async: no thread-pool hop for an attribute read
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_session(request: Request, runtime: RuntimeDep) -> Iterator[Session]:
    """The route's session: a read-only snapshot for GET/HEAD (never queued behind SQLite's writer), a
    transaction that commits when the route returns for every other method."""
    scope = reading if request.method in ("GET", "HEAD") else transaction
    with scope(runtime.sessions) as session:
        yield session


# scope="function": the session closes (a write commits) when the route returns, *before* the answer is sent;
# FastAPI's default runs a yield dependency's exit after sending, so a client could be told 201 for a row
# not committed yet (or never, if the commit failed)
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False)


def _look_up(runtime: Runtime, secret: str) -> tuple[auth.TokenInfo, dt.datetime | None] | None:
    # its own read-only session: a lookup must not take (or wait for) SQLite's write lock
    with reading(runtime.sessions) as session:
        row = auth.authenticate(session, secret)
        return None if row is None else (auth.TokenInfo(row.id, row.scope), row.expires_at)


def require(scope: str) -> Callable[..., Awaitable[auth.TokenInfo]]:
    """A dependency admitting tokens of ``scope`` or above: 401 without a valid token, 403 below the scope.

    A token found live is trusted for ``DISTILL_TOKEN_CACHE_SECONDS`` (the app's :class:`auth.TokenCache`)
    before it is looked up again; a cached check runs on the event loop, a lookup in the thread pool."""

    async def check(
        request: Request,
        runtime: RuntimeDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> auth.TokenInfo:
        token = None
        if credentials is not None:
            cache: auth.TokenCache = request.app.state.tokens
            token = cache.get(credentials.credentials)
            if token is None:
                found = await run_in_threadpool(_look_up, runtime, credentials.credentials)
                if found is not None:
                    token = found[0]
                    cache.put(credentials.credentials, *found)
        if token is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid API token is needed: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not auth.allows(token.scope, scope):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this needs a {scope} token (yours: {token.scope})"
            )
        return token

    return check


Read = Depends(require("read"))
Write = Depends(require("write"))
ReadToken = Annotated[auth.TokenInfo, Depends(require("read"))]
WriteToken = Annotated[auth.TokenInfo, Depends(require("write"))]
