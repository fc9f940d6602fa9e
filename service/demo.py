"""``make demo``: the demo round through the product — ``distill up`` on this machine, the embedded benchmark
uploaded with ``distill remote``, a pipeline job watched to its end, its summary downloaded, the
teacher-vs-student table printed, every process stopped.

Each step is the command a user would type, printed before it runs (``$ distill remote ...``), so the demo
doubles as the quick start. Everything lives under ``--out`` (default ``runs/demo``)::

    data/               the synthesized benchmark (reused when its preset and seed match)
    upload/unlabeled/   hard links to the unlabeled split's images (what ``upload`` sends for it)
    demo.yaml           the job's pipeline sections (``distill.demo.DEMO_SETTINGS``)
    var/                the service's data directory (database, storage, Redis, logs); kept between runs
    artifacts/          what the demo downloaded: summary.json, report.md, the calibration plot
    summary.json        the round's summary plus the demo's minutes per step

Re-running reuses the benchmark and the datasets (uploads are de-duplicated by content) and runs a new job.
``python -m service.demo --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from distill.data.presets import PRESETS
from distill.demo import DEMO_SETTINGS, benchmark_tag, ensure_benchmark
from distill.evaluate import format_table
from distill.io import write_json_atomic
from service.up import free_port

SPLITS = (("labeled", "labeled"), ("unlabeled", "unlabeled"), ("test", "eval"))
"""(benchmark split, dataset kind) in upload order."""
ARTIFACTS = ("summary.json", "report.md", "round_1/pseudo.calibration.png")
START_TIMEOUT = 300.0
STOP_TIMEOUT = 90.0


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


def _distill() -> list[str]:
    """How to run this environment's ``distill`` command."""
    script = Path(sys.executable).with_name("distill")
    return (
        [str(script)] if script.exists() else [sys.executable, "-c", "from distill.cli import main; main()"]
    )


def _run(argv: list[str], env: dict[str, str], *, capture: bool = False) -> str:
    """Run one ``distill`` command as a user would, printing it first; its output goes to the terminal
    (``capture``: stdout is returned instead)."""
    shown = ["distill", *argv]
    print(f"$ {shlex.join(shown)}", flush=True)
    done = subprocess.run(
        [*_distill(), *argv], env=env, check=False, text=True, stdout=subprocess.PIPE if capture else None
    )
    if done.returncode != 0:
        raise DemoError(f"`{shlex.join(shown)}` exited with {done.returncode}")
    return done.stdout or ""


