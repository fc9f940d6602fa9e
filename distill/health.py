"""Health checks a distillation round must pass before its student may replace anything.

Calibration aims the pseudo-labels at the labeled set's density, so a round whose pseudo-labels end far
from it did not work: a teacher that finds (almost) nothing (collapse) or a threshold that let everything
through (explosion). A student whose training ended with a non-finite loss is broken whatever its score
(distill's loop stops on one; the check guards a backend that records it and goes on).
Each check returns the problems it found, as sentences; an empty list is healthy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_DENSITY_RATIO = 0.25  # pseudo-instances per image below a quarter of the labeled mean: collapse
MAX_DENSITY_RATIO = 4.0  # above four times the labeled mean: explosion


def pseudo_label_problems(kept_per_image: float, labeled_per_image: float) -> list[str]:
    """Collapse or explosion of the pseudo-label count against the labeled mean (both per image)."""
    if labeled_per_image <= 0:
        return []
    ratio = kept_per_image / labeled_per_image
    if ratio < MIN_DENSITY_RATIO:
        return [
            f"pseudo-labels collapsed: {kept_per_image:.2f} per image against {labeled_per_image:.2f} "
            f"labeled (below {MIN_DENSITY_RATIO:g}x)"
        ]
    if ratio > MAX_DENSITY_RATIO:
        return [
            f"pseudo-labels exploded: {kept_per_image:.2f} per image against {labeled_per_image:.2f} "
            f"labeled (above {MAX_DENSITY_RATIO:g}x)"
        ]
    return []


def loss_problems(final_loss: Mapping[str, Any] | None) -> list[str]:
    """Non-finite terms of a training's last losses."""
    bad = [f"{k}={v}" for k, v in (final_loss or {}).items() if not math.isfinite(float(v))]
    return [f"the student's final loss is not finite ({', '.join(bad)})"] if bad else []


def round_problems(calibration: Mapping[str, Any], training: Mapping[str, Any]) -> list[str]:
    """Every problem of one round: its calibration record (``kept_per_image``, ``labeled_per_image``) and
    its student's training record (``final_loss``)."""
    return pseudo_label_problems(
        float(calibration["kept_per_image"]), float(calibration["labeled_per_image"])
    ) + loss_problems(training.get("final_loss"))
