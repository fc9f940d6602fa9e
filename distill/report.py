"""What a run tells people: the calibration in a few lines, and the run's Markdown report."""

from __future__ import annotations

from typing import Any

from distill.evaluate import format_table


def describe_calibration(calibration: dict[str, Any], warnings: list[str] = ()) -> str:
    """One or a few lines: threshold(s), kept per image vs the labeled mean, warnings.

    ``calibration`` is a calibration record (:meth:`Calibration.to_dict`, or the ``pseudo_label`` step's
    metrics); a threshold of ``None`` keeps nothing.
    """
    if calibration.get("mode") != "per-class":
        thr = f"threshold {_fmt(calibration['threshold'])}"
    else:
        thr = "thresholds " + ", ".join(f"{c}: {_fmt(t)}" for c, t in calibration["class_thresholds"].items())
    labeled = calibration.get("labeled_per_image", calibration.get("labeled_instances_per_image"))
    lines = [
        f"calibration ({calibration['mode']}): {thr}; {calibration['kept_per_image']:.3f} pseudo-instances "
        f"per unlabeled image (labeled: {labeled:.3f}), {calibration['kept_instances']} in all"
    ]
    if calibration.get("keypoint_thresholds"):
        lines.append(
            "keypoint score thresholds: "
            + ", ".join(f"category {c}: {_fmt(t, 3)}" for c, t in calibration["keypoint_thresholds"].items())
        )
    lines.extend(f"warning: {w}" for w in warnings)
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "inf (keeps nothing)" if value is None else f"{value:.{digits}f}"


def render_report(summary: dict[str, Any]) -> str:
    """The run's Markdown report: per round the AP table, the calibration plot and the decision."""
    lines = [
        "# distill run",
        "",
        f"Run directory: `{summary['run']}`; final model: `{summary['final_model']}`",
        "",
    ]
    for r in summary["rounds"]:
        k = r["round"]
        lines += [f"## Round {k}", ""]
        cal = r["calibration"]
        lines.append(
            f"- calibration: {cal['mode']}, {cal['kept_per_image']:.3f} pseudo-instances per unlabeled image "
            f"(labeled: {cal['labeled_per_image']:.3f})"
        )
        for w in cal["warnings"]:
            lines.append(f"- **warning**: {w}")
        lines.append(f"- student: {r['student_iterations']} iterations")
        if "metrics" in r:
            lines += ["", "```", format_table(r["metrics"]), "```", ""]
            p = r["primary"]
            lines.append(
                f"{p['metric']}: teacher {100 * p['teacher']:.1f}, student {100 * p['student']:.1f} -> "
                + ("**promoted**" if r["promoted"] else "not promoted")
            )
        for problem in r.get("health", []):
            lines.append(f"- **health check failed** (never promoted): {problem}")
        lines += ["", f"![calibration](round_{k}/pseudo.calibration.png)", ""]
    return "\n".join(lines) + "\n"
