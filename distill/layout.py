"""Every artifact name of a run directory, in one place.

::

    RUN/
      pipeline.yaml               the config the run was made with (resuming checks it)
      summary.json  report.md
      round_K/
        teacher/                  model directory (when the run trains its own teacher)
        teacher_metrics.json      the teacher on the test split
        predictions.jsonl         fused predictions of every unlabeled image (one shard: the whole set)
        predictions/shard-00003-of-00040.jsonl    ... or one file per shard, when a worker pool infers
        pseudo.json               pseudo-label COCO file; its calibration beside it:
        pseudo.calibration.json  pseudo.calibration.png
        student/                  model directory
        metrics.json              the student on the test split

Paths are storage keys (``/``-separated strings) relative to wherever the run lives, or absolute local paths
when the run directory is.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

PIPELINE_FILE = "pipeline.yaml"
INPUTS_FILE = "inputs.json"  # what the run's inputs were (file hashes, recipe contents): resume checks it
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


def calibration_files(pseudo: str) -> tuple[str, str]:
    """The calibration report (json) and plot (png) written beside a pseudo-label file."""
    stem, _ = posixpath.splitext(pseudo)
    return f"{stem}.calibration.json", f"{stem}.calibration.png"


@dataclass(frozen=True)
class RoundLayout:
    """The artifacts of round ``number`` under ``dir``."""

    dir: str
    number: int

    def _join(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    @property
    def teacher(self) -> str:
        return self._join("teacher")

    @property
    def teacher_metrics(self) -> str:
        return self._join("teacher_metrics.json")

    @property
    def predictions(self) -> str:
        return self._join("predictions.jsonl")

    def shard(self, index: int, count: int) -> str:
        """The predictions of shard ``index`` (0-based) of ``count``."""
        return self._join(f"predictions/shard-{index:05d}-of-{count:05d}.jsonl")

    def shards(self, count: int) -> list[str]:
        return [self.shard(i, count) for i in range(count)]

    @property
    def pseudo(self) -> str:
        return self._join("pseudo.json")

    @property
    def calibration(self) -> str:
        return calibration_files(self.pseudo)[0]

    @property
    def calibration_plot(self) -> str:
        return calibration_files(self.pseudo)[1]

    @property
    def student(self) -> str:
        return self._join("student")

    @property
    def student_metrics(self) -> str:
        return self._join("metrics.json")


@dataclass(frozen=True)
class RunLayout:
    """A run directory: its config, summary, report and rounds."""

    root: str

    @property
    def pipeline_config(self) -> str:
        return posixpath.join(self.root, PIPELINE_FILE)

    @property
    def inputs(self) -> str:
        return posixpath.join(self.root, INPUTS_FILE)

    @property
    def summary(self) -> str:
        return posixpath.join(self.root, SUMMARY_FILE)

    @property
    def report(self) -> str:
        return posixpath.join(self.root, REPORT_FILE)

    def round(self, number: int) -> RoundLayout:
        return RoundLayout(posixpath.join(self.root, f"round_{number}"), number)
