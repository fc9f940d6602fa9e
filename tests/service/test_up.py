"""``distill up`` run as a user runs it — a real supervisor starting a real redis-server (the embedded one),
uvicorn and Celery workers on free loopback ports — and ``distill token``. Every process a test starts is
stopped by the test, by its id; the checks that nothing is left read ``/proc``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from distill.errors import InputError
from service import auth
from service.db import make_engine, session_factory, transaction, upgrade
from service.models import aware, utcnow
from service.up import ensure_admin_token, gpu_devices
from tests.service.conftest import free_port


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    found = _stat(pid)
    return found is not None and found[0] not in ("Z", "X")  # a zombie has stopped already


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            parents[int(entry)] = found[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    return {**env, "OMP_NUM_THREADS": "1"}  # no DISTILL_REDIS_URL: the embedded Redis


class Up:
    """One ``distill up`` on ``data_dir`` and a free port, writing its ready file."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.ready_file = data_dir.parent / f"ready-{self.port}.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "up", "--data-dir", str(data_dir), "--port", str(self.port),
             "--ready-file", str(self.ready_file), "--worker-stop-timeout", "20", "--start-timeout", "90",
             *extra],
            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.seen: set[int] = set()
        self.output = ""

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            assert self.proc.poll() is None, self.finish()
            time.sleep(0.2)
        raise AssertionError(f"distill up was not ready in {timeout} s")

    def wait_workers(self, names: tuple[str, ...] = ("gpu0", "cpu"), timeout: float = 90) -> None:
        deadline = time.time() + timeout
        logs = [self.data_dir / "logs" / f"{name}.log" for name in names]
        while time.time() < deadline:
            if all(" ready." in log.read_text(errors="replace") for log in logs):
                return
            time.sleep(0.2)
        raise AssertionError("the workers did not say ready: " + logs[0].read_text()[-2000:])

    def processes(self) -> set[int]:
        self.seen |= descendants(self.proc.pid)
        return self.seen

    def finish(self, timeout: float = 90) -> str:
        self.output += self.proc.communicate(timeout=timeout)[0]
        return self.output

    def kill(self) -> None:
        """The test's own cleanup: SIGKILL whatever of this run is still there, by id."""
        for pid in self.processes() | {self.proc.pid}:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            self.finish(timeout=10)


@pytest.mark.slow
def test_distill_up_serves_stops_everything_and_keeps_its_admin_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    first = Up(data_dir)
    runs = [first]
    try:
        ready = first.wait_ready()
        admin = ready["admin_token"]
        assert (
            admin
            and admin.startswith("dst_")
            and set(ready["children"]) == {"api", "gpu0", "cpu", "beat", "redis"}
        )
        assert httpx.get(f"{ready['url']}/healthz").status_code == 200
        readyz = httpx.get(f"{ready['url']}/readyz", headers={"Authorization": f"Bearer {admin}"})
        assert readyz.status_code == 200 and readyz.json() == {
            "database": "ok",
            "storage": "ok",
            "broker": "ok",
        }
        assert httpx.get(f"{ready['url']}/readyz").status_code == 401
        first.wait_workers()
        pids = first.processes()
        commands = [cmdline(pid) for pid in pids]
        assert sum("redis-server" in c for c in commands) == 1 and sum("uvicorn" in c for c in commands) == 1
        assert sum("workers.app beat" in c for c in commands) == 1
        assert (
            sum("-Q gpu" in c for c in commands) == 2 and sum("-Q cpu" in c for c in commands) == 2
        )  # + pools
        assert (data_dir / "redis" / "redis.conf").stat().st_mode & 0o077 == 0  # it holds Redis's password

        runs.append(second := Up(data_dir))  # the same data directory is refused while one supervisor owns it
        assert second.proc.wait(timeout=60) == 2 and "another distill up" in second.finish()

        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=90) == 0, first.finish()
        assert not [(pid, cmdline(pid)) for pid in pids if alive(pid)]
        out = first.finish()
        assert admin in out and f"ready at {ready['url']}" in out and "stopped" in out
        assert not first.ready_file.exists()
        assert (data_dir / "distill.db").exists() and (data_dir / "storage").is_dir()
        assert list((data_dir / "redis").glob("appendonly*"))  # Redis kept its append-only file there
    finally:
        for run in runs:
            run.kill()

    again = Up(data_dir, extra=("--api-workers", "2"))  # and this time two API processes
    try:
        ready = again.wait_ready()
        assert ready["admin_token"] is None  # not a new one: the first is still the admin's
        for _ in range(8):  # answered, whichever process takes the connection
            readyz = httpx.get(f"{ready['url']}/readyz", headers={"Authorization": f"Bearer {admin}"})
            assert readyz.status_code == 200
        assert len(descendants(ready["children"]["api"])) >= 2  # uvicorn's two worker processes
        pids = again.processes()
        # a child dying is reported, and everything else stops with it
        os.kill(ready["children"]["api"], signal.SIGKILL)
        assert again.proc.wait(timeout=90) == 1
        out = again.finish()
        assert "api" in out and "exited unexpectedly" in out and "dst_" not in out
        assert not [(pid, cmdline(pid)) for pid in pids if alive(pid)]
    finally:
        again.kill()


