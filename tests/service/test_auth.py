"""API tokens: only the hash is stored, scopes are ordered; revoked, expired, malformed tokens get nowhere."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from service import auth
from service.db import make_engine, session_factory, transaction
from service.models import ApiToken, utcnow
from service.ui import sessions as ui_sessions


@pytest.fixture
def sessions(db_url: str):
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def test_tokens_are_stored_hashed_scoped_and_revocable(sessions) -> None:
    with transaction(sessions) as session:
        writer = auth.create_token(session, scope="write", name="ci")
        reader = auth.create_token(session, scope="read")
    with transaction(sessions) as session:
        stored = session.scalars(select(ApiToken.token_sha256)).all()
        assert writer not in stored and len(stored) == 2  # no plaintext in the database
        row = auth.authenticate(session, writer)
        assert row is not None and row.scope == "write" and row.name == "ci"
        assert auth.allows(row.scope, "read") and auth.allows(row.scope, "write")
        assert not auth.allows(row.scope, "admin")
        assert auth.authenticate(session, reader).scope == "read"
        assert auth.authenticate(session, writer + "x") is None
        assert auth.authenticate(session, "Bearer " + writer) is None
        assert auth.authenticate(session, "") is None
        assert auth.revoke(session, row.id) and not auth.revoke(session, row.id)
    with transaction(sessions) as session:
        assert auth.authenticate(session, writer) is None
    with transaction(sessions) as session, pytest.raises(ValueError, match="scope 'root'"):
        auth.create_token(session, scope="root")


def test_a_token_past_its_expiry_gets_nowhere_and_its_dashboard_sessions_end(sessions) -> None:
    now = utcnow()
    with transaction(sessions) as session:
        soon = auth.create_token(session, scope="write", expires_at=now + dt.timedelta(hours=1))
        forever = auth.create_token(session, scope="read")
        signed_in = ui_sessions.sign_in(session, soon, hours=12)
        assert signed_in is not None
        with pytest.raises(ValueError, match="in the future"):
            auth.create_token(session, scope="read", expires_at=now - dt.timedelta(seconds=1))
        with pytest.raises(ValueError, match="aware time"):
            auth.create_token(session, scope="read", expires_at=dt.datetime(2999, 1, 1))
    with transaction(sessions) as session:
        assert auth.authenticate(session, soon) is not None
        assert ui_sessions.viewer(session, signed_in[0]) is not None
        row = session.scalar(select(ApiToken).where(ApiToken.expires_at.is_not(None)))
        row.expires_at = now - dt.timedelta(seconds=1)  # an hour later
    with transaction(sessions) as session:
        assert auth.authenticate(session, soon) is None
        assert ui_sessions.viewer(session, signed_in[0]) is None  # the cookie dies with its token
        assert ui_sessions.sign_in(session, soon, hours=12) is None
        assert auth.authenticate(session, forever) is not None


def test_the_token_cache_forgets_after_its_time_and_at_the_token_expiry() -> None:
    now = [100.0]
    cache = auth.TokenCache(5.0, max_entries=2, clock=lambda: now[0])
    reader = auth.TokenInfo(1, "read")
    cache.put("dst_a", reader, None)
    assert cache.get("dst_a") == reader and cache.get("dst_b") is None
    now[0] += 4.9
    assert cache.get("dst_a") == reader
    now[0] += 0.1
    assert cache.get("dst_a") is None  # 5 s after its lookup: looked up again
    cache.put("dst_c", reader, utcnow() - dt.timedelta(seconds=1))
    assert cache.get("dst_c") is None  # never past the token's own expiry
    for name in ("dst_1", "dst_2", "dst_3"):
        cache.put(name, reader, None)
    assert cache.get("dst_1") is None and cache.get("dst_3") == reader  # bounded: the oldest goes
    off = auth.TokenCache(0)
    off.put("dst_a", reader, None)
    assert off.get("dst_a") is None


@pytest.mark.parametrize("cache_seconds", [0.0, 1.0])
def test_a_revoked_token_is_refused_once_the_cache_time_has_passed(tmp_path, cache_seconds) -> None:
    """The API trusts a token it found live for DISTILL_TOKEN_CACHE_SECONDS: a revocation made by another
    process (the CLI) is seen at once with the cache off, and after at most that long with it on."""
    import time

    from tests.service.conftest import served_api

    with served_api(tmp_path, scope="read", token_cache_seconds=cache_seconds) as api:
        with transaction(api.sessions) as session:
            token_id = auth.authenticate(session, api.token).id
        assert api.client.get("/v1/datasets").status_code == 200
        with transaction(api.sessions) as session:
            assert auth.revoke(session, token_id)
        revoked_at = time.monotonic()
        first = api.client.get("/v1/datasets").status_code
        if cache_seconds == 0:
            assert first == 401
        else:
            assert first == 200 or time.monotonic() - revoked_at >= cache_seconds  # still cached
            while time.monotonic() - revoked_at < cache_seconds:
                time.sleep(0.05)
        assert api.client.get("/v1/datasets").status_code == 401
        assert api.client.get("/v1/jobs").status_code == 401
