"""Output-level fusion of COCO results: hand-computed cases, self-fusion, ensemble-boxes' WBF as oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from distill.data.coco import decode_segmentation, encode_mask, load_results
from distill.errors import CocoFormatError, InputError
from distill.tta import instances
from distill.tta.instances import fuse_result_files, fuse_results


def det(image_id: int, category_id: int, bbox: list[float], score: float, **fields) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score, **fields}


def square_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return mask


# --------------------------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("method", ["nms", "vote", "wbf"])
def test_identical_boxes_fuse_into_one_with_full_agreement(method):
    a = [det(1, 3, [10, 20, 30, 40], 0.8)]
    b = [det(1, 3, [10, 20, 30, 40], 0.8)]
    out = fuse_results([a, b], method=method)
    assert len(out) == 1
    assert out[0] == {
        "image_id": 1,
        "category_id": 3,
        "bbox": pytest.approx([10.0, 20.0, 30.0, 40.0], abs=1e-12),
        "score": pytest.approx(0.8),
        "agreement": 1.0,
    }


def test_soft_nms_keeps_the_decayed_twin():
    a, b = [det(1, 3, [10, 20, 30, 40], 0.8)], [det(1, 3, [10, 20, 30, 40], 0.8)]
    out = fuse_results([a, b], method="soft-nms")
    assert [e["score"] for e in out] == pytest.approx([0.8, 0.8 * np.exp(-1 / 0.5)])  # gaussian, sigma 0.5
    assert [e["agreement"] for e in out] == [1.0, 1.0]


# XYXY [0, 0, 100, 100] and [4, 2, 104, 102]: IoU = 96 * 98 / (20000 - 9408) = 0.888 >= 0.8 (they vote)
A, B = [0.0, 0.0, 100.0, 100.0], [4.0, 2.0, 100.0, 100.0]
WEIGHTED = [0.6 * 4 / 1.5, 0.6 * 2 / 1.5, 100.0, 100.0]  # (0.9 A + 0.6 B) / 1.5 as XYWH: [1.6, 0.8, 100, 100]


@pytest.mark.parametrize(
    ("method", "box", "score"),
    [
        ("vote", WEIGHTED, 0.9),  # Detectron's voting: weighted box, the kept score
        ("wbf", WEIGHTED, 0.75),  # mean score (0.9 + 0.6) / 2 * min(2, 2) / 2
        ("nms", A, 0.9),  # the kept box as is
    ],
)
def test_overlapping_boxes_score_weighted(method, box, score):
    out = fuse_results([[det(7, 1, A, 0.9)], [det(7, 1, B, 0.6)]], method=method)
    assert len(out) == 1
    assert out[0]["bbox"] == pytest.approx(box, abs=1e-12)
    assert out[0]["bbox"] == pytest.approx([1.6, 0.8, 100.0, 100.0] if box is WEIGHTED else A)
    assert out[0]["score"] == pytest.approx(score)
    assert out[0]["agreement"] == 1.0


def test_vote_threshold_limits_the_voters():
    # IoU of [0, 0, 100, 100] and [20, 0, 120, 100] = 80 / 120 = 0.667: clustered (> 0.5), no vote (< 0.8)
    out = fuse_results([[det(1, 1, A, 0.9)], [det(1, 1, [20, 0, 100, 100], 0.6)]], method="vote")
    assert len(out) == 1 and out[0]["bbox"] == A and out[0]["agreement"] == 1.0
    out = fuse_results(
        [[det(1, 1, A, 0.9)], [det(1, 1, [20, 0, 100, 100], 0.6)]], method="vote", vote_iou_thresh=0.6
    )
    assert out[0]["bbox"] == pytest.approx([8.0, 0.0, 100.0, 100.0])  # 0.6 * 20 / 1.5


def test_different_classes_never_merge():
    out = fuse_results([[det(1, 1, A, 0.9)], [det(1, 2, A, 0.6)]], method="wbf")
    assert [(e["category_id"], e["bbox"], e["agreement"]) for e in out] == [(1, A, 0.5), (2, A, 0.5)]
    assert [e["score"] for e in out] == pytest.approx([0.45, 0.3])  # one member out of 2 views


def test_non_overlapping_boxes_stay_apart():
    out = fuse_results([[det(1, 1, A, 0.9)], [det(1, 1, [200, 200, 50, 50], 0.6)]])
    assert [(e["bbox"], e["score"], e["agreement"]) for e in out] == [
        (A, 0.9, 0.5),
        ([200.0, 200.0, 50.0, 50.0], 0.6, 0.5),
    ]


def test_images_of_one_run_are_kept_and_output_is_sorted():
    a = [det(9, 1, A, 0.3), det(2, 1, A, 0.5)]
    b = [det(5, 1, A, 0.7), det(2, 1, A, 0.4), det(2, 1, [300, 300, 10, 10], 0.95)]
    out = fuse_results([a, b, []])
    assert [(e["image_id"], e["score"]) for e in out] == [(2, 0.95), (2, 0.5), (5, 0.7), (9, 0.3)]
    assert [e["agreement"] for e in out] == pytest.approx([1 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_max_detections_is_per_image():
    a = [det(1, 1, [100 * k, 0, 10, 10], 0.1 * (k + 1)) for k in range(5)] + [det(2, 1, A, 0.2)]
    out = fuse_results([a, []], max_detections=2)
    assert [(e["image_id"], e["score"]) for e in out] == [(1, 0.5), (1, 0.4), (2, 0.2)]
    assert len(fuse_results([a, []], max_detections=None)) == 6
    assert fuse_results([a, []], max_detections=0) == []


def test_empty_runs():
    assert fuse_results([[], []]) == []
    out = fuse_results([[det(1, 1, A, 0.9)], [], []])
    assert out == [
        {"image_id": 1, "category_id": 1, "bbox": A, "score": 0.9, "agreement": pytest.approx(1 / 3)}
    ]


def test_agreement_counts_views_not_detections():
    # two boxes of one view around the fused box count once; the other view has none
    a = [det(1, 1, A, 0.9), det(1, 1, [1, 1, 100, 100], 0.5)]
    out = fuse_results([a, []], method="nms", iou_thresh=0.99)
    assert [e["agreement"] for e in out] == [0.5, 0.5]


# --------------------------------------------------------------------------------------------- keypoints


def test_keypoints_weighted_by_score_and_keypoint_score():
    a = det(1, 1, A, 0.8, keypoints=[10, 20, 1.0, 30, 40, 0.5, 0, 0, 0, 0, 0, 0, 5, 5, 0])
    b = det(1, 1, A, 0.4, keypoints=[12, 22, 0.5, 34, 44, 0.5, 50, 60, 0.9, 0, 0, 0, 8, 8, -1])
    c = det(1, 1, A, 0.99)  # no keypoints: not a keypoint member
    out = fuse_results([[a], [b], [c]], method="nms")
    assert len(out) == 1 and out[0]["score"] == 0.99 and out[0]["agreement"] == 1.0
    expected = [
        # weights 0.8 * 1.0 and 0.4 * 0.5; c = (0.8 * 1.0 + 0.4 * 0.5) / 1.2
        (0.8 * 10 + 0.2 * 12) / 1.0, (0.8 * 20 + 0.2 * 22) / 1.0, 1.0 / 1.2,
        # weights 0.4 and 0.2
        (0.4 * 30 + 0.2 * 34) / 0.6, (0.4 * 40 + 0.2 * 44) / 0.6, 0.5,
        # only b has it: its coordinates; c = 0.4 * 0.9 / 1.2
        50, 60, 0.3,
        # nobody has it
        0, 0, 0,
        # nobody has c > 0: score-weighted coordinates, score-weighted c
        (0.8 * 5 + 0.4 * 8) / 1.2, (0.8 * 5 + 0.4 * 8) / 1.2, -0.4 / 1.2,
    ]  # fmt: skip
    assert out[0]["keypoints"] == pytest.approx(expected, abs=1e-12)
    assert out[0]["keypoints"][:6] == pytest.approx([10.4, 20.4, 5 / 6, 31 + 1 / 3, 41 + 1 / 3, 0.5])


def test_keypoints_only_results_cluster_on_their_keypoint_box():
    a = {"image_id": 1, "category_id": 1, "score": 0.5, "keypoints": [0, 0, 1, 10, 10, 1, 99, 99, 0]}
    b = {"image_id": 1, "category_id": 1, "score": 0.5, "keypoints": [1, 1, 1, 11, 11, 1, 0, 0, 0]}
    out = fuse_results([[a], [b]], method="wbf")
    assert len(out) == 1 and "bbox" not in out[0] and out[0]["agreement"] == 1.0
    assert out[0]["keypoints"] == pytest.approx([0.5, 0.5, 1, 10.5, 10.5, 1, 49.5, 49.5, 0])


def test_keypoint_lengths_must_match_per_category():
    a = [det(1, 1, A, 0.5, keypoints=[0, 0, 1])]
    b = [det(2, 1, A, 0.5, keypoints=[0, 0, 1, 1, 1, 1])]
    with pytest.raises(
        CocoFormatError, match=r"b\.json: \[0\]\.keypoints: 2 keypoints, but category 1 has 1"
    ):
        fuse_results([a, b], sources=["a.json", "b.json"])


# --------------------------------------------------------------------------------------------- masks

MASK_A = square_mask(10, 12, slice(0, 6), slice(0, 6))
MASK_B = square_mask(10, 12, slice(2, 8), slice(2, 8))
MASK_C = square_mask(10, 12, slice(4, 10), slice(0, 12))


def masked(mask: np.ndarray, score: float, *, list_counts: bool = False) -> dict:
    seg = encode_mask(mask)
    if list_counts:  # uncompressed RLE: column-major run lengths, starting with a run of zeros
        counts, value, run = [], False, 0
        for pixel in mask.flatten(order="F").tolist():
            if pixel != value:
                counts.append(run)
                value, run = pixel, 0
            run += 1
        seg = {"size": list(mask.shape), "counts": [*counts, run]}
    return det(4, 1, [0, 0, 12, 10], score, segmentation=seg)


def fused_mask(out: list[dict]) -> np.ndarray:
    assert len(out) == 1
    return decode_segmentation(out[0]["segmentation"], 10, 12)


def test_masks_equal_scores_give_the_union():
    out = fuse_results([[masked(MASK_A, 0.7)], [masked(MASK_B, 0.7, list_counts=True)]], method="nms")
    assert np.array_equal(fused_mask(out), MASK_A | MASK_B)  # each pixel holds half the weight: >= 1/2
    assert out[0]["segmentation"]["size"] == [10, 12] and isinstance(out[0]["segmentation"]["counts"], str)


def test_masks_unequal_scores_follow_the_heavier():
    out = fuse_results([[masked(MASK_A, 0.6)], [masked(MASK_B, 0.9)]])
    assert np.array_equal(fused_mask(out), MASK_B)


def test_masks_three_views_majority():
    out = fuse_results([[masked(MASK_A, 0.5)], [masked(MASK_B, 0.5)], [masked(MASK_C, 0.5)]], method="wbf")
    votes = MASK_A.astype(int) + MASK_B + MASK_C
    assert np.array_equal(fused_mask(out), votes >= 2)
    assert out[0]["agreement"] == 1.0
    # a fourth member without a mask neither votes nor counts in the weights
    out = fuse_results(
        [
            [masked(MASK_A, 0.5)],
            [masked(MASK_B, 0.5)],
            [masked(MASK_C, 0.5)],
            [det(4, 1, [0, 0, 12, 10], 1.0)],
        ]
    )
    assert np.array_equal(fused_mask(out), votes >= 2)


def test_single_mask_is_copied_and_masks_only_results_have_no_bbox():
    one = masked(MASK_B, 0.9)
    out = fuse_results([[one], []])
    assert out[0]["segmentation"] == one["segmentation"]
    a = {"image_id": 4, "category_id": 1, "score": 0.9, "segmentation": encode_mask(MASK_A)}
    b = {"image_id": 4, "category_id": 1, "score": 0.3, "segmentation": encode_mask(MASK_A)}
    out = fuse_results([[a], [b]], method="wbf")
    assert "bbox" not in out[0] and out[0]["agreement"] == 1.0 and out[0]["score"] == pytest.approx(0.6)
    assert np.array_equal(fused_mask(out), MASK_A)


def test_mask_sizes_must_match_per_image():
    a = [masked(MASK_A, 0.5)]
    b = [det(4, 1, A, 0.5, segmentation=encode_mask(np.zeros((12, 10), bool)))]
    with pytest.raises(CocoFormatError, match=r"run 1: \[0\]\.segmentation\.size: mask size \[12, 10\]"):
        fuse_results([a, b])


# --------------------------------------------------------------------------------------------- properties


def random_run(seed: int, *, images: int = 4, size: tuple[int, int] = (48, 64)) -> list[dict]:
    """Random detections with keypoints and masks, NMS'd per image and class (no two merge at IoU 0.5)."""
    rng = np.random.default_rng(seed)
    h, w = size
    run = []
    for image_id in range(images):
        n = int(rng.integers(0, 12))
        xy = rng.uniform(0, [w - 8, h - 8], (n, 2))
        wh = rng.uniform(4, 30, (n, 2))
        xyxy = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
        scores = rng.uniform(0.01, 1, n)
        cats = rng.integers(1, 3, n)
        keep = batched_nms(torch.from_numpy(xyxy), torch.from_numpy(scores), torch.from_numpy(cats), 0.5)
        for i in keep.tolist():
            x1, y1, x2, y2 = xyxy[i].tolist()
            kp = np.stack([rng.uniform(x1, x2, 3), rng.uniform(y1, y2, 3), rng.uniform(0, 1, 3)], 1)
            kp[rng.random(3) < 0.3] = 0
            mask = square_mask(h, w, slice(int(y1), int(y2) + 1), slice(int(x1), int(x2) + 1))
            entry = det(image_id, int(cats[i]), [x1, y1, x2 - x1, y2 - y1], float(scores[i]))
            entry["keypoints"] = kp.reshape(-1).tolist()
            entry["segmentation"] = encode_mask(mask)
            run.append(entry)
    return run


