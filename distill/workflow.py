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

import torch

from distill.data.coco import CocoDataset, coco_statistics, load_coco, load_results, save_coco
from distill.data.images import iter_image_refs
from distill.errors import InputError
from distill.evaluate import evaluate
from distill.io import write_json_atomic
from distill.models.config import ModelConfig, config_from_coco_categories
from distill.models.store import build_detector, load_model
from distill.predict import predict_coco
from distill.pseudo.calibrate import Calibration, calibrate
from distill.pseudo.labels import build_pseudo_labels
from distill.pseudo.plot import plot_calibration
from distill.recipes import load_recipe
from distill.train.data import CocoDetectionDataset
from distill.train.loop import TrainConfig, TrainProgress, TrainResult, train_detector
from distill.train.samplers import RatioBatchSampler


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
    config, train_cfg = _configs(dataset, recipe, train_overrides, model_overrides)
    detector = build_detector(config, device=device, init=init)
    data = CocoDetectionDataset(dataset, images_dir, config, keep_empty=train_cfg.keep_empty_images)
    result = train_detector(detector, data, train_cfg, out_dir, progress=progress)
    _save_trained(detector, out_dir, result, train_cfg, init, train_json, images=len(data))
    return result


def _configs(
    dataset: CocoDataset,
    recipe: str | None,
    train_overrides: dict | None,
    model_overrides: dict | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The model config (label space from ``dataset``) and training config of a recipe plus overrides."""
    spec = load_recipe(recipe)
    model_fields = {**spec["model"], **(model_overrides or {})}
    model_fields.setdefault("masks", any(a.get("segmentation") for a in dataset.annotations))
    config = config_from_coco_categories(dataset.categories, **model_fields)
    return config, TrainConfig.model_validate({**spec["train"], **(train_overrides or {})})


def _save_trained(
    detector, out_dir, result: TrainResult, cfg: TrainConfig, init: str, data_json, **extra
) -> None:
    """Save the model directory with what it was trained on and how, in ``meta.json``."""
    detector.save(
        out_dir,
        extra={
            "training": {
                "data": str(data_json),
                "data_sha256": file_sha256(data_json),
                **extra,
                "init": init,
                "config": cfg.model_dump(mode="json"),
                "iterations": result.iterations,
                "first_loss": result.first_losses,
                "final_loss": result.final_losses,
                "seconds": round(result.seconds, 1),
            }
        },
    )


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
    # every metric the model can produce, scored 0 when it produced nothing of that kind (a weak model with no
    # keypoint-class detections still has a keypoint AP, so rounds can compare it)
    iou_types = ["bbox"]
    if detector.has_masks:
        iou_types.append("segm")
    if detector.has_keypoints and truth.keypoint_categories():
        iou_types.append("keypoints")
    return evaluate(truth, results, iou_types=iou_types)


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


DEMO_SETTINGS: dict[str, Any] = {
    # One round on the embedded benchmark, aimed at 2 CPU cores (still ~20 min idle, over the 15 min aim; the
    # time goes to training and to 6 views x 800 images). Results: bench/RESULTS.md, "A whole round".
    "teacher": {"recipe": "synth", "iterations": 300},
    "inference": {"views": "0.75x,1x,1.25x:flip", "fusion": "nms", "batch_size": 4, "max_detections": 20},
    "student": {"schedule_factor": 1.5, "ratio": [6, 4]},
}


def synthetic_data_spec(data_dir: str | Path) -> dict[str, Path]:
    """The pipeline's ``data:`` section for a ``distill synth`` folder (labeled / unlabeled / test splits)."""
    data_dir = Path(data_dir)
    images = data_dir / "images"
    return {
        "labeled": data_dir / "labeled.json",
        "labeled_images": images,
        "unlabeled": data_dir / "unlabeled.json",
        "unlabeled_images": images,
        "test": data_dir / "test.json",
        "test_images": images,
    }


def run_demo(
    out: str | Path,
    *,
    preset: str = "demo",
    seed: int = 0,
    iterations: int | None = None,
    device: str = "cpu",
    progress: Callable[[TrainProgress], None] | None = None,
    echo: Callable[[str], None] = print,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One distillation round on the embedded benchmark: synthesize it, train a teacher on its labeled split,
    pseudo-label the unlabeled split, train a student, compare both on the test split.

    Re-running reuses what is there: data of the same preset and seed, finished steps, checkpoints.
    ``iterations`` overrides the teacher's (the student gets its usual multiple of it).
    """
    from distill.data.synthetic import generate
    from distill.pipeline import PipelineConfig, run_pipeline

    out = Path(out)
    data_dir = out / "data"
    started = time.perf_counter()
    if not _synth_is_current(data_dir, preset, seed):
        echo(f"synthesizing the {preset!r} benchmark (seed {seed}) into {data_dir}")
        generate(data_dir, preset=preset, seed=seed)
    synth_minutes = (time.perf_counter() - started) / 60
    spec = json.loads(json.dumps(settings or DEMO_SETTINGS))
    if iterations is not None:
        spec["teacher"]["iterations"] = iterations
    config = PipelineConfig.model_validate({"data": synthetic_data_spec(data_dir), "seed": seed, **spec})
    summary = run_pipeline(config, out, device=device, echo=echo, progress=progress)
    summary["preset"] = preset
    summary["minutes"] = {
        "synth": round(synth_minutes, 2),
        **summary["rounds"][0]["minutes"],
        "total": round((time.perf_counter() - started) / 60, 2),
    }
    write_json_atomic(out / "summary.json", summary, indent=2)
    return summary


def unlabeled_images(source: str | Path, images_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """COCO image entries (id, file_name, width, height) of an unlabeled set: a COCO json or an image folder.

    For a folder, ids are positions + 1 (as ``distill predict`` assigns them) and sizes are read from the
    image headers (EXIF rotation applied, like decoding does).
    """
    refs = iter_image_refs(source, images_dir=images_dir)
    if all(r.width is not None and r.height is not None for r in refs):
        return [
            {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height} for r in refs
        ]
    from distill.data.images import image_size

    out = []
    for ref in refs:
        width, height = image_size(ref.path)
        out.append({"id": ref.image_id, "file_name": ref.file_name, "width": width, "height": height})
    return out


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """COCO results from a ``.json`` list or a multi-view ``.jsonl`` stream (``agreement`` kept per entry)."""
    from distill.data.coco import validate_results
    from distill.tta.stream import read_instances

    path = Path(path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: predictions file not found")
        results = read_instances(path)
        validate_results(results, str(path))
        return results
    return load_results(path)


def make_pseudo_labels(
    predictions: str | Path | list[dict[str, Any]],
    *,
    unlabeled: str | Path,
    labeled_json: str | Path,
    out: str | Path,
    unlabeled_images_dir: str | Path | None = None,
    per_class: bool = False,
    threshold: float | None = None,
    min_agreement: float | None = None,
    keypoint_threshold: float | None = None,
    strict: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Calibration:
    """Calibrate the threshold(s) and write the pseudo-label COCO file ``out`` plus the calibration artifacts
    ``OUT.calibration.json`` and ``OUT.calibration.png``. Under ``strict`` a health warning is an error (and
    nothing is written)."""
    out = Path(out)
    labeled = load_coco(labeled_json)
    images = unlabeled_images(unlabeled, unlabeled_images_dir)
    source = str(predictions) if not isinstance(predictions, list) else "predictions"
    entries = predictions if isinstance(predictions, list) else load_predictions(predictions)
    stats = coco_statistics(labeled)
    if stats.num_instances == 0:
        raise InputError(f"{labeled_json}: the labeled set has no instances; nothing to calibrate against")
    try:
        calibration = calibrate(
            entries,
            labeled=stats,
            unlabeled_image_ids=[im["id"] for im in images],
            per_class=per_class,
            threshold=threshold,
            min_agreement=min_agreement,
            keypoint_threshold=keypoint_threshold,
        )
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    if strict and calibration.warnings:
        raise InputError(
            "calibration failed the health checks (--strict): " + "; ".join(calibration.warnings)
        )
    data = build_pseudo_labels(
        entries,
        images=images,
        labeled=labeled,
        calibration=calibration,
        provenance={
            "predictions": source,
            "labeled": str(labeled_json),
            "labeled_sha256": file_sha256(labeled_json),
            **(provenance or {}),
        },
        source=source,
    )
    write_json_atomic(out.with_name(out.stem + ".calibration.json"), calibration.to_dict(), indent=1)
    plot_calibration(
        calibration,
        out.with_name(out.stem + ".calibration.png"),
        category_names={c["id"]: c["name"] for c in labeled.categories},
    )
    save_coco(data, out)
    return calibration


def train_student(
    labeled_json: str | Path,
    labeled_images: str | Path,
    pseudo_json: str | Path,
    pseudo_images: str | Path,
    out_dir: str | Path,
    *,
    recipe: str | None = None,
    init: str = "scratch",
    ratio: tuple[float, float] = (6.0, 4.0),
    device: str = "cpu",
    train_overrides: dict[str, Any] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a student on labeled + pseudo-labeled images, ``ratio`` = labeled : pseudo per minibatch.

    The label space is the labeled set's; images of the pseudo set without instances stay (negatives).
    """
    labeled = load_coco(labeled_json)
    pseudo = load_coco(pseudo_json)
    if [c["id"] for c in pseudo.categories] != [c["id"] for c in labeled.categories]:
        raise InputError(f"{pseudo_json}: categories differ from {labeled_json}'s")
    config, train_cfg = _configs(labeled, recipe, train_overrides)
    detector = build_detector(config, device=device, init=init)
    labeled_data = CocoDetectionDataset(
        labeled, labeled_images, config, keep_empty=train_cfg.keep_empty_images
    )
    pseudo_data = CocoDetectionDataset(pseudo, pseudo_images, config, keep_empty=True)
    data = torch.utils.data.ConcatDataset([labeled_data, pseudo_data])
    sampler = RatioBatchSampler(
        [len(labeled_data), len(pseudo_data)], list(ratio), train_cfg.batch_size, seed=train_cfg.seed
    )
    result = train_detector(detector, data, train_cfg, out_dir, sampler=sampler, progress=progress)
    _save_trained(
        detector,
        out_dir,
        result,
        train_cfg,
        init,
        labeled_json,
        pseudo=str(pseudo_json),
        pseudo_sha256=file_sha256(pseudo_json),
        ratio=list(ratio),
        images={"labeled": len(labeled_data), "pseudo": len(pseudo_data)},
    )
    return result
