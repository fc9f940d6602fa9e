"""Signing in and out of the dashboard: an API token for a session cookie (HttpOnly, SameSite=Strict, Secure
over https), the login form protected by its own form token and rate-limited per client address."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse

from service.api.deps import RuntimeDep
from service.db import reading, transaction
from service.ui import sessions
from service.ui.deps import ViewerDep, render

router = APIRouter(prefix="/ui", include_in_schema=False)
limiter = sessions.LoginLimiter()


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only (no other site)."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/jobs"


def _login_form(request: Request, next_url: str, *, error: str | None = None, code: int = 200) -> Response:
    nonce = secrets.token_urlsafe(32)
    response = render(request, "login.html", None, code, next=next_url, csrf=nonce, error=error)
    response.set_cookie(sessions.LOGIN_COOKIE, nonce, max_age=3600, path="/ui", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return response


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, runtime: RuntimeDep, next: str = "/ui/jobs") -> Response:
    with reading(runtime.sessions) as session:
        signed_in = sessions.viewer(session, request.cookies.get(sessions.COOKIE))
    if signed_in is not None:
        return RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)
    return _login_form(request, _safe_next(next))


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    runtime: RuntimeDep,
    token: Annotated[str, Form(max_length=256)] = "",
    csrf: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/jobs",
) -> Response:
    client = request.client.host if request.client else "unknown"
    wait = limiter.retry_after(client)
    if wait:
        response = _login_form(request, _safe_next(next), code=status.HTTP_429_TOO_MANY_REQUESTS,
                               error=f"too many failed sign-ins: try again in {wait} s")  # fmt: skip
        response.headers["Retry-After"] = str(wait)
        return response
    if not sessions.same_token(request.cookies.get(sessions.LOGIN_COOKIE), csrf):
        return _login_form(request, _safe_next(next), code=status.HTTP_403_FORBIDDEN,
                           error="the sign-in form expired or came from another site: try again")  # fmt: skip
    with transaction(runtime.sessions) as session:
        made = sessions.sign_in(session, token.strip(), hours=runtime.settings.ui_session_hours)
    if made is None:
        limiter.failed(client)
        return _login_form(request, _safe_next(next), code=status.HTTP_401_UNAUTHORIZED,
                           error="that token is not valid (unknown, mistyped or revoked)")  # fmt: skip
    limiter.succeeded(client)
    secret, _ = made
    response = RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        sessions.COOKIE, secret, max_age=int(runtime.settings.ui_session_hours * 3600), path="/ui",
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip
    response.delete_cookie(sessions.LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
def logout(viewer: ViewerDep, runtime: RuntimeDep, csrf: Annotated[str, Form()] = "") -> Response:
    if not sessions.same_token(viewer.csrf, csrf):  # a read token may sign out too: no scope check
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form has expired: reload the page and try again")
    with transaction(runtime.sessions) as session:
        sessions.sign_out(session, viewer.session_id)
    response = RedirectResponse("/ui/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(sessions.COOKIE, path="/ui")
    return response