def canonical(results: list[dict]) -> list[tuple]:
    return sorted((e["image_id"], e["category_id"], -e["score"], *e["bbox"]) for e in results)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["nms", "vote", "wbf"])
def test_fusing_a_run_with_itself_gives_the_run(seed, method):
    run = random_run(seed)
    assert run
    out = fuse_results([run, run], method=method, max_detections=None)
    assert len(out) == len(run)
    np.testing.assert_allclose(canonical(out), canonical(run), rtol=0, atol=1e-9)
    assert all(e["agreement"] == 1.0 for e in out)
    key = {(e["image_id"], e["category_id"], round(e["score"], 12)): e for e in run}
    for e in out:
        original = key[(e["image_id"], e["category_id"], round(e["score"], 12))]
        assert e["keypoints"] == pytest.approx(original["keypoints"], rel=1e-12, abs=1e-12)
        assert e["segmentation"] == original["segmentation"]
    # a single list is its own fusion too
    single = fuse_results([run], method=method, max_detections=None)
    np.testing.assert_allclose(canonical(single), canonical(run), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["nms", "vote", "soft-nms", "wbf"])
def test_chunks_of_images_give_the_same_fusion(method, monkeypatch):
    runs = [random_run(seed, images=6) for seed in (10, 11, 12)]
    whole = fuse_results(runs, method=method)
    monkeypatch.setattr(instances, "_CHUNK", 5)  # about one image per fuse_boxes call
    assert fuse_results(runs, method=method) == whole
    assert len({e["image_id"] for e in whole}) == 6


