"""Real databases for the service tests: a SQLite file, and a PostgreSQL cluster started from Debian's
``postgresql`` binaries on a free loopback port; and a real non-local storage: Debian's OpenSSH server, which
fsspec reaches over SFTP (each skipped where it is not installed; ``.ci/run`` installs them). Every server is
stopped by the fixture that started it."""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import upgrade


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process on a free loopback port; yields its base URL
    (for tests that change the app's process, e.g. with an event listener); stopped on exit."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class ServedApi:
    client: httpx.Client  # authorized with ``token``
    sessions: Any  # a session factory on the API's database
    token: str


@contextmanager
def served_api(tmp_path: Path, *, scope: str, **settings: Any) -> Iterator[ServedApi]:
    """A migrated SQLite database under ``tmp_path`` holding one token of ``scope``, the API app on it
    (``settings``: more :class:`~service.config.Settings` fields; nothing is enqueued) served by
    :func:`serving`, and a client bearing the token."""
    from service import auth
    from service.api.main import create_app
    from service.config import Settings
    from service.db import make_engine, session_factory, transaction

    database = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(database)
    engine = make_engine(database)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        token = auth.create_token(session, scope=scope)
    config = Settings(
        database_url=database, storage_url=str(tmp_path / "storage"), redis_url="redis://127.0.0.1:9/0",
        **settings,
    )  # fmt: skip
    try:
        with (
            serving(create_app(config, enqueue=lambda *_: None)) as base,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client,
        ):
            yield ServedApi(client, sessions, token)
    finally:
        engine.dispose()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the ``postgres`` system user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """``host:port`` of a fresh PostgreSQL cluster (trust auth on 127.0.0.1 only, user ``distill``)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # not under pytest's tmp folder: that one is private to root, and the server runs as ``postgres``
    root = Path(tempfile.mkdtemp(prefix="distill-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "distill", "-E", "UTF8"]
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = root / "server.log"
    if os.geteuid() == 0:
        log.touch()
        shutil.chown(log, "postgres")
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]
    subprocess.run(_as_postgres(start), check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_postgres(stop), check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_databases = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'distill.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"t{next(_databases)}"
        import psycopg

        with psycopg.connect(f"postgresql://distill@{server}/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        url = f"postgresql+psycopg://distill@{server}/{name}"
    upgrade(url)
    return url


@dataclass(frozen=True)
class SftpServer:
    """An OpenSSH server on a loopback port that lets the current user in with ``key`` (SFTP only used)."""

    user: str
    port: int
    key: Path

    def url(self, path: Path) -> str:
        """The fsspec URL of the local folder ``path`` through this server."""
        return f"sftp://{self.user}@127.0.0.1:{self.port}{path.resolve()}"

    @property
    def options(self) -> dict[str, str]:
        return {"key_filename": str(self.key)}


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    """Debian's ``sshd`` (openssh-server; ``.ci/run`` installs it) with its own host key, config and
    authorized key, bound to 127.0.0.1 on a free port; stopped by its pid at the end of the session. A
    storage through it is a real non-local fsspec filesystem shared by every process of a test."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH's sshd is not installed (apt-get install openssh-server)")
    pytest.importorskip("paramiko")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "client.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    with (root / "sshd.log").open("w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(root / "sshd_config")],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (root / "sshd.log").read_text()
            time.sleep(0.1)
        yield SftpServer(getpass.getuser(), port, root / "client")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
