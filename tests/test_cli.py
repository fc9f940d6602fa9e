"""The ``distill`` command as a user runs it: a real subprocess, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL

COMMANDS = ["synth", "train", "predict", "fuse", "evaluate", "calibrate", "run", "demo", "import-detectron2"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"distill {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def test_help_on_every_command() -> None:
    top = run("--help")
    for command in COMMANDS:
        assert command in top.stdout
        assert "Usage:" in run(command, "--help").stdout


def test_synth_help_lists_every_preset_without_importing_the_generator() -> None:
    from distill.data.presets import PRESETS

    shown = run("synth", "--help").stdout
    assert all(name in shown for name in PRESETS) and "medium" in PRESETS
    code = "import sys, distill.cli; print(sorted(m for m in ('numpy', 'torch', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_input_exits_2_with_one_line_reason(tmp_path: Path) -> None:
    proc = run("evaluate", "--truth", str(tmp_path / "missing.json"), "--predictions", "x.json", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0]

    broken = tmp_path / "broken.json"
    broken.write_text(
        '{"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 5}], "annotations": []}'
    )
    proc = run("evaluate", "--truth", str(broken), "--predictions", "x.json", check=False)
    assert proc.returncode == 2 and "images[0].width" in proc.stderr

    proc = run("synth", str(tmp_path / "s"), "--preset", "huge", check=False)
    assert proc.returncode == 2 and "unknown synthetic preset 'huge'" in proc.stderr

    proc = run("train", "--bogus", check=False)
    assert proc.returncode == 2

    proc = run("train", "--train", "l.json", "--images", "i", "--out", "m", "--backend", "mmdet", check=False)
    assert proc.returncode == 2 and "--backend 'mmdet': expected torchvision or detectron2" in proc.stderr
    proc = run("train", "--train", "l.json", "--images", "i", "--out", "m", "--set", "A=1", check=False)
    assert proc.returncode == 2 and "--set is for --backend detectron2" in proc.stderr


def test_detectron2_commands_say_how_to_get_detectron2_when_it_is_missing(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    proc = run("import-detectron2", "x.yaml", "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "needs detectron2, which is not on PyPI" in proc.stderr
    proc = run(
        "train", "--backend", "detectron2", "--config", "x.yaml", "--train", "l.json", "--images", "i",
        "--out", str(tmp_path / "m"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "needs detectron2" in proc.stderr


@pytest.mark.slow
def test_synth_train_predict_evaluate_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run("synth", str(data), "--preset", "tiny", "--seed", "3")
    assert json.loads((data / "labeled.json").read_text())["info"]["seed"] == 3

    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(
        yaml.safe_dump(
            {"model": TINY_MODEL, "train": {"iterations": 6, "batch_size": 2, "checkpoint_period": 3}}
        )
    )
    model = tmp_path / "model"
    out = run(
        "train",
        "--train",
        str(data / "labeled.json"),
        "--images",
        str(data / "images"),
        "--out",
        str(model),
        "--config",
        str(recipe),
        "--device",
        "cpu",
    )
    assert "trained 6 iterations" in out.stdout
    assert {"config.yaml", "weights.pt", "meta.json", "checkpoint.pt"} <= {p.name for p in model.iterdir()}
    meta = json.loads((model / "meta.json").read_text())
    assert meta["training"]["iterations"] == 6 and meta["training"]["images"] == 12

    def predict(out: Path, *extra: str) -> None:
        run(
            "predict",
            "--model",
            str(model),
            "--images",
            str(data / "test.json"),
            "--images-dir",
            str(data / "images"),
            "--out",
            str(out),
            *extra,
        )

    results = tmp_path / "results.json"
    predict(results, "--score-thresh", "0.0")
    detections = json.loads(results.read_text())
    assert detections and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(detections[0])
    test_ids = {img["id"] for img in json.loads((data / "test.json").read_text())["images"]}
    assert {d["image_id"] for d in detections} <= test_ids

    # multi-view: fused results, their view set and agreement, at most --max-detections per image; a zero
    # feature cache recomputes every view's features for the heads, and says so
    fused = tmp_path / "fused.json"
    proc = run(
        "predict", "--model", str(model), "--images", str(data / "test.json"), "--images-dir",
        str(data / "images"), "--out", str(fused), "--views", "1x,1.25x:flip", "--score-thresh", "0.0",
        "--max-detections", "5", "--feature-cache-mb", "0",
    )  # fmt: skip
    fused_results = json.loads(fused.read_text())
    sidecar = json.loads((tmp_path / "fused.json.views.json").read_text())
    assert len(sidecar["views"]["views"]) == 4 and len(sidecar["agreement"]) == len(fused_results)
    per_image = [sum(r["image_id"] == i for r in fused_results) for i in test_ids]
    assert max(per_image) == 5
    assert "4 of 4 views did not fit the feature cache" in proc.stderr

    metrics_file = tmp_path / "metrics.json"
    table = run(
        "evaluate",
        "--truth",
        str(data / "test.json"),
        "--predictions",
        str(results),
        "--json",
        str(metrics_file),
    )
    assert "bbox AP" in table.stdout
    metrics = json.loads(metrics_file.read_text())
    # keypoint AP is computed whenever some detection carries keypoints (a 6-iteration model may have none)
    has_keypoints = any("keypoints" in d for d in detections)
    assert {"bbox", "segm"} <= set(metrics) and ("keypoints" in metrics) == has_keypoints
    assert metrics["bbox"] and all(-1.0 <= v <= 1.0 for m in metrics.values() for v in m.values())

    # evaluating a model directly equals predicting (same defaults) and evaluating the file
    plain = tmp_path / "plain.json"
    predict(plain)
    via_file, via_model = tmp_path / "via_file.json", tmp_path / "via_model.json"
    run("evaluate", "--truth", str(data / "test.json"), "--predictions", str(plain), "--json", str(via_file))
    run(
        "evaluate",
        "--truth",
        str(data / "test.json"),
        "--model",
        str(model),
        "--images",
        str(data / "images"),
        "--json",
        str(via_model),
    )
    by_model, by_file = json.loads(via_model.read_text()), json.loads(via_file.read_text())
    assert {key: by_model[key] for key in by_file} == by_file
    # a model is scored on every head it has, also one that found nothing (a results file cannot say)
    assert set(by_model) == {"bbox", "segm", "keypoints"}
    if "keypoints" not in by_file:
        assert by_model["keypoints"]["AP"] == 0.0