def test_wbf_matches_ensemble_boxes():
    ensemble_boxes = pytest.importorskip("ensemble_boxes")
    rng = np.random.default_rng(0)
    width, height = 640.0, 480.0
    runs: list[list[dict]] = [[], [], []]
    for image_id in (3, 8, 11):
        centre = rng.uniform([60, 60], [width - 60, height - 60], (6, 2))
        wh = rng.uniform(20, 100, (6, 2))
        cls = rng.integers(1, 3, 6)
        for run in runs:
            seen = rng.random(6) < 0.8
            jitter = rng.normal(0, 3, (6, 4))
            for k in np.flatnonzero(seen).tolist():
                x1, y1 = centre[k] - wh[k] / 2 + jitter[k, :2]
                x2, y2 = centre[k] + wh[k] / 2 + jitter[k, 2:]
                score = float(rng.uniform(0.05, 1))
                run.append(det(image_id, int(cls[k]), [x1, y1, x2 - x1, y2 - y1], score))
    out = fuse_results(runs, method="wbf", iou_thresh=0.55, max_detections=None)
    scale = np.array([width, height, width, height])
    theirs = []
    for image_id in (3, 8, 11):
        per_run = [[e for e in run if e["image_id"] == image_id] for run in runs]
        fused = ensemble_boxes.weighted_boxes_fusion(
            [[np.add(e["bbox"], [0, 0, *e["bbox"][:2]]) / scale for e in r] for r in per_run],
            [[e["score"] for e in r] for r in per_run],
            [[e["category_id"] for e in r] for r in per_run],
            iou_thr=0.55,
        )
        for box, score, label in zip(*fused, strict=True):
            x1, y1, x2, y2 = (box * scale).tolist()
            theirs.append(det(image_id, int(label), [x1, y1, x2 - x1, y2 - y1], float(score)))
    assert len(out) == len(theirs) > 9
    np.testing.assert_allclose(canonical(out), canonical(theirs), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- files


def test_fuse_result_files_writes_a_loadable_file(tmp_path: Path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "sub" / "fused.json"
    a.write_text(json.dumps([det(1, 1, A, 0.9), det(2, 1, A, 0.2)]))
    b.write_text(json.dumps([det(1, 1, B, 0.6)]))
    summary = fuse_result_files([a, b], out, method="vote")
    assert (summary.inputs, summary.input_detections, summary.images, summary.detections) == (2, 3, 2, 2)
    assert summary.out == out
    fused = load_results(out)  # the extra "agreement" key validates
    assert fused[0]["bbox"] == pytest.approx([1.6, 0.8, 100.0, 100.0]) and fused[0]["agreement"] == 1.0
    assert fused[1] == det(2, 1, A, 0.2, agreement=0.5)


def test_bad_files_raise_input_errors_naming_the_file(tmp_path: Path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([det(1, 1, A, 0.9)]))
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match=r"missing\.json: file not found"):
        fuse_result_files([good, missing], tmp_path / "out.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([det(1, 1, A, 0.9), det(1, 1, [0, 0, -1, 3], 0.9)]))
    with pytest.raises(CocoFormatError, match=r"bad\.json: \[1\]\.bbox\[2\]: negative box width"):
        fuse_result_files([good, bad], tmp_path / "out.json")
    score = tmp_path / "score.json"
    score.write_text(json.dumps([det(1, 1, A, 1.5)]))
    with pytest.raises(CocoFormatError, match=r"score\.json: \[0\]\.score: expected a score in \[0, 1\]"):
        fuse_result_files([good, score], tmp_path / "out.json")
    polygon = tmp_path / "polygon.json"
    polygon.write_text(json.dumps([det(1, 1, A, 0.5, segmentation=[[0, 0, 5, 0, 5, 5]])]))
    with pytest.raises(CocoFormatError, match=r"polygon\.json: \[0\]\.segmentation: expected an RLE object"):
        fuse_result_files([good, polygon], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_bad_options():
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_results([[], []], method="mean")
    with pytest.raises(ValueError, match="iou_thresh must be in"):
        fuse_results([[], []], iou_thresh=0.0)
    with pytest.raises(ValueError, match="at least one"):
        fuse_results([])
    with pytest.raises(CocoFormatError, match=r"run 1: \[0\]\.score: missing required key"):
        fuse_results([[], [{"image_id": 1, "category_id": 1, "bbox": A}]])
