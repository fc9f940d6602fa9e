"""Whole jobs composed from the library: train a model from a COCO file, and the demo run.

The CLI and (later) the Celery workers call these; they read inputs, call the library and write artifacts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.data.coco import load_coco
from distill.data.images import iter_image_refs
from distill.evaluate import evaluate, format_table
from distill.io import write_json_atomic
from distill.models.config import config_from_coco_categories
from distill.models.store import build_detector, load_model, read_meta
from distill.predict import predict_coco
from distill.recipes import load_recipe
from distill.train.data import CocoDetectionDataset
from distill.train.loop import TrainConfig, TrainProgress, TrainResult, train_detector


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_model(
    train_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    recipe: str | None = None,
    init: str = "scratch",
    device: str = "cpu",
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a detector on a COCO dataset and save it as a model directory (resuming a checkpoint there)."""
    dataset = load_coco(train_json)
    spec = load_recipe(recipe)
    model_fields = {**spec["model"], **(model_overrides or {})}
    model_fields.setdefault("masks", any(a.get("segmentation") for a in dataset.annotations))
    config = config_from_coco_categories(dataset.categories, **model_fields)
    train_cfg = TrainConfig.model_validate({**spec["train"], **(train_overrides or {})})
    detector = build_detector(config, device=device, init=init)
    data = CocoDetectionDataset(dataset, images_dir, config, keep_empty=train_cfg.keep_empty_images)
    result = train_detector(detector, data, train_cfg, out_dir, progress=progress)
    detector.save(
        out_dir,
        extra={
            "training": {
                "data": str(train_json),
                "data_sha256": file_sha256(train_json),
                "images": len(data),
                "init": init,
                "config": train_cfg.model_dump(mode="json"),
                "iterations": result.iterations,
                "first_loss": result.first_losses,
                "final_loss": result.final_losses,
                "seconds": round(result.seconds, 1),
            }
        },
    )
    return result


def evaluate_model(
    model_dir: str | Path,
    truth_json: str | Path,
    images_dir: str | Path | None,
    *,
    device: str = "cpu",
    batch_size: int = 4,
) -> dict[str, dict[str, float]]:
    """COCO metrics of a model directory on a labeled COCO split (one plain view)."""
    truth = load_coco(truth_json)
    detector = load_model(model_dir, device=device)
    results = predict_coco(
        detector, iter_image_refs(truth_json, images_dir=images_dir), batch_size=batch_size
    )
    return evaluate(truth, results)


def _synth_is_current(data_dir: Path, preset: str, seed: int) -> bool:
    """True when ``data_dir`` holds a complete benchmark of this preset and seed (json files come last)."""
    import dataclasses

    from distill.data.synthetic import resolve_preset

    stamp = data_dir / "test.json"
    if not stamp.exists():
        return False
    info = load_coco(stamp).data.get("info", {})
    expected = json.loads(json.dumps(dataclasses.asdict(resolve_preset(preset))))
    return info.get("seed") == seed and info.get("preset_params") == expected


def run_demo(
    out: str | Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    iterations: int | None = None,
    device: str = "cpu",
    progress: Callable[[TrainProgress], None] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Synthesize the benchmark, train a teacher on its labeled split, evaluate on its test split.

    Re-running reuses what is there: data of the same preset and seed, a finished or checkpointed model.
    """
    from distill.data.synthetic import generate

    out = Path(out)
    data_dir = out / "data"
    minutes: dict[str, float] = {}
    started = time.perf_counter()
    if not _synth_is_current(data_dir, preset, seed):
        echo(f"synthesizing the {preset!r} benchmark (seed {seed}) into {data_dir}")
        generate(data_dir, preset=preset, seed=seed)
    minutes["synth"] = (time.perf_counter() - started) / 60
    teacher_dir = out / "teacher"
    overrides: dict[str, Any] = {"seed": seed}
    if iterations is not None:
        overrides["iterations"] = iterations
    t0 = time.perf_counter()
    echo(f"training the teacher on {data_dir / 'labeled.json'}")
    result = train_model(
        data_dir / "labeled.json",
        data_dir / "images",
        teacher_dir,
        recipe="synth",
        device=device,
        train_overrides=overrides,
        progress=progress,
    )
    minutes["train"] = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    metrics = evaluate_model(teacher_dir, data_dir / "test.json", data_dir / "images", device=device)
    minutes["evaluate"] = (time.perf_counter() - t0) / 60
    minutes["total"] = (time.perf_counter() - started) / 60
    summary = {
        "preset": preset,
        "seed": seed,
        "teacher": str(teacher_dir),
        "train_iterations": result.iterations,
        "teacher_metrics": metrics,
        "minutes": {k: round(v, 2) for k, v in minutes.items()},
        "model_meta": read_meta(teacher_dir),
    }
    write_json_atomic(out / "summary.json", summary, indent=2)
    echo("")
    echo(f"teacher on the test split ({data_dir / 'test.json'}), COCO AP in points:")
    echo(format_table({"teacher": metrics}))
    return summary
