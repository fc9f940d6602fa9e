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
