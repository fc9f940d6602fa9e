"""Score-threshold calibration: the paper's rule for turning soft predictions into hard pseudo-labels.

Data Distillation keeps a fused detection as a pseudo-label when its score is at or above a threshold chosen
so that *the mean number of pseudo-instances per unlabeled image equals the mean number of instances per
labeled image* (crowd regions not counted). The denominator is every unlabeled image, including those where
the teacher found nothing.

Selection is exact: the target count ``k = mean_labeled * num_unlabeled`` is matched by the k-th largest
score (one sort, O(n log n); fine for millions of detections). Scores can tie, so not every count is
reachable: the threshold is the detection score whose kept count (``score >= threshold``) is closest to
``k``; when two counts are equally close the larger one wins. Keeping nothing (threshold ``+inf``) is a
candidate too, for targets below half the smallest reachable count.

Variants: per class (each class's count matched to its labeled frequency), a minimum view agreement applied
before counting, a user-fixed threshold (reported against the curve), and for keypoints a threshold on the
per-keypoint scores matching the labeled mean of visible keypoints per instance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from distill.data.coco import CocoStats

CURVE_POINTS = 101


@dataclass(frozen=True)
class Selection:
    """Where a threshold sits: ``kept`` of ``available`` scores are ``>= threshold``."""

    threshold: float  # +inf: keep nothing
    kept: int
    available: int
    target: float  # the count aimed at (``nan`` for a user-fixed threshold with no target)
    at_floor: bool  # the target needed every available score (the teacher ran out of detections)


def select_threshold(scores: np.ndarray | Sequence[float], target: float) -> Selection:
    """The score threshold whose kept count ``#(scores >= t)`` is closest to ``target`` (see module doc)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if target < 0 or not math.isfinite(target):
        raise ValueError(f"target count must be a finite number >= 0, got {target}")
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite")
    n = len(values)
    if n == 0:
        return Selection(math.inf, 0, 0, target, at_floor=target > 0)
    distinct, counts = np.unique(-values, return_counts=True)  # descending scores
    kept = np.cumsum(counts)  # kept count when the threshold is distinct[i]
    candidates_kept = np.concatenate([[0], kept])
    candidates_thr = np.concatenate([[math.inf], -distinct])
    distance = np.abs(candidates_kept - target)
    # closest count; on equal distance the larger count (the later candidate) wins
    best = len(distance) - 1 - int(np.argmin(distance[::-1]))
    return Selection(
        threshold=float(candidates_thr[best]),
        kept=int(candidates_kept[best]),
        available=n,
        target=float(target),
        at_floor=bool(target > n),
    )


def agrees(prediction: dict[str, Any], min_agreement: float | None) -> bool:
    """Whether a prediction was seen by enough views: ``agreement >= min_agreement`` (entries without the
    field count as agreeing; no minimum admits everything)."""
    return min_agreement is None or float(prediction.get("agreement", 1.0)) >= min_agreement


def count_at(scores: np.ndarray, threshold: float) -> int:
    """How many scores are ``>= threshold``."""
    return int((np.asarray(scores) >= threshold).sum())


