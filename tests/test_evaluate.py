"""Hand-checked COCOeval cases.

AP uses 101 recall points: precision 1 up to recall r gives AP = (floor(100 r) + 1) / 101.
"""

from __future__ import annotations

import numpy as np
import pytest

from distill.data.coco import CocoDataset, encode_mask
from distill.evaluate import evaluate, format_table


def _truth() -> CocoDataset:
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[10:50, 10:50] = 1
    return CocoDataset.from_dict(
        {
            "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
            "categories": [
                {"id": 1, "name": "box"},
                {
                    "id": 2,
                    "name": "pt",
                    "keypoints": ["a", "b"],
                    "skeleton": [[1, 2]],
                    "keypoint_sigmas": [0.1, 0.1],
                },
            ],
            "annotations": [
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [10, 10, 40, 40],
                    "area": 1600,
                    "iscrowd": 0,
                    "segmentation": encode_mask(mask),
                },
                {
                    "id": 2,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [60, 60, 30, 30],
                    "area": 900,
                    "iscrowd": 0,
                    "segmentation": [],
                },
                {
                    "id": 3,
                    "image_id": 1,
                    "category_id": 2,
                    "bbox": [5, 60, 40, 30],
                    "area": 1200,
                    "iscrowd": 0,
                    "keypoints": [10, 70, 2, 40, 80, 2],
                    "num_keypoints": 2,
                },
            ],
        }
    )


def test_one_of_two_boxes_found_gives_ap_of_half_recall() -> None:
    truth = _truth()
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}]
    metrics = evaluate(truth, results, iou_types=["bbox"])
    # class 1: recall 0.5 at precision 1 -> 51/101; class 2 has no detection -> AP 0; mean over both classes
    assert metrics["bbox"]["AP"] == pytest.approx((51 / 101 + 0.0) / 2)
    assert metrics["bbox"]["AR100"] == pytest.approx((0.5 + 0.0) / 2)


def test_false_positive_ranked_first_halves_precision() -> None:
    truth = CocoDataset.from_dict({**_truth().data, "annotations": _truth().annotations[:1]})
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.95},  # nothing there
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5},
    ]
    metrics = evaluate(truth, results, iou_types=["bbox"])
    # PR curve: (r=0, p=0), (r=1, p=0.5) -> interpolated precision 0.5 at every recall point
    assert metrics["bbox"]["AP"] == pytest.approx(0.5)


def test_perfect_keypoints_and_masks() -> None:
    truth = _truth()
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[10:50, 10:50] = 1
    results = [
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 40, 40],
            "score": 0.9,
            "segmentation": encode_mask(mask),
        },
        {
            "image_id": 1,
            "category_id": 2,
            "bbox": [5, 60, 40, 30],
            "score": 0.8,
            "keypoints": [10, 70, 1, 40, 80, 1],
        },
    ]
    metrics = evaluate(truth, results)
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0)
    # segm: class 1 finds one of its two masks (the gt without an outline is scored as its box polygon)
    assert metrics["segm"]["AP"] == pytest.approx((51 / 101 + 0.0) / 2)


def test_keypoints_off_by_one_sigma_lower_ap() -> None:
    truth = _truth()
    moved = [
        {
            "image_id": 1,
            "category_id": 2,
            "bbox": [5, 60, 40, 30],
            "score": 0.8,
            "keypoints": [10 + 12, 70, 1, 40 + 12, 80, 1],
        }
    ]
    ap = evaluate(truth, moved, iou_types=["keypoints"])["keypoints"]["AP"]
    # COCO OKS = exp(-d^2 / (2 s^2 (2 sigma)^2)) with d = 12 px, s^2 = gt area 1200, sigma 0.1
    oks = np.exp(-(12**2) / (2 * 1200 * (2 * 0.1) ** 2))
    expected = sum(oks >= t for t in np.linspace(0.5, 0.95, 10)) / 10
    assert ap == pytest.approx(expected)


def test_format_table_lists_columns() -> None:
    table = format_table(
        {
            "teacher": {"bbox": {"AP": 0.5, "AP50": 0.7, "AP75": 0.4}},
            "student": {"bbox": {"AP": 0.55, "AP50": 0.75, "AP75": 0.45}},
        }
    )
    assert "teacher" in table and "student" in table
    assert "50.0" in table and "55.0" in table


def test_a_model_that_detects_nothing_scores_zero_on_every_head(tmp_path, tiny_data, tiny_config) -> None:
    """Rounds compare teacher and student on a metric; a model that found nothing must still have one."""
    from distill.models.torchvision import TorchvisionDetector
    from distill.steps import evaluate_model

    blind = TorchvisionDetector(tiny_config.model_copy(update={"score_thresh": 1.0}))
    model_dir = blind.save(tmp_path / "blind")
    metrics = evaluate_model(model_dir, tiny_data / "test.json", tiny_data / "images")
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    assert metrics["keypoints"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AP"] == 0.0
