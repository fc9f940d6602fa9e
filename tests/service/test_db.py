"""service.db's session kinds on SQLite: readers never wait for the writer, writes need a transaction."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from service.db import ReadOnlySession, make_engine, reading, session_factory, transaction, upgrade
from service.models import Dataset


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def test_reads_do_not_wait_for_an_open_write_transaction(sessions):
    with transaction(sessions) as session:
        session.add(Dataset(name="before", kind="labeled"))
    writing, release = threading.Event(), threading.Event()

    def writer() -> None:
        with transaction(sessions) as session:
            session.add(Dataset(name="during", kind="labeled"))
            session.flush()
            writing.set()
            release.wait(60)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(30)
        start = time.monotonic()
        with reading(sessions) as session:  # the writer holds the lock: a reader sees the last commit
            names = set(session.scalars(select(Dataset.name)))
        waited = time.monotonic() - start
        assert names == {"before"}
        assert waited < 5, f"the read waited {waited:.1f} s for the writer"  # busy timeout is 30 s
    finally:
        release.set()
        thread.join(60)
    with reading(sessions) as session:
        assert session.scalar(select(func.count(Dataset.id))) == 2


def test_writers_queue_instead_of_failing(sessions):
    """Two transactions that read and then write: the second waits for the first, neither fails."""

    def bump(name: str) -> None:
        with transaction(sessions) as session:
            count = session.scalar(select(func.count(Dataset.id)))
            time.sleep(0.2)
            session.add(Dataset(name=f"{name}-{count}", kind="labeled"))

    threads = [threading.Thread(target=bump, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with reading(sessions) as session:
        counts = sorted(int(n.rsplit("-", 1)[1]) for n in session.scalars(select(Dataset.name)))
    assert counts == [0, 1, 2, 3]  # serialised: each saw the ones before it


def test_a_change_outside_a_transaction_is_refused(sessions):
    with reading(sessions) as session:
        session.add(Dataset(name="nope", kind="labeled"))
        with pytest.raises(ReadOnlySession, match="transaction"):
            session.flush()
    with sessions() as session:
        session.add(Dataset(name="nope", kind="labeled"))
        with pytest.raises(ReadOnlySession):
            session.commit()
    with reading(sessions) as session:
        assert session.scalar(select(func.count(Dataset.id))) == 0


def test_a_write_is_committed_before_the_api_answers(tmp_path):
    """A slow commit (0.5 s, injected) delays the answer: a client told 201 finds the row."""
    from sqlalchemy import Engine, event

    from tests.service.conftest import served_api

    def slow_commit(connection) -> None:
        time.sleep(0.5)

    with served_api(tmp_path, scope="write") as api:
        event.listen(Engine, "commit", slow_commit)
        try:
            for name in ("a", "b", "c"):
                created = api.client.post("/v1/datasets", json={"name": name, "kind": "unlabeled"})
                assert created.status_code == 201, created.text
                with reading(api.sessions) as session:
                    assert (
                        session.scalar(select(Dataset.name).where(Dataset.id == created.json()["id"])) == name
                    )
        finally:
            event.remove(Engine, "commit", slow_commit)
