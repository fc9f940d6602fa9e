"""The calibration rule on hand-made score lists: exact counts, ties, per class, keypoints, empty input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data.coco import CocoStats
from distill.pseudo.calibrate import calibrate, select_threshold


def stats(per_category: dict[int, float], visible: dict[int, float] | None = None) -> CocoStats:
    total = sum(per_category.values())
    return CocoStats(
        num_images=10,
        num_instances=round(total * 10),
        instances_per_image=total,
        per_category=per_category,
        num_crowd=0,
        visible_keypoints_per_instance=visible or {},
    )


def det(image_id: int, score: float, category_id: int = 1, **extra) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [0, 0, 5, 5], "score": score, **extra}


def test_k_th_score_gives_the_exact_count() -> None:
    s = select_threshold([0.6, 0.9, 0.7, 0.8], 2)
    assert (s.threshold, s.kept, s.available, s.at_floor) == (0.8, 2, 4, False)


def test_ties_choose_the_closest_reachable_count_and_prefer_the_larger() -> None:
    scores = [0.9, 0.8, 0.8, 0.8, 0.5]  # reachable counts: 0, 1, 4, 5
    assert select_threshold(scores, 2).threshold == 0.9  # 1 is closer to 2 than 4
    s = select_threshold(scores, 2.5)  # 1 and 4 equally close: the larger count wins
    assert (s.threshold, s.kept) == (0.8, 4)
    assert select_threshold(scores, 3.0).kept == 4


def test_keeping_nothing_is_a_candidate() -> None:
    s = select_threshold([0.9], 0.4)
    assert math.isinf(s.threshold) and s.kept == 0
    assert select_threshold([0.9, 0.3], 0).kept == 0


def test_empty_input_and_a_target_beyond_the_detections() -> None:
    empty = select_threshold([], 3)
    assert math.isinf(empty.threshold) and empty.kept == 0 and empty.at_floor
    floor = select_threshold([0.4, 0.2], 5)
    assert (floor.threshold, floor.kept, floor.at_floor) == (0.2, 2, True)


def test_bad_target_is_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        select_threshold([0.5], -1)
    with pytest.raises(ValueError, match="finite"):
        select_threshold([float("nan")], 1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300, unique=True),
    st.integers(0, 300),
)
def test_distinct_scores_reach_any_count_exactly(scores: list[float], k: int) -> None:
    k = min(k, len(scores))
    s = select_threshold(scores, k)
    assert s.kept == k == int((np.array(scores) >= s.threshold).sum())


def test_global_calibration_matches_the_labeled_density_over_every_unlabeled_image() -> None:
    # labeled: 1.5 instances per image; 4 unlabeled images (image 4 has no detection) -> target 6
    predictions = [det(1, 0.9), det(1, 0.8), det(2, 0.7), det(2, 0.6), det(3, 0.5), det(3, 0.4), det(3, 0.3)]
    predictions.append(det(99, 0.99))  # not an unlabeled image: ignored
    cal = calibrate(predictions, labeled=stats({1: 1.0, 2: 0.5}), unlabeled_image_ids=[1, 2, 3, 4])
    assert cal.mode == "global"
    assert cal.threshold == 0.4
    assert cal.kept_instances == 6 and cal.kept_per_image == 1.5
    assert cal.kept_per_class == {1: 6, 2: 0}
    assert cal.warnings == []
    # the curve: at threshold 0 every pooled detection counts, per unlabeled image
    assert cal.curve["thresholds"][0] == 0.0 and cal.curve["all"][0] == 7 / 4
    assert cal.curve["per_class"]["2"][0] == 0.0


def test_per_class_calibration_matches_each_class_frequency() -> None:
    predictions = [det(1, s, 1) for s in (0.9, 0.8, 0.7, 0.6)] + [det(2, s, 2) for s in (0.3, 0.2, 0.1)]
    # 2 unlabeled images: class 1 target 2 x 1.0 = 2, class 2 target 2 x 1.0 = 2
    cal = calibrate(predictions, labeled=stats({1: 1.0, 2: 1.0}), unlabeled_image_ids=[1, 2], per_class=True)
    assert cal.threshold is None
    assert cal.class_thresholds == {1: 0.8, 2: 0.2}
    assert cal.kept_per_class == {1: 2, 2: 2}
    # global would have taken class 1's four and none of class 2
    glob = calibrate(predictions, labeled=stats({1: 1.0, 2: 1.0}), unlabeled_image_ids=[1, 2])
    assert glob.kept_per_class == {1: 4, 2: 0}


def test_min_agreement_drops_predictions_before_counting() -> None:
    predictions = [det(1, 0.9, agreement=0.2), det(1, 0.8, agreement=1.0), det(1, 0.7, agreement=0.5)]
    cal = calibrate(predictions, labeled=stats({1: 2.0}), unlabeled_image_ids=[1], min_agreement=0.5)
    assert cal.threshold == 0.7 and cal.kept_instances == 2
    assert any("removed 1 detections" in w for w in cal.warnings)


def test_fixed_threshold_reports_where_it_sits() -> None:
    predictions = [det(1, s) for s in (0.9, 0.8, 0.7, 0.6)]
    cal = calibrate(predictions, labeled=stats({1: 2.0}), unlabeled_image_ids=[1], threshold=0.65)
    assert cal.mode == "fixed" and cal.threshold == 0.65 and cal.kept_instances == 3
    assert cal.selections["calibrated"].threshold == 0.8  # what calibration would have chosen
    with pytest.raises(ValueError, match="exclude"):
        calibrate(
            predictions, labeled=stats({1: 2.0}), unlabeled_image_ids=[1], threshold=0.5, per_class=True
        )


def test_keypoint_threshold_matches_the_labeled_visible_mean() -> None:
    # labeled: 2 visible keypoints per instance; 2 kept instances with 3 keypoints each -> 4 keypoints kept
    kp_a = [1, 1, 5.0, 2, 2, 4.0, 3, 3, 1.0]
    kp_b = [1, 1, 3.0, 2, 2, 2.0, 3, 3, 0.5]
    predictions = [
        det(1, 0.9, 1, keypoints=kp_a),
        det(1, 0.8, 1, keypoints=kp_b),
        det(1, 0.1, 1, keypoints=kp_a),
    ]
    cal = calibrate(predictions, labeled=stats({1: 2.0}, {1: 2.0}), unlabeled_image_ids=[1])
    assert cal.kept_instances == 2
    assert cal.keypoint_thresholds == {1: 2.0}
    assert cal.keypoint_selections["1"].kept == 4


def test_health_warnings_name_the_problem() -> None:
    none = calibrate([], labeled=stats({1: 2.0}), unlabeled_image_ids=[1, 2])
    assert none.kept_instances == 0
    assert any("no pseudo-instances" in w for w in none.warnings)
    assert any("score floor" in w for w in none.warnings)
    few = calibrate([det(1, 0.9), det(1, 0.2)], labeled=stats({1: 3.0}), unlabeled_image_ids=[1, 2])
    assert few.threshold == 0.2 and few.selections["all"].at_floor
    assert any("only 2 detections for a target of 6" in w for w in few.warnings)
    with pytest.raises(ValueError, match="no unlabeled images"):
        calibrate([], labeled=stats({1: 1.0}), unlabeled_image_ids=[])