@dataclass
class Calibration:
    """The outcome of :func:`calibrate`: thresholds, counts, the curve and health messages."""

    mode: str  # "global" | "per-class" | "fixed"
    num_unlabeled_images: int
    labeled_instances_per_image: float
    min_agreement: float | None
    threshold: float | None  # the global threshold (None in per-class mode)
    class_thresholds: dict[int, float]  # category id -> threshold actually applied
    selections: dict[str, Selection]  # "all" and/or str(category id)
    keypoint_thresholds: dict[int, float]  # keypoint category id -> per-keypoint score threshold
    keypoint_selections: dict[str, Selection]
    kept_instances: int
    kept_per_image: float
    kept_per_class: dict[int, int]
    target_per_class: dict[int, float]
    curve: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def threshold_for(self, category_id: int) -> float:
        """The score threshold applied to ``category_id``'s detections."""
        if self.threshold is not None:
            return self.threshold
        return self.class_thresholds.get(category_id, math.inf)

    def admits_agreement(self, prediction: dict[str, Any]) -> bool:
        """Whether ``prediction`` passes this calibration's ``min_agreement`` (see :func:`agrees`)."""
        return agrees(prediction, self.min_agreement)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``inf`` thresholds become ``null``)."""

        def num(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else value

        def sel(s: Selection) -> dict[str, Any]:
            out = asdict(s)
            out["threshold"] = num(s.threshold)
            out["target"] = num(s.target)
            return out

        return {
            "mode": self.mode,
            "num_unlabeled_images": self.num_unlabeled_images,
            "labeled_instances_per_image": self.labeled_instances_per_image,
            "min_agreement": self.min_agreement,
            "threshold": num(self.threshold),
            "class_thresholds": {str(k): num(v) for k, v in self.class_thresholds.items()},
            "selections": {k: sel(v) for k, v in self.selections.items()},
            "keypoint_thresholds": {str(k): num(v) for k, v in self.keypoint_thresholds.items()},
            "keypoint_selections": {k: sel(v) for k, v in self.keypoint_selections.items()},
            "kept_instances": self.kept_instances,
            "kept_per_image": self.kept_per_image,
            "kept_per_class": {str(k): v for k, v in self.kept_per_class.items()},
            "target_per_class": {str(k): v for k, v in self.target_per_class.items()},
            "curve": self.curve,
            "warnings": self.warnings,
        }


def calibrate(
    predictions: Sequence[dict[str, Any]],
    *,
    labeled: CocoStats,
    unlabeled_image_ids: Sequence[int],
    per_class: bool = False,
    threshold: float | None = None,
    min_agreement: float | None = None,
    keypoint_threshold: float | None = None,
) -> Calibration:
    """Choose the score threshold(s) for the pseudo-labels of ``predictions`` (COCO results entries).

    ``labeled`` gives the target densities; ``unlabeled_image_ids`` is the denominator (every unlabeled
    image). Predictions for images outside it are ignored. With ``min_agreement``, entries whose
    ``agreement`` is below it are dropped before counting (entries without the field count as agreeing).
    ``threshold`` fixes the (global) threshold instead of calibrating it; the curve still shows where it
    sits. ``keypoint_threshold`` likewise fixes the per-keypoint threshold.
    """
    num_images = len(unlabeled_image_ids)
    if num_images == 0:
        raise ValueError("no unlabeled images: the mean per image is undefined")
    if threshold is not None and per_class:
        raise ValueError("a fixed threshold and per-class calibration exclude each other")
    image_ids = set(unlabeled_image_ids)
    on_images = [p for p in predictions if p["image_id"] in image_ids]
    pool = [p for p in on_images if agrees(p, min_agreement)]
    scores = np.array([float(p["score"]) for p in pool], dtype=np.float64)
    cats = np.array([int(p["category_id"]) for p in pool], dtype=np.int64)
    category_ids = sorted(labeled.per_category)
    target_total = labeled.instances_per_image * num_images
    target_per_class = {c: labeled.per_category[c] * num_images for c in category_ids}

    selections: dict[str, Selection] = {}
    class_thresholds: dict[int, float] = {}
    if threshold is not None:
        mode, global_thr = "fixed", float(threshold)
        kept = count_at(scores, global_thr)
        selections["all"] = Selection(global_thr, kept, len(scores), target_total, False)
        selections["calibrated"] = select_threshold(scores, target_total)
        class_thresholds = dict.fromkeys(category_ids, global_thr)
    elif per_class:
        mode, global_thr = "per-class", None
        for c in category_ids:
            s = select_threshold(scores[cats == c], target_per_class[c])
            selections[str(c)] = s
            class_thresholds[c] = s.threshold
    else:
        mode = "global"
        s = select_threshold(scores, target_total)
        selections["all"] = s
        global_thr = s.threshold
        class_thresholds = dict.fromkeys(category_ids, global_thr)

    present, inverse = np.unique(cats, return_inverse=True)
    per_entry = np.array([class_thresholds.get(int(c), math.inf) for c in present], dtype=np.float64)
    keep = scores >= per_entry[inverse] if len(scores) else np.zeros(0, dtype=bool)
    kept_per_class = {c: int((keep & (cats == c)).sum()) for c in category_ids}

    kp_thresholds, kp_selections = _keypoint_thresholds(
        [p for p, k in zip(pool, keep, strict=True) if k], labeled, keypoint_threshold
    )
    calibration = Calibration(
        mode=mode,
        num_unlabeled_images=num_images,
        labeled_instances_per_image=labeled.instances_per_image,
        min_agreement=min_agreement,
        threshold=global_thr,
        class_thresholds=class_thresholds,
        selections=selections,
        keypoint_thresholds=kp_thresholds,
        keypoint_selections=kp_selections,
        kept_instances=int(keep.sum()),
        kept_per_image=float(keep.sum()) / num_images,
        kept_per_class=kept_per_class,
        target_per_class=target_per_class,
        curve=score_curve(scores, cats, num_images, category_ids),
    )
    calibration.warnings = health_warnings(calibration, len(on_images) - len(pool))
    return calibration


def _keypoint_thresholds(
    kept: Sequence[dict[str, Any]], labeled: CocoStats, fixed: float | None
) -> tuple[dict[int, float], dict[str, Selection]]:
    thresholds: dict[int, float] = {}
    selections: dict[str, Selection] = {}
    for c, visible_mean in labeled.visible_keypoints_per_instance.items():
        instances = [p for p in kept if p["category_id"] == c and p.get("keypoints")]
        kp_scores = np.array([v for p in instances for v in p["keypoints"][2::3]], dtype=np.float64)
        target = visible_mean * len(instances)
        if fixed is not None:
            s = Selection(float(fixed), count_at(kp_scores, fixed), len(kp_scores), target, False)
        else:
            s = select_threshold(kp_scores, target)
        thresholds[c] = s.threshold
        selections[str(c)] = s
    return thresholds, selections


def score_curve(
    scores: np.ndarray, cats: np.ndarray, num_images: int, category_ids: Sequence[int]
) -> dict[str, Any]:
    """Mean kept instances per image as a function of the threshold, overall and per class.

    Thresholds span ``[0, 1]`` evenly (``CURVE_POINTS`` points) plus ``max(scores)`` when above 1.
    """
    top = max(1.0, float(scores.max())) if len(scores) else 1.0
    grid = np.linspace(0.0, top, CURVE_POINTS)

    def per_image(values: np.ndarray) -> list[float]:
        ordered = np.sort(values)
        kept = len(ordered) - np.searchsorted(ordered, grid, side="left")
        return [round(float(v) / num_images, 6) for v in kept]

    return {
        "thresholds": [round(float(t), 6) for t in grid],
        "all": per_image(scores),
        "per_class": {str(c): per_image(scores[cats == c]) for c in category_ids},
    }


def health_warnings(cal: Calibration, dropped_by_agreement: int) -> list[str]:
    """Problems a user must see: no or almost no pseudo-instances, a threshold at the score floor."""
    out: list[str] = []
    target = cal.labeled_instances_per_image
    if cal.kept_instances == 0:
        out.append(
            "no pseudo-instances survive: every unlabeled image becomes a negative. The teacher found "
            "nothing usable (check it on labeled data), or the threshold / --min-agreement is too strict"
        )
    elif cal.kept_per_image < 0.1 * target:
        out.append(
            f"almost no pseudo-instances: {cal.kept_per_image:.3f} per unlabeled image against "
            f"{target:.3f} per labeled image"
        )
    for name, s in cal.selections.items():
        if name == "calibrated":
            continue
        if s.at_floor and s.target > 0:
            where = "overall" if name == "all" else f"category {name}"
            out.append(
                f"{where}: the threshold fell to the score floor ({_fmt(s.threshold)}): the teacher gave "
                f"only {s.available} detections for a target of {s.target:.0f}, so the pseudo-labels "
                "include its least confident ones. Lower the model's score threshold, add views, or "
                "accept fewer instances with --threshold"
            )
    if dropped_by_agreement and cal.min_agreement is not None:
        out.append(
            f"--min-agreement {cal.min_agreement} removed {dropped_by_agreement} detections before "
            "calibration"
        )
    return out


def _fmt(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.4f}"
