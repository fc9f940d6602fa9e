"""``mount_dashboard(app)``: the dashboard's routers, its static files (no CDN: it works offline), the
redirect to the login form, HTML error pages under ``/ui`` and the security headers of its pages."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.ui import catalog, jobs, login
from service.ui.deps import SignInFirst, login_url, render

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


class SecurityHeaders:
    """Pure ASGI middleware (no per-request task or body stream, unlike ``@app.middleware``): the
    dashboard's pages get :data:`SECURITY_HEADERS` and ``Cache-Control: no-store``; other paths pass."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/ui" and not path.startswith("/ui/"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in {**SECURITY_HEADERS, "Cache-Control": "no-store"}.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)


def mount_dashboard(app: FastAPI) -> None:
    app.include_router(login.router)
    app.include_router(jobs.router)
    app.include_router(catalog.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/jobs", 303)

    @app.exception_handler(SignInFirst)
    async def sign_in_first(request: Request, exc: SignInFirst) -> Response:
        return RedirectResponse(login_url(exc.next_url), 303)

    @app.exception_handler(StarletteHTTPException)
    async def html_errors(request: Request, exc: HTTPException) -> Response:
        if not request.url.path.startswith("/ui/") or request.url.path.startswith("/ui/static/"):
            return await http_exception_handler(request, exc)
        return render(request, "error.html", None, exc.status_code, code=exc.status_code, detail=exc.detail)

    app.add_middleware(SecurityHeaders)
