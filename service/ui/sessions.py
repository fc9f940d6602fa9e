"""Dashboard logins: an API token is exchanged for a session cookie, and every form carries a CSRF token.

A session is a ``ui_sessions`` row: the cookie holds a random secret, the row its SHA-256, the API token it
was made from and a per-session form token. A request is signed in while the row has not expired and its
API token is not revoked, so revoking a token ends its sessions. Failed logins are rate-limited per client
address (in the API process's memory: each API replica counts its own).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service import auth
from service.models import ApiToken, UiSession, aware, utcnow

COOKIE = "distill_session"
LOGIN_COOKIE = "distill_login"  # the login form's own CSRF token (double submit: cookie == field)


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the session's API token (id, scope) and the form token its forms must carry."""

    session_id: int
    token_id: int
    scope: str
    csrf: str

    @property
    def can_write(self) -> bool:
        return auth.allows(self.scope, "write")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def sign_in(session: Session, token: str, *, hours: float) -> tuple[str, Viewer] | None:
    """A new session for a valid API token: ``(cookie secret, viewer)``; None for an unknown or revoked one.
    Expired sessions are deleted on the way."""
    row = auth.authenticate(session, token)
    if row is None:
        return None
    now = utcnow()
    session.execute(delete(UiSession).where(UiSession.expires_at < now))
    secret = secrets.token_urlsafe(32)
    ui = UiSession(
        secret_sha256=_digest(secret), token_id=row.id, csrf=secrets.token_urlsafe(32),
        created_at=now, expires_at=now + dt.timedelta(hours=hours),
    )  # fmt: skip
    session.add(ui)
    session.flush()
    return secret, Viewer(ui.id, row.id, row.scope, ui.csrf)


def viewer(session: Session, secret: str | None) -> Viewer | None:
    """The signed-in viewer of a cookie secret, or None (no cookie, unknown, expired, token revoked or
    expired)."""
    if not secret or len(secret) > 256:
        return None
    found = session.execute(
        select(UiSession, ApiToken)
        .join(ApiToken, ApiToken.id == UiSession.token_id)
        .where(UiSession.secret_sha256 == _digest(secret))
    ).first()
    if found is None:
        return None
    ui, token = found
    now = utcnow()
    if not token.live(now) or aware(ui.expires_at) <= now:
        return None
    return Viewer(ui.id, token.id, token.scope, ui.csrf)


def sign_out(session: Session, session_id: int) -> None:
    session.execute(delete(UiSession).where(UiSession.id == session_id))


def same_token(expected: str | None, given: str | None) -> bool:
    """Whether a submitted form token matches the expected one (constant time; both must be present)."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginLimiter:
    """At most ``attempts`` failed logins per client address in ``window`` seconds."""

    def __init__(self, attempts: int = 10, window: float = 300.0) -> None:
        self.attempts, self.window = attempts, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures[client]
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.attempts:
                return 0
            return max(1, int(failures[0] + self.window - now) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