def demo_token(var: Path) -> str:
    """The admin token of the demo's service: made on the first run, kept (0600) under ``var``."""
    path = var / "demo-token"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    var.mkdir(parents=True, exist_ok=True)
    token = "dst_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def _link_images(data_dir: Path, split: str, dest: Path) -> Path:
    """``dest`` holding (hard links to) exactly the images of ``split``, named as its COCO file names."""
    coco = json.loads((data_dir / f"{split}.json").read_text(encoding="utf-8"))
    shutil.rmtree(dest, ignore_errors=True)  # made anew: an earlier preset's or seed's images must not go up
    for image in coco["images"]:
        target = dest / image["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        source = data_dir / "images" / image["file_name"]
        try:
            os.link(source, target)
        except OSError:  # another filesystem: a copy
            shutil.copyfile(source, target)
    return dest


class Service:
    """``distill up`` as a child process, ready once its ready file appears; stopped with SIGTERM."""

    def __init__(self, var: Path, env: dict[str, str], extra_args: list[str] | tuple[str, ...] = ()) -> None:
        self.var, self.env, self.extra_args = var, env, list(extra_args)
        self.ready_file = var / "ready.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    def start(self) -> str:
        self.ready_file.unlink(missing_ok=True)
        port = free_port()
        argv = ["up", "--data-dir", str(self.var), "--port", str(port), "--ready-file", str(self.ready_file),
                *self.extra_args]  # fmt: skip
        print(f"$ {shlex.join(['distill', *argv])} &", flush=True)
        log = (self.var / "up.log").open("ab")
        self.process = subprocess.Popen(
            [*_distill(), *argv], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise DemoError(
                    f"distill up exited with {self.process.returncode}; see {self.var / 'up.log'}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"distill up not ready after {START_TIMEOUT:.0f} s; see {self.var / 'up.log'}"
                )
            time.sleep(0.5)
        ready = json.loads(self.ready_file.read_text(encoding="utf-8"))
        self.ready = {key: ready[key] for key in ("url", "pid", "children", "logs")}  # not the token
        return ready["url"]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the supervisor stops the API, the workers, then Redis
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        print(
            f"stopped distill up (exit {self.process.returncode}); its logs: {self.var / 'logs'}", flush=True
        )


def _job_body(settings: dict[str, Any], seed: int, iterations: int | None) -> dict[str, Any]:
    body = json.loads(json.dumps(settings))
    body["seed"] = seed
    if iterations is not None:
        body.setdefault("teacher", {})["iterations"] = iterations
    return body


def run_service_demo(
    out: str | Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    iterations: int | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo round through the service (see the module docstring); returns the job's summary with the
    demo's ``minutes`` per step."""
    out = Path(out).resolve()
    minutes: dict[str, float] = {}
    started = step = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal step
        now = time.perf_counter()
        minutes[name] = round((now - step) / 60, 2)
        step = now

    data_dir = out / "data"
    ensure_benchmark(data_dir, preset=preset, seed=seed)
    lap("synth")
    var = out / "var"
    token = demo_token(var)
    env = {**os.environ, "DISTILL_ADMIN_TOKEN": token, "DISTILL_REMOTE_TOKEN": token}
    env.pop("DISTILL_REDIS_URL", None)  # the demo's own embedded Redis
    config = out / "demo.yaml"
    config.write_text(yaml.safe_dump(_job_body(settings or DEMO_SETTINGS, seed, iterations), sort_keys=False))
    service = Service(var, env)
    try:
        env["DISTILL_REMOTE_URL"] = service.start()
        lap("start")
        # the tag follows the preset's definition: an upgraded benchmark never joins an older one's datasets
        names = {split: f"{benchmark_tag(preset, seed)}-{split}" for split, _ in SPLITS}
        for split, kind in SPLITS:
            argv = ["remote", "upload"]
            if kind == "unlabeled":  # its images only: the benchmark's labels of it stay unseen
                argv.append(str(_link_images(data_dir, split, out / "upload" / split)))
            else:
                argv += [str(data_dir / "images"), "--annotations", str(data_dir / f"{split}.json")]
            _run([*argv, "--dataset", names[split], "--kind", kind], env)
        lap("upload")
        submitted = _run(
            ["remote", "run", "pipeline", "--labeled", names["labeled"], "--unlabeled", names["unlabeled"],
             "--eval", names["test"], "--config", str(config)],
            env, capture=True,
        )  # fmt: skip
        job = submitted.split()[0]
        print(f"job {job} submitted", flush=True)
        _run(["remote", "watch", job], env)
        lap("job")
        artifacts = out / "artifacts"
        for name in ARTIFACTS:
            _run(["remote", "download", job, name, "--out", str(artifacts)], env, capture=True)
        lap("download")
    finally:
        service.stop()
    lap("stop")
    summary = json.loads((artifacts / "summary.json").read_text(encoding="utf-8"))
    summary |= {"job": int(job), "preset": preset, "artifacts": str(artifacts), "service_data": str(var),
                "service": service.ready}  # fmt: skip
    summary["minutes"] = {**minutes, "total": round((time.perf_counter() - started) / 60, 2)}
    write_json_atomic(out / "summary.json", summary, indent=2)
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The teacher-vs-student table, the decision and where things are."""
    last = summary["rounds"][-1]
    lines = []
    if "metrics" in last:
        primary = last["primary"]
        lines += [
            format_table(last["metrics"]),
            f"{primary['metric']}: teacher {100 * primary['teacher']:.1f}, "
            f"student {100 * primary['student']:.1f} -> {'promoted' if last['promoted'] else 'not promoted'}",
            "the student trains longer than the teacher: the control, a labeled-only model trained as long, "
            "is bench/distill_round.py's baseline (bench/RESULTS.md)",
        ]
    calibration = last["calibration"]
    lines += [
        f"pseudo-labels: threshold {calibration['threshold']}, {calibration['kept_per_image']:.2f} per "
        f"unlabeled image (labeled: {calibration['labeled_per_image']:.2f})",
        f"job {summary['job']}; downloaded: {summary['artifacts']}; everything else: "
        f"{summary['service_data']}/storage/jobs/{summary['job']}",
        "minutes: " + ", ".join(f"{k} {v}" for k, v in summary["minutes"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory")
    parser.add_argument("--preset", default="demo", choices=list(PRESETS), help="benchmark preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None, help="the teacher's training iterations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the benchmark's synthesis says so
    try:
        summary = run_service_demo(args.out, preset=args.preset, seed=args.seed, iterations=args.iterations)
    except DemoError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
