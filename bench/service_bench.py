"""The service's costs, each measured side by side in one run.

    python bench/service_bench.py --out runs/bench-service [--images 160] [--rounds 2] [--only overhead ...]

* ``overhead``: a ``distill`` job (multi-view inference, fusion, calibration, pseudo-labels) through
  ``distill up`` (REST submission, Celery, the ledger, shards) vs the same steps in a fresh Python process
  (``distill.steps.infer`` + ``pseudo_label``, what ``distill predict`` + ``calibrate`` run). Same teacher,
  images, views and batching; both with torch's default threads. Timed: job submission to the job seen
  finished over its event stream, vs the process's start to its exit. Target <= 1.15x.
* ``scaling``: the same job, sharded in 8, on ``distill up --workers-gpu 1`` vs ``--workers-gpu 2``, each
  worker single-threaded (``OMP_NUM_THREADS=1``). Target >= 1.8x.
* ``upload``: peak RSS of the API process while one archive of unique JPEGs streams into a dataset, for a
  small and a 1 GiB archive (``--archive-mb``). Flat: the peak does not grow with the archive.

Measurements of the same kind run interleaved, ``--rounds`` times, each one's fastest round counting
(``timing.interleaved``'s rule). The teacher is trained once (``synth`` recipe, ``--teacher-iterations``) on
the ``medium`` benchmark (the demo's until 2026-12-04) and reused. Prints one line per measurement and a
final JSON line; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from distill.demo import ensure_benchmark
from distill.io import write_json_atomic
from service.demo import Service, demo_token
from service.remote import Client

VIEWS = "0.75x,1x,1.25x:flip"  # the demo's
INFERENCE = {"views": VIEWS, "fusion": "nms", "batch_size": 4, "max_detections": 20}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-service"))
    parser.add_argument("--only", nargs="+", choices=["overhead", "scaling", "upload"],
                        default=["overhead", "scaling", "upload"])  # fmt: skip
    parser.add_argument("--images", type=int, default=160, help="unlabeled images per job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--teacher-iterations", type=int, default=150)
    parser.add_argument("--archive-mb", type=int, nargs=2, default=[128, 1024], metavar=("SMALL", "LARGE"))
    return parser


# ---- shared setup ----


def _subset(data: Path, split: str, count: int, dest: Path) -> Path:
    coco = json.loads((data / f"{split}.json").read_text())
    images = coco["images"][:count]
    keep = {i["id"] for i in images}
    annotations = [a for a in coco.get("annotations", []) if a["image_id"] in keep]
    coco |= {"images": images, "annotations": annotations}
    dest.write_text(json.dumps(coco))
    return dest


def _teacher(out: Path, data: Path, iterations: int) -> Path:
    from distill import steps
    from distill.specs import TrainSpec

    model = out / "teacher"
    steps.train(
        TrainSpec(out=str(model), labeled=str(data / "labeled.json"), labeled_images=str(data / "images"),
                  config="synth", iterations=iterations, seed=0)
    )  # fmt: skip
    return model


def inputs(out: Path, images: int, teacher_iterations: int) -> tuple[Path, Path, Path, Path, Path]:
    """The demo benchmark under ``out``, its labeled split and ``images`` unlabeled ones as COCO files, and
    a teacher trained once (reused) with its upload archive: ``(data, labeled, unlabeled, teacher,
    archive)``."""
    data = ensure_benchmark(out / "data", preset="medium", seed=0)
    labeled = _subset(data, "labeled", 10**9, out / "labeled.json")
    unlabeled = _subset(data, "unlabeled", images, out / "unlabeled.json")
    teacher = out / "teacher"
    if not (teacher / "weights.pt").exists():
        _teacher(out, data, teacher_iterations)
    return data, labeled, unlabeled, teacher, _archive(teacher, out / "teacher.tar.gz")


def _archive(model: Path, dest: Path) -> Path:
    if not dest.exists():
        with tarfile.open(dest, "w:gz") as tar:
            for name in ("config.yaml", "weights.pt", "meta.json"):
                tar.add(model / name, arcname=name)
    return dest


class Stack:
    """``distill up`` with its own data dir, a client on it, the bench's datasets and teacher registered."""

    def __init__(
        self, var: Path, env: dict[str, str] | None = None, workers: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:  # fmt: skip
        token = demo_token(var)
        self.env = {**os.environ, **(env or {}), "DISTILL_ADMIN_TOKEN": token}
        self.env.pop("DISTILL_REDIS_URL", None)
        args = [] if workers is None else ["--workers-gpu", str(workers)]
        self.service = Service(var, self.env, extra_args=[*args, *(extra_args or [])])
        self.client = Client(self.service.start(), token, timeout=600)

    def dataset(self, name: str, kind: str, images: Path, coco: Path, annotations: bool) -> int:
        found = self.client.find_dataset(name) or self.client.create_dataset(name, kind)
        names = [i["file_name"] for i in json.loads(coco.read_text())["images"]]
        for start in range(0, len(names), 64):
            batch = names[start : start + 64]
            self.client.upload_images(found["id"], [(n, images / n) for n in batch])
        if annotations:
            self.client.put_annotations(found["id"], coco)
        return found["id"]

    def close(self) -> None:
        self.client.close()
        self.service.stop()


def _distill_job(stack: Stack, labeled: int, unlabeled: int, teacher: int, shard_size: int | None) -> float:
    """Seconds from submitting a distill job to seeing it succeeded."""
    body = {"type": "distill", "labeled": labeled, "unlabeled": unlabeled, "teacher": teacher,
            "inference": INFERENCE, "shard_size": shard_size}  # fmt: skip
    start = time.perf_counter()
    job = stack.client.create_job(body)
    *_, final = stack.client.follow(job["id"])
    took = time.perf_counter() - start
    if final["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {final['state']}: {final.get('error')}")
    return took


def _prepared(stack: Stack, data: Path, labeled: Path, unlabeled: Path, teacher_archive: Path) -> tuple:
    images = data / "images"
    lab = stack.dataset("bench-labeled", "labeled", images, labeled, annotations=True)
    unl = stack.dataset("bench-unlabeled", "unlabeled", images, unlabeled, annotations=False)
    models = stack.client.models(name="bench-teacher")
    model = models[0] if models else stack.client.upload_model("bench-teacher", teacher_archive)
    return lab, unl, model["id"]


IN_PROCESS = """
import sys
from distill import steps
from distill.specs import InferenceSpec, InferSpec, PseudoLabelSpec
model, unlabeled, labeled, images, out, inference = sys.argv[1:7]
result = steps.infer(InferSpec(model=model, images=unlabeled, images_dir=images, out=out + "/all.jsonl",
                               inference=InferenceSpec.model_validate_json(inference)))
steps.pseudo_label(PseudoLabelSpec(predictions=[result.artifacts["predictions"]], unlabeled=unlabeled,
                                   labeled=labeled, out=out + "/pseudo.json"))
"""


def _in_process(teacher: Path, unlabeled: Path, labeled: Path, images: Path, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):  # the steps reuse finished outputs: start clean each time
        stale.unlink()
    paths = [str(p) for p in (teacher, unlabeled, labeled, images, out)]
    argv = [sys.executable, "-c", IN_PROCESS, *paths, json.dumps(INFERENCE)]
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def _interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], run())
            print(f"  {name}: {best[name]:.1f} s (best so far)", flush=True)
    return best


