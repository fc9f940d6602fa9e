"""Reads under load while a job runs: ``distill up`` on this machine (loopback only), a distill job with
and without ``--clients`` concurrent readers polling the job and listing datasets, while two uploads stream
archives of fresh images into new datasets. Bounded: the load stops when the job ends (or after
``--max-seconds``), each client waits ``--think`` seconds between requests.

    python bench/load_bench.py --out runs/bench-load [--clients 200] [--images 48]

Prints requests, 5xx and transport errors, read latency p50 / p99, uploads finished, and the job's seconds
without and with the load side by side (the same job, the inference cache off so both do the work), then a
final JSON line (also ``OUT/results.json``). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import aiohttp
except ImportError:  # pragma: no cover - a bench dependency
    sys.exit("bench/load_bench.py needs aiohttp: pip install -e '.[bench]'")
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_bench import Stack, _distill_job, _prepared, inputs

from distill.io import write_json_atomic
from service.remote import RemoteError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-load"))
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--images", type=int, default=48, help="unlabeled images of the job")
    parser.add_argument("--think", type=float, default=0.5, help="seconds each client waits between requests")
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--uploads", type=int, default=2, help="upload streams beside the readers")
    parser.add_argument("--api-workers", type=int, default=1, help="distill up --api-workers")
    parser.add_argument("--upload-images", type=int, default=200, help="images per streamed archive")
    parser.add_argument("--teacher-iterations", type=int, default=30)
    return parser


async def _reader(session, paths: list[str], think: float, stop: asyncio.Event, out: dict[str, Any],
                  offset: int) -> None:  # fmt: skip
    i = offset
    while not stop.is_set():
        path = paths[i % len(paths)]
        i += 1
        start = time.perf_counter()
        try:
            async with session.get(path) as answer:
                await answer.read()
            out["latencies"].append(time.perf_counter() - start)
            out["status"][answer.status] = out["status"].get(answer.status, 0) + 1
        except (aiohttp.ClientError, TimeoutError) as error:
            out["errors"].append(type(error).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), think)


async def _load(
    base: str, token: str, paths: list[str], clients: int, think: float, stop_flag: threading.Event,
    out: dict[str, Any],
) -> None:  # fmt: skip
    """``clients`` keep-alive connections, each a reader. aiohttp, not httpx: with 200 connections httpx's
    client took a whole core here and measured itself (the API sat at ~6 % CPU)."""
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=clients)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(_reader(session, paths, think, stop, out, k)) for k in range(clients)]
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)


def _upload_archive(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            info = tarfile.TarInfo(f"noise/{seed}-{i:05d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path


def _uploads(stack: Stack, archives: list[Path], stop_flag: threading.Event, out: dict[str, Any]) -> None:
    """Stream the archives into fresh datasets, over and over, until the flag: one thread per archive."""

    def loop(archive: Path) -> None:
        while not stop_flag.is_set():
            try:
                dataset = stack.client.create_dataset(f"load-{time.time_ns()}", "unlabeled")
                report = stack.client.upload_images(dataset["id"], [(archive.name, archive)], timeout=None)
                out["uploads"].append(len(report["accepted"]))
            except RemoteError as error:  # counted, and the upload tried again: the load goes on
                out["upload_errors"].append(f"HTTP {error.status}")

    threads = [threading.Thread(target=loop, args=(a,), daemon=True) for a in archives]
    for thread in threads:
        thread.start()
    out["threads"] = threads


def main() -> None:
    args = get_args_parser().parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data, labeled, unlabeled, _, archive = inputs(args.out, args.images, args.teacher_iterations)
    uploads = [
        _upload_archive(args.out / f"upload-{k}.tar", args.upload_images, k) for k in range(args.uploads)
    ]
    shutil.rmtree(args.out / "var", ignore_errors=True)  # a fresh service: no earlier run's rows or logs
    api = ["--api-workers", str(args.api_workers)]
    stack = Stack(args.out / "var", env={"DISTILL_INFERENCE_CACHE": "false"}, extra_args=api)
    try:
        lab, unl, model = _prepared(stack, data, labeled, unlabeled, archive)
        quiet = _distill_job(stack, lab, unl, model, None)
        print(f"job without load: {quiet:.1f} s", flush=True)

        stop = threading.Event()
        out: dict[str, Any] = {
            "latencies": [],
            "status": {},
            "errors": [],
            "uploads": [],
            "upload_errors": [],
        }
        last = max(job["id"] for job in stack.client.list_jobs()["data"])
        paths = [f"/v1/jobs/{last}", "/v1/datasets", "/v1/jobs?state=running", f"/v1/datasets/{lab}"]
        base, token = stack.client.url, stack.env["DISTILL_ADMIN_TOKEN"]
        loader = threading.Thread(
            target=lambda: asyncio.run(_load(base, token, paths, args.clients, args.think, stop, out)),
            daemon=True,
        )
        loader.start()
        _uploads(stack, uploads, stop, out)
        time.sleep(2)  # the readers are polling before the job starts
        timer = threading.Timer(args.max_seconds, stop.set)
        timer.start()
        try:
            loaded, job_error = _distill_job(stack, lab, unl, model, None), None
        except (RemoteError, RuntimeError) as error:
            loaded, job_error = None, str(error)
        stop.set()
        timer.cancel()
        loader.join(timeout=120)
        for thread in out.pop("threads"):
            thread.join(timeout=600)
    finally:
        stack.close()
    latencies = np.array(out["latencies"]) * 1000
    results = {
        "clients": args.clients, "think_s": args.think, "api_workers": args.api_workers,
        "requests": int(latencies.size),
        "status": {str(k): v for k, v in sorted(out["status"].items())},
        "5xx": sum(v for k, v in out["status"].items() if k >= 500), "transport_errors": len(out["errors"]),
        "transport_error_kinds": sorted(set(out["errors"])),
        "read_p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
        "read_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies.size else None,
        "uploads_finished": len(out["uploads"]), "images_uploaded": int(sum(out["uploads"])),
        "upload_errors": len(out["upload_errors"]),
        "upload_error_kinds": sorted(set(out["upload_errors"])), "job_error": job_error,
        "job_s_without_load": round(quiet, 1),
        "job_s_with_load": None if loaded is None else round(loaded, 1),
        "job_slowdown": None if loaded is None else round(loaded / quiet, 2), "cpus": os.cpu_count(),
    }  # fmt: skip
    for key, value in results.items():
        print(f"  {key}: {value}")
    write_json_atomic(args.out / "results.json", results, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
