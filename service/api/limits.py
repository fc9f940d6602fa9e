"""A size limit on request bodies that are not uploads: JSON and form bodies are read whole into memory,
so one above ``max_body_bytes`` is answered 413 before it is read (``Content-Length``) or as soon as it
passes the limit (chunked). ``multipart/form-data`` uploads are streamed to disk by their routes, which
limit each file themselves."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Pure ASGI middleware: 413 for a non-multipart body above ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _content_type(scope).startswith("multipart/form-data"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared in (None, 0) and _header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)  # no body (a GET): nothing to count
            return
        if declared is not None and declared > self.limit:
            await _too_large(send, self.limit)
            return
        seen, started, refused = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not refused:
                    refused = True
                    if not started:
                        await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}  # the route stops reading; its answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _content_type(scope: Scope) -> str:
    return (_header(scope, b"content-type") or "").lower()


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def _too_large(send: Send, limit: int) -> None:
    body: dict[str, Any] = {
        "detail": f"request body above the limit of {limit} bytes (uploads go as multipart/form-data files)"
    }
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": data})
