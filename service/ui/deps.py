"""What the dashboard's pages depend on: the signed-in viewer (or a redirect to the login page), the form
token check of every state-changing form, and rendering a template with the viewer in its context."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from service import auth
from service.api.deps import RuntimeDep
from service.db import reading
from service.ui import sessions
from service.ui.sessions import Viewer

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")


class SignInFirst(Exception):
    """No signed-in viewer: the page answers with a redirect to the login form (then back to ``next``)."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def get_viewer(request: Request, runtime: RuntimeDep) -> Viewer:
    with reading(runtime.sessions) as session:
        found = sessions.viewer(session, request.cookies.get(sessions.COOKIE))
    if found is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInFirst(path)
    return found


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def check_form(viewer: Viewer, csrf: str | None) -> auth.TokenInfo:
    """A state-changing form's checks: its form token is the session's (403 otherwise) and the viewer's
    token may write (403 for a read token); returns the token to act as."""
    if not sessions.same_token(viewer.csrf, csrf):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form has expired or did not come from this site: "
                            "reload the page and try again")  # fmt: skip
    if not viewer.can_write:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this needs a write token (yours: {viewer.scope})")
    return auth.TokenInfo(viewer.token_id, viewer.scope)


def login_url(next_url: str) -> str:
    return f"/ui/login?next={quote(next_url, safe='/')}"


def render(
    request: Request, template: str, viewer: Viewer | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request, template, {"viewer": viewer, **context}, status_code=status_code
    )


def _when(value: str | dt.datetime | float | None) -> str:
    """A stored time as ``YYYY-MM-DD HH:MM:SS UTC`` (ISO strings, datetimes and unix seconds)."""
    if value in (None, ""):
        return "—"
    if isinstance(value, int | float):
        moment = dt.datetime.fromtimestamp(value, dt.UTC)
    elif isinstance(value, str):
        moment = dt.datetime.fromisoformat(value)
    else:
        moment = value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    """``1 h 02 min``, ``3 min 05 s``, ``12 s`` (— when unknown)."""
    if seconds is None:
        return "—"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _size(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TEMPLATES.env.filters.update(when=_when, duration=_duration, size=_size, number=_number)
