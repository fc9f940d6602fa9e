"""API tokens: only the hash is stored, scopes are ordered, revoked and malformed tokens get nowhere."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service import auth
from service.db import make_engine, session_factory, transaction
from service.models import ApiToken


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
