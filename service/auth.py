"""API tokens: random bearer secrets, stored only as their SHA-256, each with a scope.

Scopes are ordered — ``read`` < ``write`` < ``admin`` — and a token allows what its scope and the scopes
below it allow. The plaintext is shown once, when the token is created.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiToken, aware, utcnow

SCOPES = ("read", "write", "admin")
PREFIX = "dst_"
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class TokenInfo:
    """What a request keeps of its token after the session that read it has closed."""

    id: int
    scope: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenCache:
    """Tokens recently found live, by hash, each trusted for ``seconds`` after its database lookup.

    The API's hot path: a poller's every request would otherwise open a database session (and, for a sync
    dependency, take a thread) only to find its token again. The cost is a revocation delay: a token revoked
    in the database is still accepted for up to ``seconds`` by a process that has it cached. An entry never
    outlives its token's own expiry; unknown tokens are never cached (each one is looked up).
    ``seconds`` <= 0 turns the cache off. Not thread-safe: the API uses it from its event loop only.
    """

    def __init__(
        self, seconds: float, *, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, TokenInfo, dt.datetime | None]] = {}

    def get(self, token: str) -> TokenInfo | None:
        """The cached token, or None (not cached, cached too long ago, or past its expiry)."""
        if self.seconds <= 0:
            return None
        digest = _digest(token)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        cached_at, info, expires_at = entry
        if self._clock() - cached_at >= self.seconds or (expires_at is not None and expires_at <= utcnow()):
            del self._entries[digest]
            return None
        return info

    def put(self, token: str, info: TokenInfo, expires_at: dt.datetime | None) -> None:
        """Remember a token just found live (``expires_at``: its expiry, None for none)."""
        if self.seconds <= 0:
            return
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest
        expiry = None if expires_at is None else aware(expires_at)
        self._entries[_digest(token)] = (self._clock(), info, expiry)


def create_token(
    session: Session, *, scope: str, name: str = "", expires_at: dt.datetime | None = None
) -> str:
    """A new token of ``scope`` (valid until ``expires_at``, an aware time; None: until revoked); returns its
    plaintext (the database keeps only the hash)."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= utcnow()):
        raise ValueError(f"expires_at {expires_at.isoformat()}: expected an aware time in the future")
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_sha256=_digest(token), scope=scope, expires_at=expires_at))
    session.flush()
    return token


def authenticate(session: Session, token: str) -> ApiToken | None:
    """The live token row of a presented bearer token, or None (unknown, malformed, revoked or expired)."""
    if not token.startswith(PREFIX) or len(token) > 256:
        return None
    digest = _digest(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
    if row is None or not hmac.compare_digest(row.token_sha256, digest) or not row.live(utcnow()):
        return None
    return row


def allows(granted: str, required: str) -> bool:
    """Whether a token of scope ``granted`` may do what needs ``required``."""
    return SCOPES.index(granted) >= SCOPES.index(required)


def revoke(session: Session, token_id: int) -> bool:
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked:
        return False
    row.revoked = True
    return True


def register_token(session: Session, token: str, *, scope: str, name: str = "") -> bool:
    """Store a token whose plaintext the caller chose (``DISTILL_ADMIN_TOKEN``); True when it was not stored
    yet. ValueError for a malformed one (``dst_`` + at least 32 URL-safe characters), or one stored already
    with another scope or revoked."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    body = token.removeprefix(PREFIX)
    if not token.startswith(PREFIX) or len(body) < 32 or len(token) > 256 or not _URLSAFE.fullmatch(body):
        raise ValueError(f"a token is {PREFIX!r} followed by 32 to 252 characters of A-Z a-z 0-9 - _")
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == _digest(token)))
    if row is None:
        session.add(ApiToken(name=name, token_sha256=_digest(token), scope=scope))
        session.flush()
        return True
    if row.revoked:
        raise ValueError(f"that token (id {row.id}) was revoked")
    if row.scope != scope:
        raise ValueError(
            f"that token (id {row.id}) is stored already with scope {row.scope!r}, not {scope!r}"
        )
    return False


def list_tokens(session: Session) -> list[ApiToken]:
    """Every stored token, oldest first (hashes only: no plaintext is kept)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))