def _distill(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_token_commands_create_list_and_revoke_through_the_plugin_entry_point(tmp_path: Path) -> None:
    env = {**_env(), "DISTILL_DATA_DIR": str(tmp_path / "var")}
    created = _distill("token", "create", "--scope", "read", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'distill.db'}")
    sessions = session_factory(engine)
    try:
        with transaction(sessions) as session:
            row = auth.authenticate(session, token)
            assert row is not None and row.scope == "read" and row.name == "ci"
            token_id = row.id
        listed = _distill("token", "list", env=env)
        assert listed.returncode == 0 and f"{token_id}  read" in listed.stdout and token not in listed.stdout
        assert _distill("token", "revoke", str(token_id), env=env).returncode == 0
        with transaction(sessions) as session:
            assert auth.authenticate(session, token) is None
        refused = _distill("token", "create", "--scope", "root", env=env)
        assert refused.returncode == 2 and "--scope 'root'" in refused.stderr
        brief = _distill("token", "create", "--scope", "write", "--expires-in", "12h", env=env)
        assert brief.returncode == 0 and "valid until" in brief.stderr, brief.stderr
        with transaction(sessions) as session:
            row = auth.authenticate(session, brief.stdout.strip())
            assert (
                row is not None
                and 11.9 * 3600 < (aware(row.expires_at) - utcnow()).total_seconds() <= 12 * 3600
            )
        listed = _distill("token", "list", env=env).stdout.splitlines()
        assert " revoked " in listed[1] and " never " in listed[1]
        assert " live " in listed[2] and " never " not in listed[2]  # it expires
        bad = _distill("token", "create", "--scope", "read", "--expires-in", "soon", env=env)
        assert bad.returncode == 2 and "--expires-in 'soon'" in bad.stderr
    finally:
        engine.dispose()


def test_the_admin_token_is_made_once_or_taken_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    upgrade(url)
    made = ensure_admin_token(url, None)
    assert made is not None and ensure_admin_token(url, None) is None  # shown once: the first start only
    given = "dst_" + "x" * 40
    assert ensure_admin_token(url, given) is None and ensure_admin_token(url, given) is None
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            assert auth.authenticate(session, given).scope == "admin"
            assert auth.authenticate(session, made).scope == "admin"
            assert len(auth.list_tokens(session)) == 2
            reader = auth.create_token(session, scope="read")
    finally:
        engine.dispose()
    with pytest.raises(InputError, match="DISTILL_ADMIN_TOKEN"):
        ensure_admin_token(url, "short")
    with pytest.raises(InputError, match="scope 'read'"):
        ensure_admin_token(url, reader)


def test_gpus_are_counted_without_touching_cuda() -> None:
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": "GPU-5a1b, 3"}) == ["GPU-5a1b", "3"]
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert gpu_devices({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at the first invalid entry
