"""Dashboard charts: score bins that match the calibration's detections, and PNGs for any input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from distill.data.coco import CocoStats
from distill.pseudo.calibrate import calibrate
from service.ui.plots import (
    agreement_histogram,
    class_counts,
    metrics_history,
    score_bins,
    score_histogram,
)

TAB_RED, TAB_BLUE, TAB_ORANGE = (214, 39, 40), (31, 119, 180), (255, 127, 14)


def stats(per_category: dict[int, float]) -> CocoStats:
    total = sum(per_category.values())
    return CocoStats(
        num_images=10,
        num_instances=round(total * 10),
        instances_per_image=total,
        per_category=per_category,
        num_crowd=0,
        visible_keypoints_per_instance={},
    )


def predictions(scores: np.ndarray, num_images: int, categories: tuple[int, ...] = (1,)) -> list[dict]:
    return [
        {
            "image_id": i % num_images,
            "category_id": categories[i % len(categories)],
            "bbox": [0, 0, 5, 5],
            "score": float(s),
            "agreement": (i % 3 + 1) / 3,
        }
        for i, s in enumerate(scores)
    ]


def report(preds: list[dict], num_images: int, per_category: dict[int, float], **options) -> dict:
    """The calibration as the dashboard reads it: pseudo.calibration.json."""
    cal = calibrate(
        preds, labeled=stats(per_category), unlabeled_image_ids=list(range(num_images)), **options
    )
    return json.loads(json.dumps(cal.to_dict()))


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def has_colour(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 6) -> bool:
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    return bool((np.abs(pixels - colour).max(axis=-1) <= tolerance).any())


def test_score_bins_match_a_histogram_of_the_detections() -> None:
    scores = np.random.default_rng(0).random(500)
    scores[:3] = [0.0, 1.0, 1.0]  # both ends: the first bin and the closed last bin
    preds = predictions(scores, num_images=40)
    edges, counts = score_bins(report(preds, 40, {1: 2.0}))
    assert len(edges) == len(counts) + 1 == 101
    assert edges[0] == 0.0 and edges[-1] == 1.0
    assert sum(counts) == 500
    assert counts == np.histogram(scores, bins=edges)[0].tolist()


def test_score_bins_count_what_the_calibration_saw() -> None:
    scores = np.random.default_rng(1).random(300) * 1.5  # scores above 1: the grid reaches the maximum
    preds = predictions(scores, num_images=7, categories=(1, 2))
    preds.append({**preds[0], "image_id": 99})  # not an unlabeled image: not counted
    cal = report(preds, 7, {1: 1.0, 2: 0.5}, per_class=True, min_agreement=0.5)
    seen = [p["score"] for p in preds[:300] if p["agreement"] >= 0.5]
    edges, counts = score_bins(cal)
    grid = np.linspace(0.0, max(seen), 101)  # the report's thresholds, before their rounding to 6 decimals
    assert edges == pytest.approx(grid.tolist(), abs=1e-6)
    assert sum(counts) == len(seen) == 200
    assert counts == np.histogram(seen, bins=grid)[0].tolist()


def test_score_bins_of_empty_reports() -> None:
    assert score_bins({}) == ([], [])
    assert score_bins({"curve": {"thresholds": [0.0, 1.0], "all": [0.0, 0.0]}}) == ([], [])
    edges, counts = score_bins(report([], 5, {1: 1.0}))
    assert len(edges) == 101 and sum(counts) == 0


@pytest.mark.parametrize(
    "calibration",
    [{}, {"curve": {}}, {"num_unlabeled_images": 3, "curve": {"thresholds": [0.0], "all": [1.0]}}],
    ids=["empty", "no-curve", "one-point"],
)
def test_score_histogram_of_degenerate_reports(calibration: dict) -> None:
    assert png(score_histogram(calibration)).size == (600, 350)


def test_score_histogram_marks_the_thresholds() -> None:
    scores = np.random.default_rng(2).random(200)
    global_mode = report(predictions(scores, 20), 20, {1: 3.0})
    assert global_mode["threshold"] is not None
    assert has_colour(png(score_histogram(global_mode)), TAB_RED)
    assert not has_colour(png(score_histogram({**global_mode, "threshold": None})), TAB_RED)
    per_class = report(predictions(scores, 20, (1, 2)), 20, {1: 3.0, 2: 1.0}, per_class=True)
    image = png(score_histogram(per_class, names={1: "cat", 2: "dog"}))
    assert image.size == (600, 350)
    assert has_colour(image, TAB_RED) and has_colour(image, TAB_BLUE)
    fixed = report(predictions(scores, 20), 20, {1: 3.0}, threshold=0.5)
    assert has_colour(png(score_histogram(fixed)), TAB_RED)


def test_score_histogram_with_nothing_kept() -> None:
    nothing = report(predictions(np.array([0.2, 0.3]), 5), 5, {1: 0.01})
    assert nothing["threshold"] is None  # keep nothing: +inf, written as null
    assert png(score_histogram(nothing)).size == (600, 350)


def test_class_counts_target_is_a_count_on_the_unlabeled_set() -> None:
    cal = report(predictions(np.random.default_rng(3).random(100), 10), 10, {1: 2.5})
    assert cal["target_per_class"] == {"1": 25.0}  # 2.5 per labeled image x 10 unlabeled images
    image = png(class_counts(cal, {1: "cat"}))
    assert image.size == (600, 350)
    assert has_colour(image, TAB_BLUE) and has_colour(image, TAB_ORANGE)  # target and kept bars


@pytest.mark.parametrize(
    "calibration",
    [
        {},
        {"target_per_class": {}, "kept_per_class": {}},
        {"target_per_class": {"1": 0.0}, "kept_per_class": {"1": 0}},
        {"kept_per_class": {"4": 3}},
        {"target_per_class": {str(c): float(c) for c in range(1, 81)}, "kept_per_class": {"1": 1}},
    ],
    ids=["empty", "no-classes", "all-zero", "kept-only", "80-classes"],
)
def test_class_counts_of_odd_reports(calibration: dict) -> None:
    assert png(class_counts(calibration, {})).size == (600, 350)


@pytest.mark.parametrize(
    "agreements",
    [[], [1.0], [0.0, 0.0], [float("nan"), 0.5, 2.0, -1.0], [1 / 3, 2 / 3, 1.0] * 50],
    ids=["empty", "one", "all-zero", "odd-values", "three-views"],
)
def test_agreement_histogram(agreements: list[float]) -> None:
    assert png(agreement_histogram(agreements)).size == (600, 350)


def test_agreement_histogram_draws_bars_only_with_data() -> None:
    assert has_colour(png(agreement_histogram([0.5, 1.0])), TAB_BLUE)
    assert not has_colour(png(agreement_histogram([])), TAB_BLUE)


@pytest.mark.parametrize(
    ("versions", "metrics"),
    [
        ([], []),
        ([], ["bbox/AP"]),
        ([("v1", {})], ["bbox/AP"]),
        ([("v1", {"bbox/AP": 0.3})], ["bbox/AP"]),
        ([("v1", {"bbox/AP": float("nan")}), ("v2", {"bbox/AP": 0.0})], ["bbox/AP", "keypoints/AP"]),
    ],
    ids=["nothing", "no-versions", "no-values", "one-point", "missing-values"],
)
def test_metrics_history_of_sparse_data(versions: list, metrics: list[str]) -> None:
    assert png(metrics_history(versions, metrics)).size == (600, 350)


def test_metrics_history_draws_one_line_per_metric() -> None:
    versions = [("v1", {"bbox/AP": 0.2}), ("v2", {"bbox/AP": 0.3, "keypoints/AP": 0.1}), ("v3", {})]
    image = png(metrics_history(versions, ["bbox/AP", "keypoints/AP"]))
    assert has_colour(image, TAB_RED) and has_colour(image, TAB_BLUE)
    assert not has_colour(png(metrics_history(versions, [])), TAB_RED)
