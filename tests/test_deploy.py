"""The deployment files, without Docker: ``docker-compose.yml`` read with PyYAML and its variables substituted
as Compose substitutes them, then checked against what the code expects (the API's app object, the Celery
app and its queues, ``service.config.Settings``), and the ``Dockerfile``'s runtime stage. The GPU worker's
claim script and the healthcheck probes run here for real, against stand-ins for nvidia-smi, celery and the
API."""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

DISTILL_SERVICES = ("api", "worker-gpu", "worker-cpu", "beat")  # the services that run the project's image
WORKERS = ("worker-gpu", "worker-cpu")
# the variables Compose substitutes from the host (its shell or .env): every other `$` is the container's
HOST_VARIABLES = {"POSTGRES_PASSWORD", "DISTILL_IMAGE", "DISTILL_API_PORT", "DISTILL_STORAGE_URL"}
HOST_ENV = {"POSTGRES_PASSWORD": "pw-from-the-environment"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY|AUTH", re.IGNORECASE)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset: Compose refuses the file."""


# Compose's interpolation (compose-spec 12-interpolation.md): `$$` is a literal `$`; `$NAME`, `${NAME}`,
# `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`. Anything else after a `$` is
# refused here, although Compose would leave it alone: container-side `$` are written `$$` in this file.
_DOLLAR = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\$")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.DOTALL)


def _variable(match: re.Match, value: str) -> tuple[str, str | None, str | None] | None:
    """``(name, operator, argument)`` of one `$` occurrence, ``None`` for `$$`."""
    if match.group(0) == "$$":
        return None
    if match.group("name"):
        return match.group("name"), None, None
    braced = match.group("braced")
    parsed = _BRACED.fullmatch(braced) if braced is not None else None
    if parsed is None:
        raise AssertionError(
            f"{value!r}: a `$` that is not a Compose variable; write `$$` for the container's shell"
        )
    return parsed["name"], parsed["op"], parsed["arg"]


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        variable = _variable(match, value)
        if variable is None:
            return "$"
        name, op, arg = variable
        current = env.get(name)
        if op is None:
            return current or ""
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if current if op == ":?" else current is not None:  # `:?` refuses an empty value too, `?` only unset
            return current
        raise MissingVariable(f"{name}: {arg}")

    return _DOLLAR.sub(substitute, value)


def host_variables(value: str) -> list[tuple[str, str | None, str | None]]:
    return [v for m in _DOLLAR.finditer(value) if (v := _variable(m, value)) is not None]


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _resolve(node, env: Mapping[str, str]):
    if isinstance(node, dict):
        return {k: _resolve(v, env) for k, v in node.items()}  # keys are not interpolated
    if isinstance(node, list):
        return [_resolve(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


@functools.cache
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def compose() -> dict:
    return _resolve(raw(), HOST_ENV)


def service(name: str) -> dict:
    return compose()["services"][name]


def environment(name: str, doc: dict | None = None) -> dict[str, str | None]:
    env = (doc or compose())["services"][name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _words(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def argv(name: str) -> list[str]:
    """What the container runs: its entrypoint (each service sets one) followed by its command."""
    svc = service(name)
    assert svc.get("entrypoint"), f"{name}: no entrypoint, so the image's `distill` would run the command"
    return _words(svc["entrypoint"]) + _words(svc.get("command"))


def celery_argv(name: str) -> list[str]:
    """The celery command line of a service, also when a shell script execs it."""
    words = argv(name)
    if words[:2] == ["/bin/sh", "-c"]:
        lines = [line.strip() for line in words[2].splitlines() if line.strip().startswith("exec celery")]
        assert len(lines) == 1, f"{name}: expected one `exec celery ...` line in its script"
        words = shlex.split(lines[0])[1:]
    assert words[:3] == ["celery", "-A", "workers.app"], f"{name}: {words}"
    return words


def option(words: list[str], *names: str) -> str | None:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if name.startswith("--") and word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def mounts(name: str) -> dict[str, str]:
    """target -> named volume (or host path) of a service's volumes (short syntax)."""
    found = {}
    for entry in service(name).get("volumes") or []:
        if isinstance(entry, dict):
            found[entry["target"]] = entry["source"]
        else:
            source, target = entry.split(":")[:2]
            found[target] = source
    return found


def healthcheck_argv(name: str) -> list[str]:
    test = service(name)["healthcheck"]["test"]
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", f"{name}: healthcheck test starts with {test[0]!r}"
    return list(test[1:])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DISTILL_"):
            monkeypatch.delenv(key)


# -- the services ------------------------------------------------------------------------------------------
def test_the_services_and_their_images() -> None:
    services = compose()["services"]
    assert set(services) == {"api", "worker-gpu", "worker-cpu", "beat", "redis", "postgres", "flower"}
    images = {services[name]["image"] for name in DISTILL_SERVICES}
    assert images == {"distill:latest"}, "one image for the API, the workers and beat"
    for name in DISTILL_SERVICES:
        build = services[name]["build"]
        assert (build if isinstance(build, str) else build.get("context", ".")) == "."
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["flower"]["image"].startswith("mher/flower")
    for name in ("redis", "postgres", "flower"):
        assert "build" not in services[name]


def test_the_api_serves_the_real_app_in_one_process(clean_env) -> None:
    from fastapi import FastAPI

    words = argv("api")
    assert words[0] == "uvicorn"
    target = words[1]
    module_name, attribute = target.split(":")
    assert (module_name, attribute) == ("service.api.main", "app")
    app = getattr(importlib.import_module(module_name), attribute)  # built from the (empty) environment
    assert isinstance(app, FastAPI)
    assert option(words, "--host") == "0.0.0.0"
    assert option(words, "--port") == "8000"
    # one API process: it migrates on start and sweeps the ledger (service/api/main.py)
    assert option(words, "--workers") is None and "--reload" not in words
    assert service("api").get("deploy", {}).get("replicas", 1) == 1


def test_the_workers_consume_their_queues() -> None:
    from workers.app import app

    queues = {q.name for q in app.conf.task_queues}
    gpu, cpu = celery_argv("worker-gpu"), celery_argv("worker-cpu")
    for words, queue in ((gpu, "gpu"), (cpu, "cpu")):
        assert words[3] == "worker"
        assert option(words, "-Q", "--queues") == queue
        assert queue in queues
        assert "-B" not in words and "--beat" not in words, "beat runs in its own service, once"
    assert option(gpu, "-c", "--concurrency") == "1", "one process per GPU"
    assert option(cpu, "-c", "--concurrency") is not None


def test_the_workers_healthchecks_ping_their_own_node() -> None:
    for name in WORKERS:
        node = option(celery_argv(name), "-n", "--hostname")
        assert node is not None and node.endswith("@%h"), f"{name}: -n NAME@%h, unique per container"
        check = healthcheck_argv(name)
        assert check[:2] == ["/bin/sh", "-c"], "the node name needs the container's $HOSTNAME"
        words = shlex.split(check[2])
        assert words[:5] == ["celery", "-A", "workers.app", "inspect", "ping"]
        # celery's %h is the host name, which is $HOSTNAME in a container
        assert option(words, "-d", "--destination") == node.replace("%h", "$HOSTNAME")


def test_exactly_one_beat() -> None:
    beats = [n for n in DISTILL_SERVICES if argv(n)[0] != "uvicorn" and celery_argv(n)[3] == "beat"]
    assert beats == ["beat"]
    words = celery_argv("beat")
    assert words[3] == "beat"
    assert service("beat").get("deploy", {}).get("replicas", 1) == 1
    schedule = option(words, "-s", "--schedule")
    assert schedule is not None, "the schedule file must be in a writable place, not the image's /app"
    folder = str(Path(schedule).parent)
    assert mounts("beat").get(folder) in compose()["volumes"], "beat's schedule file is on a named volume"


def test_every_service_has_a_real_healthcheck() -> None:
    for name, svc in compose()["services"].items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check["test"]
        assert isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"
        words = healthcheck_argv(name)
        if name in DISTILL_SERVICES:
            assert words[0] in ("python", "/bin/sh"), f"{name}: the image has python and celery, no curl"
        for duration in ("interval", "timeout", "start_period"):
            assert re.fullmatch(r"(\d+(ms|s|m|h))+", check[duration]), f"{name}.{duration}"
    assert "/healthz" in " ".join(healthcheck_argv("api"))
    assert shlex.split(healthcheck_argv("redis")[2])[:2] == ["redis-cli", "ping"]
    assert healthcheck_argv("postgres")[0] == "pg_isready"


def test_startup_order() -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    services = compose()["services"]
    for name, svc in services.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in services and spec["condition"] in conditions, f"{name} -> {target}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target]
    depends = {name: svc.get("depends_on") or {} for name, svc in services.items()}
    for target in ("postgres", "redis"):
        assert depends["api"][target]["condition"] == "service_healthy"
    for name in (*WORKERS, "beat"):
        # the API applies the migrations; the others start when it answers /healthz
        assert depends[name]["api"]["condition"] == "service_healthy", name


def test_redis_keeps_the_queue() -> None:
    words = argv("redis") if service("redis").get("entrypoint") else _words(service("redis")["command"])
    assert words[0] == "redis-server"
    assert option(words, "--appendonly") == "yes"
    assert option(words, "--maxmemory-policy") == "noeviction"
    assert mounts("redis").get("/data") in compose()["volumes"]


def test_postgres_keeps_its_data() -> None:
    assert mounts("postgres").get("/var/lib/postgresql/data") in compose()["volumes"]
    env = environment("postgres")
    url = _database_url()
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == (url.username, url.database)
    assert env["POSTGRES_PASSWORD"] == url.password == HOST_ENV["POSTGRES_PASSWORD"]


def test_one_storage_shared_at_one_path() -> None:
    sources = set()
    for name in ("api", *WORKERS):
        path = environment(name)["DISTILL_STORAGE_URL"]
        assert path == "/var/lib/distill/storage"
        source = mounts(name).get(path)
        assert source is not None, f"{name} does not mount its storage at {path}"
        sources.add(source)
    assert len(sources) == 1 and sources <= set(compose()["volumes"]), sources
    # or an S3-compatible URL from the host's environment, the same for every service
    storage = {environment(n, _resolve(raw(), {**HOST_ENV, "DISTILL_STORAGE_URL": "s3://b/d"}))["DISTILL_STORAGE_URL"]
               for n in DISTILL_SERVICES}  # fmt: skip
    assert storage == {"s3://b/d"}


def _database_url():
    from sqlalchemy.engine import make_url

    urls = {environment(name)["DISTILL_DATABASE_URL"] for name in DISTILL_SERVICES}
    assert len(urls) == 1, "one database for the API, the workers and beat"
    return make_url(urls.pop())


def test_every_distill_variable_is_a_setting(clean_env) -> None:
    from service.config import Settings

    for name in compose()["services"]:
        values = {}
        for key, value in environment(name).items():
            if not key.startswith("DISTILL_"):
                continue
            field = key.removeprefix("DISTILL_").lower()
            assert field in Settings.model_fields, f"{name}: {key} is no field of service.config.Settings"
            if value is not None:  # None: passed through from the host only when set there
                values[field] = value
        if values:
            Settings(**values)  # validated as the service reads them (unknown names are refused too)
    url = _database_url()
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "postgres", 5432)
    assert url.database == "distill"
    redis_urls = {environment(n)["DISTILL_REDIS_URL"] for n in DISTILL_SERVICES}
    assert redis_urls == {"redis://redis:6379/0"}
    assert environment("flower")["CELERY_BROKER_URL"] in redis_urls
    assert Settings(device=environment("worker-gpu")["DISTILL_DEVICE"]).device == "cuda"
    assert Settings(device=environment("worker-cpu")["DISTILL_DEVICE"]).device == "cpu"


def test_no_secret_is_written_in_the_file() -> None:
    passwords = []
    for value in _strings(raw()):
        for name, op, _arg in host_variables(value):
            assert name in HOST_VARIABLES, f"{value!r}: ${name} would be substituted by Compose (write $$)"
            if SECRET_NAME.search(name):
                assert op in (None, ":?", "?"), f"{value!r}: a secret with a default value"
        passwords += re.findall(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@/\s]*)@", value)
    assert passwords, "the database URL carries a password"
    for password in passwords:
        assert re.fullmatch(r"\$\{[A-Za-z_]+:?\?[^}]*\}", password), f"a URL with the password {password!r}"
    for name in raw()["services"]:
        for key, value in environment(name, raw()).items():
            if SECRET_NAME.search(key):
                assert value is None or re.fullmatch(r"\$\{[A-Za-z_]+:?\?[^}]*\}", value), f"{name}: {key}"
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        _resolve(raw(), {})  # Compose refuses to start without it


def test_only_the_api_is_published() -> None:
    for name, svc in compose()["services"].items():
        ports = [str(p) for p in svc.get("ports") or []]
        assert svc.get("network_mode") != "host", name
        if name == "api":
            assert [p.split(":")[-1] for p in ports] == ["8000"]
        elif name == "flower":
            assert ports and all(p.startswith("127.0.0.1:") for p in ports), "Flower: this machine only"
        else:
            assert not ports, f"{name} publishes {ports}"


def test_the_gpu_worker_reserves_the_nvidia_gpus() -> None:
    devices = service("worker-gpu")["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # every replica sees all GPUs and its script claims one (a count of 1 would be GPU 0 for every replica)
    assert device["count"] == "all" and "device_ids" not in device
    for name in compose()["services"]:
        if name != "worker-gpu":
            assert "resources" not in (service(name).get("deploy") or {}), name


def test_flower_is_optional() -> None:
    profiles = {name: svc.get("profiles") for name, svc in compose()["services"].items()}
    assert profiles.pop("flower") == ["monitoring"]
    assert not any(profiles.values()), "`docker compose up` starts everything else"


# -- the scripts, run here ---------------------------------------------------------------------------------
GPUS = ("GPU-0a0a0a0a-0000-0000-0000-000000000000", "GPU-1b1b1b1b-1111-1111-1111-111111111111")


def _wait_for(predicate, what: str, limit: float = 30.0):
    deadline = time.monotonic() + limit  # a bound on waiting, not a timing assertion
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux's flock (the image has it)")
def test_each_gpu_worker_claims_its_own_gpu(tmp_path: Path) -> None:
    """The worker-gpu script with stand-ins: nvidia-smi lists two GPUs, celery records its GPU and sleeps.
    Two replicas take the two GPUs, a third finds none, and a GPU whose worker died is taken again."""
    bin_dir, locks, started = tmp_path / "bin", tmp_path / "locks", tmp_path / "started"
    for folder in (bin_dir, locks, started):
        folder.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo {g}\n" for g in GPUS))
    (bin_dir / "celery").write_text(
        f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" > "{started}/$$"\nexec sleep 300\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = argv("worker-gpu")
    assert script[:2] == ["/bin/sh", "-c"]
    assert "/var/lib/distill/gpu-locks" in mounts("worker-gpu")
    body = script[2].replace("/var/lib/distill/gpu-locks", str(locks))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    running: list[subprocess.Popen] = []

    def replica() -> subprocess.Popen:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", body], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        running.append(proc)
        return proc

    def gpu_of(proc: subprocess.Popen) -> tuple[str, str]:
        record = started / str(proc.pid)
        line = _wait_for(lambda: record.is_file() and record.read_text(), f"replica {proc.pid}'s celery")
        gpu, _, args = line.strip().partition(" ")
        return gpu, args

    try:
        first, second = replica(), None
        gpu_first, args = gpu_of(first)
        second = replica()
        gpu_second, _ = gpu_of(second)
        assert {gpu_first, gpu_second} == set(GPUS)
        assert "-A workers.app worker -Q gpu --concurrency 1" in args
        third = replica()
        _, err = third.communicate(timeout=30)
        assert third.returncode == 1 and "every GPU of this machine has a worker already" in err
        os.killpg(first.pid, 9)  # its lock goes with it
        first.wait(timeout=30)
        fourth = replica()
        assert gpu_of(fourth)[0] == gpu_first
    finally:
        for proc in running:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            proc.communicate(timeout=30)

    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    lone = subprocess.run(["/bin/sh", "-c", body], env=env, capture_output=True, text=True, timeout=30)
    assert lone.returncode == 1 and "nvidia-smi failed" in lone.stderr


def test_the_beat_healthcheck_reads_the_schedule_file(tmp_path: Path) -> None:
    schedule = option(celery_argv("beat"), "-s", "--schedule")
    words = healthcheck_argv("beat")
    assert words[:2] == ["python", "-c"] and schedule in words[2]
    probe = [sys.executable, "-c", words[2].replace(schedule, str(tmp_path / "celerybeat-schedule"))]
    assert subprocess.run(probe).returncode == 1, "no schedule file: beat never started"
    written = tmp_path / "celerybeat-schedule.dat"  # shelve's dbm.dumb files; gdbm writes the name itself
    written.write_bytes(b"x")
    assert subprocess.run(probe).returncode == 0
    stale = os.stat(written).st_mtime - 3600
    os.utime(written, (stale, stale))
    assert subprocess.run(probe).returncode == 1, "a schedule file untouched for an hour: beat is stuck"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_the_api_healthcheck_probe(status: int, healthy: bool) -> None:
    words = healthcheck_argv("api")
    assert words[:2] == ["python", "-c"] and "http://127.0.0.1:8000/healthz" in words[2]
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        probe = [sys.executable, "-c", words[2].replace("127.0.0.1:8000", address)]
        result = subprocess.run(probe, capture_output=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy


# -- the Dockerfile ----------------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_dockerfile_runs_the_service_as_a_user() -> None:
    instructions = _instructions()
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert any(re.search(r"\bAS detectron2\b", instructions[i][1], re.IGNORECASE) for i in starts[:-1])
    runtime = instructions[starts[-1] :]
    ops = [op for op, _ in runtime]
    args = {op: [a for o, a in runtime if o == op] for op in ops}
    assert any(a.startswith("--from=detectron2") for a in args["COPY"]), "the detectron2 wheel stage stays"
    copied = {a.split()[0] for a in args["COPY"] if not a.startswith("--")}
    assert {"distill", "service", "workers", "pyproject.toml"} <= copied
    assert any(re.search(r"pip install .*(\s\.$|\s\.\s)", a) for a in args["RUN"]), "pip install . (all)"
    users = args.get("USER", [])
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the service runs as a user"
    user = users[-1].split(":")[0]
    runs = " ".join(args["RUN"])
    assert re.search(rf"useradd .*--uid 10001 .*\b{user}\b", runs)
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "USER after the installs"
    assert "8000" in args["EXPOSE"][0].split()
    assert args["ENTRYPOINT"][-1] == '["distill"]', "docker run IMAGE demo runs distill demo"
    # every folder the compose file mounts into the project's image exists in it, owned by the user
    targets = {t for name in DISTILL_SERVICES for t in mounts(name)}
    for target in targets:
        assert target in runs and re.search(rf"chown -R {user}:{user} .*/var/lib/distill", runs), target
    from service.config import Settings

    for env in args.get("ENV", []):
        for key in re.findall(r"DISTILL_([A-Z_]+)=", env):
            assert key.lower() in Settings.model_fields


def test_the_readme_links_the_deployment_doc() -> None:
    doc = REPO / "docs" / "several-machines.md"
    assert doc.is_file()
    assert "docs/several-machines.md" in (REPO / "README.md").read_text()
    assert doc.read_text().startswith("# Running on several machines")
