"""The dashboard's charts as PNG bytes: the teacher's score distribution with the calibrated threshold(s),
target vs kept instances per class, the view agreement of the pseudo-labels and metrics across versions.

Every chart accepts empty or degenerate input and then shows its axes with a "no data yet" note.
"""

from __future__ import annotations

import io
import itertools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SIZE_INCHES = (6.0, 3.5)
DPI = 100
_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def score_bins(calibration: dict[str, Any]) -> tuple[list[float], list[int]]:
    """Bin edges and detection counts per score bin, from the calibration report's curve.

    ``curve["all"][i]`` is the mean number of detections per unlabeled image with ``score >= t_i``; times
    ``num_unlabeled_images`` it is the count ``kept_i``, and bin ``[t_i, t_i+1)`` holds ``kept_i - kept_i+1``
    detections. The last bin is closed: it also holds the scores equal to the last threshold. The counts
    therefore sum to the number of detections with ``score >= 0`` (those the calibration saw, after any
    ``min_agreement``). No curve or no images: ``([], [])``.
    """
    curve = calibration.get("curve") or {}
    thresholds = curve.get("thresholds") or []
    per_image = curve.get("all") or []
    images = calibration.get("num_unlabeled_images") or 0
    if len(thresholds) < 2 or len(per_image) != len(thresholds) or images <= 0:
        return [], []
    kept = [round(v * images) for v in per_image]
    for i in range(1, len(kept)):  # the report rounds to 6 decimals: keep the counts non-increasing
        kept[i] = min(kept[i], kept[i - 1])
    counts = [kept[i] - kept[i + 1] for i in range(len(kept) - 1)]
    counts[-1] += kept[-1]
    return [float(t) for t in thresholds], counts


def score_histogram(calibration: dict[str, Any], *, names: dict[int, str] | None = None) -> bytes:
    """Bars of detections per score bin, the chosen threshold (per class in per-class mode) dashed."""
    figure, ax = _figure("detections per score bin", "score", "detections")
    edges, counts = score_bins(calibration)
    if not any(counts):
        return _no_data(figure, ax, "no detections yet")
    widths = [b - a for a, b in itertools.pairwise(edges)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:gray", edgecolor="none")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(bottom=0)
    threshold = calibration.get("threshold")
    if calibration.get("mode") == "per-class":
        known = names or {}
        lines = {
            known.get(int(c), f"category {c}"): t
            for c, t in (calibration.get("class_thresholds") or {}).items()
            if _finite(t)
        }
    else:
        label = "fixed threshold" if calibration.get("mode") == "fixed" else "threshold"
        lines = {label: threshold} if _finite(threshold) else {}
    for (label, value), colour in zip(lines.items(), _cycle(len(lines)), strict=True):
        ax.axvline(value, color=colour, linestyle="--", linewidth=1, label=f"{label} {value:.3f}")
    if 0 < len(lines) <= 10:
        ax.legend(fontsize=7)
    return _png(figure)


def class_counts(calibration: dict[str, Any], names: dict[int, str]) -> bytes:
    """Grouped bars per class: the target count vs the kept pseudo-instances.

    ``target_per_class`` is a count on the unlabeled set: the class's mean instances per labeled image
    times the number of unlabeled images (not a per-image mean, and not necessarily an integer).
    """
    figure, ax = _figure("instances per class", "class", "instances on the unlabeled images")
    target = {int(k): float(v) for k, v in (calibration.get("target_per_class") or {}).items()}
    kept = {int(k): int(v) for k, v in (calibration.get("kept_per_class") or {}).items()}
    classes = sorted(target.keys() | kept.keys())
    if not classes:
        return _no_data(figure, ax, "no classes yet")
    positions = range(len(classes))
    ax.bar([p - 0.2 for p in positions], [target.get(c, 0.0) for c in classes], width=0.4, label="target")
    ax.bar([p + 0.2 for p in positions], [kept.get(c, 0) for c in classes], width=0.4, label="kept")
    ax.set_xticks(list(positions), [names.get(c, f"category {c}") for c in classes])
    ax.tick_params(axis="x", labelrotation=90 if len(classes) > 8 else 0, labelsize=7)
    ax.legend(fontsize=8)
    if not (any(target.values()) or any(kept.values())):
        return _no_data(figure, ax, "no instances yet")
    ax.set_ylim(bottom=0)
    return _png(figure)


def agreement_histogram(agreements: list[float]) -> bytes:
    """Histogram over [0, 1] of the view agreement of the kept pseudo-labels."""
    values = [min(1.0, max(0.0, float(a))) for a in agreements if _finite(a)]
    figure, ax = _figure("view agreement of the pseudo-labels", "agreement", "pseudo-labels")
    ax.set_xlim(0.0, 1.0)
    if not values:
        return _no_data(figure, ax, "no pseudo-labels yet")
    ax.hist(values, bins=20, range=(0.0, 1.0), color="tab:blue")
    return _png(figure)


def metrics_history(versions: list[tuple[str, dict[str, float]]], metrics: list[str]) -> bytes:
    """One line per metric across the versions (in the given order); missing values are skipped."""
    figure, ax = _figure("metrics by version", "version", "value")
    labels = [label for label, _ in versions]
    ax.set_xticks(range(len(labels)), labels)
    plotted = False
    for metric, colour in zip(metrics, _cycle(len(metrics)), strict=True):
        points = [(i, v[metric]) for i, (_, v) in enumerate(versions) if _finite(v.get(metric))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", color=colour, label=metric)
            plotted = True
    if not plotted:
        return _no_data(figure, ax, "no metrics yet")
    ax.legend(fontsize=8)
    return _png(figure)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cycle(n: int) -> list[str]:
    return [_COLOURS[i % len(_COLOURS)] for i in range(n)]


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    ax = figure.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return figure, ax


def _no_data(figure: Figure, ax: Axes, text: str) -> bytes:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")
    return _png(figure)


def _png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
