"""The calibration curve as a PNG: mean pseudo-instances per unlabeled image vs score threshold."""

from __future__ import annotations

import io
import math
from pathlib import Path

from distill.io import write_bytes_atomic
from distill.pseudo.calibrate import Calibration


def plot_calibration(
    calibration: Calibration, path: str | Path, *, category_names: dict[int, str] | None = None
) -> Path:
    """Draw the overall curve (per-class curves in per-class mode), the target and the chosen threshold."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    curve = calibration.curve
    thresholds = curve["thresholds"]
    figure = Figure(figsize=(7, 4.2), dpi=100)
    ax = figure.add_subplot()
    ax.plot(thresholds, curve["all"], color="black", linewidth=2, label="all classes")
    ax.axhline(
        calibration.labeled_instances_per_image,
        color="black",
        linestyle=":",
        label=f"labeled mean {calibration.labeled_instances_per_image:.2f}/image",
    )
    if calibration.threshold is not None and math.isfinite(calibration.threshold):
        ax.axvline(
            calibration.threshold,
            color="tab:red",
            linestyle="--",
            label=f"threshold {calibration.threshold:.3f}",
        )
    if calibration.mode == "per-class":
        names = category_names or {}
        for (cat, values), color in zip(curve["per_class"].items(), _colors(), strict=False):
            label = names.get(int(cat), f"category {cat}")
            ax.plot(thresholds, values, color=color, linewidth=1, label=label)
            thr = calibration.class_thresholds.get(int(cat))
            if thr is not None and math.isfinite(thr):
                ax.axvline(thr, color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("score threshold")
    ax.set_ylabel("mean instances per unlabeled image")
    ax.set_title(f"calibration ({calibration.mode}): {calibration.kept_per_image:.2f} kept per image")
    ax.set_xlim(0, thresholds[-1])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())


def _colors() -> list[str]:
    return ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"] * 20
