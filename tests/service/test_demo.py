"""``make demo``'s script (``service.demo``) end to end on the ``tiny`` benchmark with a few iterations of
the ``tiny`` recipe: ``distill up`` really started, the splits uploaded with ``distill remote``, a pipeline
job watched to its end, its summary downloaded and every process of the service stopped afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.demo import describe, main, run_service_demo

SETTINGS = {
    "teacher": {"recipe": "tiny", "iterations": 4},
    "inference": {"views": "1x:flip", "batch_size": 4},
    "student": {"schedule_factor": 1.0, "ratio": [1, 1]},
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_demo_runs_through_the_service_and_stops_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_service_demo(out, preset="tiny", settings=SETTINGS)

    (round_1,) = summary["rounds"]
    assert set(round_1["metrics"]) == {"teacher", "student"} and isinstance(round_1["promoted"], bool)
    assert round_1["student_iterations"] == 4
    assert json.loads((out / "summary.json").read_text())["job"] == summary["job"] == 1
    for name in ("summary.json", "report.md", "round_1/pseudo.calibration.png"):
        assert (out / "artifacts" / name).stat().st_size > 0
    # the unlabeled split went up as images only: the job calibrated on the labeled split's density
    labeled = json.loads((out / "data" / "labeled.json").read_text())
    assert round_1["calibration"]["labeled_per_image"] == pytest.approx(
        len(labeled["annotations"]) / len(labeled["images"]), abs=1e-3
    )
    unlabeled = json.loads((out / "data" / "unlabeled.json").read_text())
    links = out / "upload" / "unlabeled"
    uploaded = sorted(p.relative_to(links).as_posix() for p in links.rglob("*") if p.is_file())
    assert uploaded == sorted(i["file_name"] for i in unlabeled["images"])
    pseudo = json.loads((out / "var" / "storage" / "jobs" / "1" / "round_1" / "pseudo.json").read_text())
    assert sorted(i["file_name"] for i in pseudo["images"]) == sorted(
        i["file_name"] for i in unlabeled["images"]
    )
    assert set(summary["minutes"]) == {"synth", "start", "upload", "job", "download", "stop", "total"}

    # every process distill up started is gone, and its ready file (which holds the token) with it
    assert not (out / "var" / "ready.json").exists()
    started = summary["service"]
    assert set(started["children"]) == {"api", "gpu0", "cpu", "beat", "redis"}
    assert not any(_alive(pid) for pid in [started["pid"], *started["children"].values()])

    text = describe(summary)
    assert "bbox AP" in text and str(out / "artifacts") in text and "job 1;" in text


def test_a_failing_step_is_reported_and_stops_the_service(tmp_path: Path, capfd, monkeypatch) -> None:
    """An unknown recipe: the job is refused with a 422, the demo says which command failed, exits 1 and
    leaves no process behind."""
    monkeypatch.setattr("service.demo.DEMO_SETTINGS", {**SETTINGS, "teacher": {"recipe": "no-such"}})
    assert main(["--out", str(tmp_path / "demo"), "--preset", "tiny"]) == 1
    captured = capfd.readouterr()
    assert "`distill remote run pipeline" in captured.err and "exited with 2" in captured.err
    assert "stopped distill up (exit 0)" in captured.out