# ---- the three measurements ----


def overhead(
    args, data: Path, labeled: Path, unlabeled: Path, teacher: Path, archive: Path
) -> dict[str, Any]:
    stack = Stack(args.out / "var-overhead")
    try:
        lab, unl, model = _prepared(stack, data, labeled, unlabeled, archive)
        scratch = args.out / "in-process"
        runs = {
            "service": lambda: _distill_job(stack, lab, unl, model, None),
            "in_process": lambda: _in_process(teacher, unlabeled, labeled, data / "images", scratch),
        }
        best = _interleave(runs, args.rounds)
    finally:
        stack.close()
    return {**best, "ratio": best["service"] / best["in_process"], "target": "<= 1.15"}


def scaling(args, data: Path, labeled: Path, unlabeled: Path, archive: Path) -> dict[str, Any]:
    shard = max(1, -(-args.images // 8))

    def job(workers: int) -> float:
        stack = Stack(args.out / f"var-workers{workers}", env={"OMP_NUM_THREADS": "1"}, workers=workers)
        try:
            lab, unl, model = _prepared(stack, data, labeled, unlabeled, archive)
            return _distill_job(stack, lab, unl, model, shard)
        finally:
            stack.close()

    best = _interleave({"one_worker": lambda: job(1), "two_workers": lambda: job(2)}, args.rounds)
    return {**best, "speedup": best["one_worker"] / best["two_workers"], "target": ">= 1.8"}


def _write_archive(path: Path, megabytes: int) -> Path:
    """A .tar of unique noise JPEGs (~330 KB each) of about ``megabytes``."""
    if path.exists():
        return path
    rng = np.random.default_rng(megabytes)
    part = path.with_suffix(".part")
    with tarfile.open(part, "w") as tar:
        size, i = 0, 0
        while size < megabytes * 2**20:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(
                buffer, "JPEG", quality=90
            )
            info = tarfile.TarInfo(f"noise/{i:06d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
            size, i = size + info.size, i + 1
    part.rename(path)
    return path


def _peak_rss(pid: int, work: Callable[[], Any]) -> tuple[float, float, Any]:
    """(RSS before, peak RSS during ``work()``) in MiB of process ``pid``, sampled every 20 ms."""
    process = psutil.Process(pid)
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return before / 2**20, peak[0] / 2**20, result


def upload(args) -> dict[str, Any]:
    small, large = (_write_archive(args.out / f"noise-{mb}mb.tar", mb) for mb in args.archive_mb)
    stack = Stack(args.out / "var-upload")
    results: dict[str, Any] = {}
    try:
        api = stack.service.ready["children"]["api"]
        for label, archive in (("small", small), ("large", large)):
            dataset = stack.client.create_dataset(f"noise-{label}-{time.time_ns()}", "unlabeled")
            before, peak, report = _peak_rss(
                api,
                lambda a=archive, d=dataset: stack.client.upload_images(d["id"], [(a.name, a)], timeout=None),
            )
            results[label] = {
                "archive_mb": round(archive.stat().st_size / 2**20),
                "rss_before_mb": round(before),
                "rss_peak_mb": round(peak),
                "accepted": len(report["accepted"]),
                "rejected": len(report["rejected"]),
            }
            print(f"  {label}: {results[label]}", flush=True)
    finally:
        stack.close()
    growth = {k: results[k]["rss_peak_mb"] - results[k]["rss_before_mb"] for k in ("small", "large")}
    return {
        **results,
        "growth_mb": growth,
        "peak_ratio": results["large"]["rss_peak_mb"] / results["small"]["rss_peak_mb"],
    }


def main() -> None:
    args = get_args_parser().parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "images": args.images,
        "rounds": args.rounds,
        "views": VIEWS,
        "cpus": os.cpu_count(),
    }
    if {"overhead", "scaling"} & set(args.only):
        data, labeled, unlabeled, teacher, archive = inputs(args.out, args.images, args.teacher_iterations)
        if "overhead" in args.only:
            print("overhead: distill job through the service vs in-process", flush=True)
            out["overhead"] = overhead(args, data, labeled, unlabeled, teacher, archive)
            print(f"overhead: {json.dumps(out['overhead'])}", flush=True)
        if "scaling" in args.only:
            print("scaling: 2 single-threaded workers vs 1", flush=True)
            out["scaling"] = scaling(args, data, labeled, unlabeled, archive)
            print(f"scaling: {json.dumps(out['scaling'])}", flush=True)
    if "upload" in args.only:
        print("upload: API peak RSS while an archive streams in", flush=True)
        out["upload"] = upload(args)
        print(f"upload: {json.dumps(out['upload'])}", flush=True)
    write_json_atomic(args.out / "results.json", out, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
