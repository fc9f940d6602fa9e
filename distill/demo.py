"""``distill demo``: one whole distillation round on the embedded benchmark, and its settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from distill.data.coco import load_coco
from distill.data.synthetic import generate, resolve_preset
from distill.errors import InputError
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_json_atomic
from distill.layout import PIPELINE_FILE
from distill.pipeline import PipelineConfig, run_pipeline

logger = logging.getLogger(__name__)


def _preset_params(preset: str) -> dict[str, Any]:
    """The preset's fields as its benchmark's ``info.preset_params`` records them (json types)."""
    return json.loads(json.dumps(dataclasses.asdict(resolve_preset(preset))))


def benchmark_is_current(data_dir: Path, preset: str, seed: int) -> bool:
    """True when ``data_dir`` holds a complete benchmark of this preset and seed (json files come last)."""
    stamp = data_dir / "test.json"
    if not stamp.exists():
        return False
    info = load_coco(stamp).data.get("info", {})
    return info.get("seed") == seed and info.get("preset_params") == _preset_params(preset)


def benchmark_tag(preset: str, seed: int) -> str:
    """``<preset>-<8 hex of its fields>-s<seed>``: a name that changes whenever the preset's definition
    does, so that datasets made from two versions of a benchmark never share a name."""
    fields = json.dumps(_preset_params(preset), sort_keys=True).encode()
    return f"{preset}-{hashlib.sha256(fields).hexdigest()[:8]}-s{seed}"


def ensure_benchmark(
    data_dir: str | Path, *, preset: str = "demo", seed: int = 0, context: StepContext = NULL_CONTEXT
) -> Path:
    """``data_dir`` holding the embedded benchmark of ``preset`` and ``seed``: synthesized unless it is
    there already (``distill synth``'s layout: labeled / unlabeled / test json + images/)."""
    data_dir = Path(data_dir)
    if not benchmark_is_current(data_dir, preset, seed):
        logger.info("synthesizing the %r benchmark (seed %d) into %s", preset, seed, data_dir)
        generate(data_dir, preset=preset, seed=seed, context=context)
    return data_dir


DEMO_SETTINGS: dict[str, Any] = {
    # One round on the ``demo`` benchmark (40 labeled, 400 unlabeled images) sized for 15 minutes on 2 CPU
    # cores, venv included; most of the time is training. Results: bench/RESULTS.md, "make demo".
    "teacher": {"recipe": "synth-small", "iterations": 500},
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
    context: StepContext = NULL_CONTEXT,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One distillation round on the embedded benchmark: synthesize it, train a teacher on its labeled split,
    pseudo-label the unlabeled split, train a student, compare both on the test split.

    Re-running reuses what is there: data of the same preset and seed, finished steps, checkpoints.
    ``iterations`` overrides the teacher's (the student gets its usual multiple of it).
    """
    out = Path(out)
    data_dir = out / "data"
    started = time.perf_counter()
    if (out / PIPELINE_FILE).exists() and not benchmark_is_current(data_dir, preset, seed):
        # regenerating the data under a finished teacher would mix two benchmarks in one run
        raise InputError(
            f"{out}: made from another version of the {preset!r} benchmark (seed {seed}) than this distill "
            f"generates; delete {out} or pass another --out"
        )
    ensure_benchmark(data_dir, preset=preset, seed=seed, context=context)
    synth_minutes = (time.perf_counter() - started) / 60
    spec = json.loads(json.dumps(settings or DEMO_SETTINGS))
    if iterations is not None:
        spec["teacher"]["iterations"] = iterations
    config = PipelineConfig.model_validate({"data": synthetic_data_spec(data_dir), "seed": seed, **spec})
    summary = run_pipeline(config, out, device=device, context=context)
    summary["preset"] = preset
    summary["minutes"] = {
        "synth": round(synth_minutes, 2),
        **summary["rounds"][0]["minutes"],
        "total": round((time.perf_counter() - started) / 60, 2),
    }
    write_json_atomic(out / "summary.json", summary, indent=2)
    return summary
