"""``distill fuse`` as a user runs it: a real subprocess, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.errors import InputError


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, timeout=300
    )


def write(path: Path, results: list[dict]) -> str:
    path.write_text(json.dumps(results))
    return str(path)


def test_fuse_writes_the_fused_file_and_exits_2_on_bad_input(tmp_path: Path) -> None:
    box = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9}
    a = write(tmp_path / "a.json", [box, {**box, "image_id": 2, "score": 0.2}])
    b = write(tmp_path / "b.json", [{**box, "bbox": [4, 2, 100, 100], "score": 0.6}])
    out = tmp_path / "fused.json"
    proc = run("fuse", a, b, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("fused 2 files (3 detections) into 2 detections on 2 images")
    fused = json.loads(out.read_text())
    assert [e["image_id"] for e in fused] == [1, 2]
    assert fused[0]["bbox"] == pytest.approx([1.6, 0.8, 100.0, 100.0])  # vote: (0.9 a + 0.6 b) / 1.5
    assert (fused[0]["score"], fused[0]["agreement"], fused[1]["agreement"]) == (0.9, 1.0, 0.5)

    bad = write(tmp_path / "bad.json", [{**box, "score": "high"}])
    proc = run("fuse", a, bad, "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.json: [0].score: expected a number" in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_fuse_options(tmp_path: Path) -> None:
    box = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.9}
    a = write(tmp_path / "a.json", [box])
    b = write(tmp_path / "b.json", [{**box, "bbox": [4, 2, 100, 100], "score": 0.6}])
    out = tmp_path / "fused.json"
    runner = CliRunner()
    result = runner.invoke(app, ["fuse", a, b, "--out", str(out), "--fusion", "wbf", "--iou", "0.9"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())) == 2  # IoU 0.888 < 0.9: not merged
    result = runner.invoke(app, ["fuse", a, b, "--out", str(out), "--fusion", "nms"])
    assert json.loads(out.read_text())[0]["bbox"] == [0.0, 0.0, 100.0, 100.0]

    for args, message in [
        ([a], "need at least two results files"),
        ([a, b, "--fusion", "mean"], "--fusion 'mean'"),
        ([a, b, "--iou", "0"], "--iou 0.0"),
    ]:
        result = runner.invoke(app, ["fuse", *args, "--out", str(out)])
        assert isinstance(result.exception, InputError) and message in str(result.exception)
    assert runner.invoke(app, ["fuse", a, b]).exit_code == 2  # --out is required
    assert runner.invoke(app, ["fuse", a, b, "--out", str(out), "--max-detections", "-1"]).exit_code == 2
    assert "agreement" in runner.invoke(app, ["fuse", "--help"]).output
