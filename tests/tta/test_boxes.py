"""TTA box fusion: ensemble-boxes is the oracle for NMS, soft-NMS and WBF; hand cases for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from distill.tta import boxes as fusion
from distill.tta.boxes import FUSION_METHODS, FusedBoxes, agreement, fuse_boxes

ensemble_boxes = pytest.importorskip("ensemble_boxes")
from ensemble_boxes.ensemble_boxes_nms import cpu_soft_nms_float  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COCO = SHARED_DATA / "mmpose_fixtures" / "coco"
TOL = 1e-5  # relative to the image size
UNIT = (1.0, 1.0)  # ensemble-boxes works in normalised coordinates


# --------------------------------------------------------------------------------------------- data


def make_views(seed: int, *, num_views: int, num_classes: int, num_objects: int, size=(640.0, 480.0)):
    """Clustered TTA-like detections: every view sees most objects with jitter, plus a few false positives."""
    rng = np.random.default_rng(seed)
    width, height = size
    wh = rng.uniform(12, 160, (num_objects, 2))
    centre = rng.uniform([0, 0], [width, height], (num_objects, 2))
    cls = rng.integers(0, num_classes, num_objects)
    base = rng.uniform(0.05, 1.0, num_objects)
    boxes, scores, labels, views = [], [], [], []
    for v in range(num_views):
        seen = rng.random(num_objects) < 0.85
        jitter = rng.normal(0, 0.06, (num_objects, 4)) * np.concatenate([wh, wh], 1)
        b = np.concatenate([centre - wh / 2, centre + wh / 2], 1) + jitter
        fp = rng.integers(0, 3)
        fp_xy = rng.uniform([0, 0], [width, height], (fp, 2))
        fp_boxes = np.concatenate([fp_xy, fp_xy + rng.uniform(8, 80, (fp, 2))], 1)
        b = np.concatenate([b[seen], fp_boxes])
        boxes.append(b)
        scores.append(
            np.concatenate([base[seen] * rng.uniform(0.5, 1.0, seen.sum()), rng.uniform(0, 0.3, fp)])
        )
        labels.append(np.concatenate([cls[seen], rng.integers(0, num_classes, fp)]))
        views.append(np.full(len(b), v))
    boxes = np.concatenate(boxes)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    ok = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)  # ensemble-boxes drops flat boxes
    return (
        torch.from_numpy(boxes[ok]),
        torch.from_numpy(np.concatenate(scores)[ok]),
        torch.from_numpy(np.concatenate(labels)[ok]),
        torch.from_numpy(np.concatenate(views)[ok]),
        size,
    )


def real_views(num_views_cycle=(3, 4, 5, 6)):
    """The 118 real person detections of 4 COCO images, split into fake views with jittered copies."""
    if not (COCO / "test_coco_det_AP_H_56.json").exists():
        pytest.skip(f"{COCO} is absent (real-data fixtures live in ../shared/data)")
    dets = json.loads((COCO / "test_coco_det_AP_H_56.json").read_text())
    sizes = {
        im["id"]: (float(im["width"]), float(im["height"]))
        for im in json.loads((COCO / "test_coco.json").read_text())["images"]
    }
    cases = []
    for k, image_id in enumerate(sorted({d["image_id"] for d in dets})):
        width, height = sizes[image_id]
        mine = [d for d in dets if d["image_id"] == image_id]
        num_views = num_views_cycle[k % len(num_views_cycle)]
        boxes, scores, views = [], [], []
        for i, d in enumerate(mine):
            x, y, w, h = d["bbox"]
            for copy in range(2):  # the detection in view i % V and a jittered copy in the next view
                t = 0.03 * copy
                dx, dy = t * w * np.sin(1.7 * i + 0.3), t * h * np.cos(2.3 * i + 0.1)
                box = [x + dx, y + dy, x + w + dx * 0.5, y + h - dy * 0.5]
                boxes.append(box)
                scores.append(d["score"] * (1.0 - 0.05 * copy * (1 + np.sin(i))))
                views.append((i + copy) % num_views)
        b = np.array(boxes)
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
        order = np.argsort(views, kind="stable")  # views concatenated, like ensemble-boxes' lists
        cases.append(
            (
                torch.from_numpy(b[order]),
                torch.from_numpy(np.array(scores)[order]),
                torch.zeros(len(order), dtype=torch.int64),
                torch.from_numpy(np.array(views)[order]),
                (width, height),
                num_views,
            )
        )
    return cases


def per_view(boxes, scores, labels, views, num_views, size):
    """ensemble-boxes' inputs: one list per view, coordinates normalised by the image size."""
    scale = np.array([size[0], size[1], size[0], size[1]])
    b, s, lab, v = boxes.numpy(), scores.numpy(), labels.numpy(), views.numpy()
    return (
        [b[v == k] / scale for k in range(num_views)],
        [s[v == k] for k in range(num_views)],
        [lab[v == k] for k in range(num_views)],
    )


def canonical(boxes, scores, labels, size) -> np.ndarray:
    """Rows (label, score, box / size) sorted, to compare two unordered sets of detections."""
    scale = np.array([size[0], size[1], size[0], size[1]])
    rows = np.concatenate(
        [np.asarray(labels, float)[:, None], np.asarray(scores, float)[:, None], np.asarray(boxes) / scale], 1
    )
    return rows[np.lexsort(rows.T[::-1])]


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape, f"{len(ours)} fused boxes vs ensemble-boxes' {len(theirs)}"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def oracle_soft_nms(boxes, scores, labels, views, num_views, size, *, iou, sigma, thresh, method):
    """ensemble-boxes' own soft-NMS loop per class, also returning its decayed scores."""
    b, s, lab = per_view(boxes, scores, labels, views, num_views, size)
    b, s, lab = np.concatenate(b), np.concatenate(s), np.concatenate(lab)
    order = np.concatenate([np.nonzero(views.numpy() == k)[0] for k in range(num_views)])
    out = []
    for label in np.unique(lab):
        where = np.nonzero(lab == label)[0]
        decayed = s[where].copy()
        keep = cpu_soft_nms_float(b[where].copy(), decayed, Nt=iou, sigma=sigma, thresh=thresh, method=method)
        out += list(zip(order[where[keep]].tolist(), decayed[decayed > thresh].tolist(), strict=True))
    return sorted(out)


def check_consistency(fused: FusedBoxes, boxes, scores, labels) -> None:
    m = len(fused)
    assert fused.boxes.shape == (m, 4) and fused.scores.shape == (m,) and fused.labels.shape == (m,)
    assert fused.source.shape == (m,) and fused.members.shape == (boxes.shape[0],)
    assert fused.labels.dtype == fused.source.dtype == fused.members.dtype == torch.int64
    assert torch.all(fused.scores <= 1) and torch.all(fused.scores >= 0)
    assert torch.all(fused.scores[:-1] >= fused.scores[1:]), "sorted by descending score"
    assert torch.all((fused.members >= -1) & (fused.members < m))
    assert torch.equal(fused.members[fused.source], torch.arange(m)), "a representative is its own member"
    assert torch.equal(fused.labels, labels[fused.source])
    merged = fused.members >= 0
    assert torch.equal(labels[merged], fused.labels[fused.members[merged]]), "members share the class"
    # the representative is the highest-scoring member
    best = torch.full((m,), -1.0, dtype=scores.dtype).scatter_reduce(
        0, fused.members[merged], scores[merged], "amax"
    )
    assert torch.equal(best, scores[fused.source])


# --------------------------------------------------------------------------------------------- oracle


SEEDS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(params=["dense", "sweep"])
def pair_path(request, monkeypatch):
    """Run with the dense pair finder, or force the band sweep with tiny chunks on the same small inputs."""
    if request.param == "sweep":
        monkeypatch.setattr(fusion, "_DENSE_MAX", 0)
        monkeypatch.setattr(fusion, "_PAIR_CHUNK", 97)
    return request.param


@pytest.mark.parametrize("seed", SEEDS)
def test_nms_matches_ensemble_boxes(seed, pair_path):
    boxes, scores, labels, views, size = make_views(
        seed, num_views=4 + seed % 3, num_classes=3, num_objects=12
    )
    num_views = int(views.max()) + 1
    theirs = ensemble_boxes.nms(*per_view(boxes, scores, labels, views, num_views, size), iou_thr=0.5)
    fused = fuse_boxes(boxes, scores, labels, method="nms", iou_thresh=0.5)
    assert_same(canonical(fused.boxes, fused.scores, fused.labels, size), canonical(*theirs, UNIT))
    check_consistency(fused, boxes, scores, labels)
    # every box is merged into a kept box of its class with IoU > thresh (or is one)
    iou = box_iou(boxes, fused.boxes)[torch.arange(len(boxes)), fused.members]
    assert torch.all(fused.members >= 0)
    assert torch.all((iou > 0.5) | (torch.arange(len(boxes))[:, None] == fused.source[None]).any(1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("soft_method", ["gaussian", "linear"])
def test_soft_nms_matches_ensemble_boxes(seed, soft_method, pair_path):
    boxes, scores, labels, views, size = make_views(
        seed, num_views=3 + seed % 4, num_classes=3, num_objects=10
    )
    num_views = int(views.max()) + 1
    method = 2 if soft_method == "gaussian" else 1
    sigma, iou = (0.5, 0.5) if seed % 2 else (0.3, 0.4)
    theirs = ensemble_boxes.soft_nms(
        *per_view(boxes, scores, labels, views, num_views, size),
        method=method,
        iou_thr=iou,
        sigma=sigma,
        thresh=0.001,
    )
    fused = fuse_boxes(
        boxes, scores, labels, method="soft-nms", iou_thresh=iou, soft_sigma=sigma, soft_method=soft_method
    )
    # ensemble-boxes reports the undecayed input scores of the kept boxes
    assert_same(canonical(fused.boxes, scores[fused.source], fused.labels, size), canonical(*theirs, UNIT))
    # and its own loop gives the decayed scores we report
    expected = oracle_soft_nms(
        boxes, scores, labels, views, num_views, size, iou=iou, sigma=sigma, thresh=0.001, method=method
    )
    ours = sorted(zip(fused.source.tolist(), fused.scores.tolist(), strict=True))
    assert [k for k, _ in ours] == [k for k, _ in expected]
    np.testing.assert_allclose([v for _, v in ours], [v for _, v in expected], rtol=1e-9, atol=0)
    check_consistency(fused, boxes, scores, labels)
    assert torch.equal(fused.members >= 0, scores > 0.001), "boxes decayed away join a kept box"


@pytest.mark.parametrize("seed", SEEDS)
def test_wbf_matches_ensemble_boxes(seed, pair_path):
    boxes, scores, labels, views, size = make_views(
        seed, num_views=3 + seed % 4, num_classes=3, num_objects=14
    )
    num_views = int(views.max()) + 1 + seed % 2  # sometimes a view without any detection
    iou, skip = (0.55, 0.0) if seed % 3 else (0.4, 0.1)
    theirs = ensemble_boxes.weighted_boxes_fusion(
        *per_view(boxes, scores, labels, views, num_views, size), iou_thr=iou, skip_box_thr=skip
    )
    fused = fuse_boxes(
        boxes,
        scores,
        labels,
        method="wbf",
        iou_thresh=iou,
        score_thresh=skip,
        num_views=num_views,
        view_ids=views,
    )
    assert_same(canonical(fused.boxes, fused.scores, fused.labels, size), canonical(*theirs, UNIT))
    check_consistency(fused, boxes, scores, labels)
    # the fused boxes are the score-weighted means of their members, scores the rescaled mean
    merged = fused.members >= 0
    assert torch.equal(merged, scores >= skip)
    m = len(fused)
    idx, s = fused.members[merged], scores[merged]
    num = torch.zeros(m, 4, dtype=torch.float64).index_add_(0, idx, boxes[merged] * s[:, None])
    den = torch.zeros(m, dtype=torch.float64).index_add_(0, idx, s)
    count = torch.bincount(idx, minlength=m).double()
    torch.testing.assert_close(fused.boxes, num / den[:, None])
    torch.testing.assert_close(fused.scores, den / count * count.clamp(max=num_views) / num_views)


@pytest.mark.parametrize("rounds", [0, 1])
def test_wbf_sequential_safety_net_is_exact(rounds, monkeypatch):
    monkeypatch.setattr(fusion, "_WBF_MAX_ROUNDS", rounds)
    boxes, scores, labels, views, size = make_views(7, num_views=5, num_classes=2, num_objects=12)
    theirs = ensemble_boxes.weighted_boxes_fusion(
        *per_view(boxes, scores, labels, views, 5, size), iou_thr=0.55
    )
    fused = fuse_boxes(boxes, scores, labels, method="wbf", iou_thresh=0.55, num_views=5)
    assert_same(canonical(fused.boxes, fused.scores, fused.labels, size), canonical(*theirs, UNIT))


def test_larger_input_uses_the_sweep_and_matches():
    boxes, scores, labels, views, size = make_views(
        11, num_views=18, num_classes=4, num_objects=30, size=(1333, 800)
    )
    assert boxes.shape[0] ** 2 > fusion._DENSE_MAX
    lists = per_view(boxes, scores, labels, views, 18, size)
    fused = fuse_boxes(boxes, scores, labels, method="wbf", iou_thresh=0.55, num_views=18)
    assert_same(
        canonical(fused.boxes, fused.scores, fused.labels, size),
        canonical(*ensemble_boxes.weighted_boxes_fusion(*lists, iou_thr=0.55), UNIT),
    )
    fused = fuse_boxes(boxes, scores, labels, method="soft-nms")
    assert_same(
        canonical(fused.boxes, scores[fused.source], fused.labels, size),
        canonical(*ensemble_boxes.soft_nms(*lists, iou_thr=0.5, sigma=0.5, thresh=0.001), UNIT),
    )
    fused = fuse_boxes(boxes, scores, labels, method="nms")
    assert_same(
        canonical(fused.boxes, fused.scores, fused.labels, size),
        canonical(*ensemble_boxes.nms(*lists, iou_thr=0.5), UNIT),
    )


def test_real_detections_match_ensemble_boxes():
    for boxes, scores, labels, views, size, num_views in real_views():
        lists = per_view(boxes, scores, labels, views, num_views, size)
        fused = fuse_boxes(boxes, scores, labels, method="nms", iou_thresh=0.5)
        assert_same(
            canonical(fused.boxes, fused.scores, fused.labels, size),
            canonical(*ensemble_boxes.nms(*lists, iou_thr=0.5), UNIT),
        )
        fused = fuse_boxes(boxes, scores, labels, method="soft-nms", iou_thresh=0.5, soft_sigma=0.5)
        assert_same(
            canonical(fused.boxes, scores[fused.source], fused.labels, size),
            canonical(*ensemble_boxes.soft_nms(*lists, iou_thr=0.5, sigma=0.5, thresh=0.001), UNIT),
        )
        expected = oracle_soft_nms(
            boxes, scores, labels, views, num_views, size, iou=0.5, sigma=0.5, thresh=0.001, method=2
        )
        ours = sorted(zip(fused.source.tolist(), fused.scores.tolist(), strict=True))
        assert [k for k, _ in ours] == [k for k, _ in expected]
        np.testing.assert_allclose([v for _, v in ours], [v for _, v in expected], rtol=1e-9, atol=0)
        fused = fuse_boxes(boxes, scores, labels, method="wbf", iou_thresh=0.55, num_views=num_views)
        assert_same(
            canonical(fused.boxes, fused.scores, fused.labels, size),
            canonical(*ensemble_boxes.weighted_boxes_fusion(*lists, iou_thr=0.55), UNIT),
        )
        check_consistency(fused, boxes, scores, labels)


def soft_nms_tie_case(reverse: bool, monkeypatch) -> bool:
    """A and C tie exactly after B decays both (dyadic coordinates); ensemble-boxes' swaps pick the first.

    Checks ours against ensemble-boxes' loop and returns whether A kept the higher score.
    """
    a, b, c = [0, 0, 0.25, 0.25], [0.0625, 0, 0.3125, 0.25], [0.125, 0, 0.375, 0.25]
    far = [[0.5, 0.5, 0.625, 0.625], [0.75, 0.75, 0.875, 0.875]]  # more ties, without overlap
    boxes = torch.tensor([a, b, c, *far], dtype=torch.float64)
    scores = torch.tensor([0.8, 0.9, 0.8, 0.8, 0.8], dtype=torch.float64)
    labels = torch.zeros(5, dtype=torch.int64)
    if reverse:
        boxes, scores = boxes.flip(0), scores.flip(0)
    calls = []
    exact = fusion._soft_nms_exact
    monkeypatch.setattr(fusion, "_soft_nms_exact", lambda *args, **kw: calls.append(1) or exact(*args, **kw))
    fused = fuse_boxes(boxes, scores, labels, method="soft-nms")
    assert calls, "the tie sends the class to the exact sequential path"
    expected = oracle_soft_nms(
        boxes,
        scores,
        labels,
        torch.zeros(5, dtype=torch.int64),
        1,
        UNIT,
        iou=0.5,
        sigma=0.5,
        thresh=0.001,
        method=2,
    )
    ours = sorted(zip(fused.source.tolist(), fused.scores.tolist(), strict=True))
    assert [k for k, _ in ours] == [k for k, _ in expected]
    np.testing.assert_allclose([v for _, v in ours], [v for _, v in expected], rtol=1e-12, atol=0)
    score_of = dict(ours)
    index_a, index_c = (4, 2) if reverse else (0, 2)
    assert score_of[index_a] != score_of[index_c]
    return score_of[index_a] > score_of[index_c]


def test_soft_nms_ties_follow_ensemble_boxes(monkeypatch):
    # the tie matters: which of A and C keeps the higher score depends on the input order
    assert soft_nms_tie_case(False, monkeypatch) != soft_nms_tie_case(True, monkeypatch)


# --------------------------------------------------------------------------------------------- hand cases


def test_box_voting_is_the_score_weighted_mean():
    b1, b2 = [0.0, 0.0, 10.0, 10.0], [0.5, 0.5, 10.5, 10.5]  # IoU = 90.25 / 109.75 = 0.822 >= 0.8
    b3 = [2.0, 0.0, 12.0, 10.0]  # IoU with b1 = 80 / 120: suppressed by NMS, but does not vote
    other = [0.0, 0.0, 10.0, 10.0]  # another class at the same place: neither suppressed nor voting
    boxes = torch.tensor([b2, b1, b3, other], dtype=torch.float64)
    scores = torch.tensor([0.3, 0.9, 0.5, 0.6], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    fused = fuse_boxes(boxes, scores, labels, method="vote", iou_thresh=0.5, vote_iou_thresh=0.8)
    expected = (
        0.9 * torch.tensor(b1, dtype=torch.float64) + 0.3 * torch.tensor(b2, dtype=torch.float64)
    ) / 1.2
    assert fused.labels.tolist() == [0, 1]
    torch.testing.assert_close(fused.boxes[0], expected)
    torch.testing.assert_close(fused.boxes[1], torch.tensor(other, dtype=torch.float64))
    assert fused.scores.tolist() == [0.9, 0.6], "voting keeps the kept box's score"
    assert fused.source.tolist() == [1, 3]
    assert fused.members.tolist() == [0, 0, 0, 1]


def test_agreement_counts_views():
    boxes = torch.tensor(
        [
            [10, 10, 50, 50],  # view 0: the object
            [11, 10, 51, 50],  # view 1: the object again
            [200, 200, 240, 240],  # view 2: elsewhere
            [10, 10, 50, 50],  # view 2: same place, other class
            [12, 11, 50, 49],  # view 1: a duplicate in the same view counts once
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 0])
    views = torch.tensor([0, 1, 2, 2, 1])
    fused = fuse_boxes(boxes, scores, labels, method="nms")
    assert fused.source.tolist() == [0, 2, 3]
    agree = agreement(fused, boxes, labels, views, 3)
    torch.testing.assert_close(agree, torch.tensor([2 / 3, 1 / 3, 1 / 3]))
    assert agree.dtype == torch.float32
    torch.testing.assert_close(
        agreement(fused, boxes, labels, views, 3, iou_thresh=1.0), torch.tensor([1 / 3] * 3)
    )


@pytest.mark.parametrize("n", [40, 400])
def test_agreement_of_an_identity_fusion_is_one(n):
    """One view, fused boxes = its detections (a one-view engine): full agreement, flat boxes included."""
    generator = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=generator) * 150
    boxes = torch.cat([xy, (xy + torch.rand(n, 2, generator=generator) * 60).clamp(max=150)], 1)
    boxes[:3, 2] = boxes[:3, 0]  # zero width: IoU with itself is 0/0
    labels = torch.randint(0, 3, (n,), generator=generator)
    index = torch.arange(n)
    fused = FusedBoxes(boxes, torch.rand(n, generator=generator), labels, index, index)
    agree = agreement(fused, boxes, labels, torch.zeros(n, dtype=torch.int64), 1)
    assert torch.all(agree == 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_pairs_finds_exactly_the_overlapping_pairs(seed, monkeypatch):
    """The band sweep (with tiny chunks) against brute force, within a set and between two sets."""
    monkeypatch.setattr(fusion, "_PAIR_CHUNK", 53)
    generator = torch.Generator().manual_seed(seed)

    def random_boxes(n):
        xy = (torch.rand(n, 2, generator=generator) * 100).round()  # integer corners: many touching edges
        wh = (torch.rand(n, 2, generator=generator) ** 3 * 60).round()  # some flat, a few tall
        return torch.cat([xy, xy + wh], 1), torch.randint(0, 3, (n,), generator=generator)

    a, la = random_boxes(300)
    b, lb = random_boxes(200)

    def brute(x, lx, y, ly):
        lo, hi = torch.maximum(x[:, None, :2], y[None, :, :2]), torch.minimum(x[:, None, 2:], y[None, :, 2:])
        return (hi > lo).all(2) & (lx[:, None] == ly[None, :])

    for dense_max in (fusion._DENSE_MAX, 0):
        monkeypatch.setattr(fusion, "_DENSE_MAX", dense_max)
        i, j, iou = fusion._overlap_pairs(a, la, b, lb, with_iou=True)
        found = torch.zeros(300, 200, dtype=torch.bool)
        found[i, j] = True
        assert len(i) == int(found.sum()) and torch.equal(found, brute(a, la, b, lb))
        torch.testing.assert_close(iou, box_iou(a, b)[i, j])
        i, j, _ = fusion._overlap_pairs(a, la)
        found = torch.zeros(300, 300, dtype=torch.bool)
        found[i, j] = True
        found[j, i] = True
        assert len(i) * 2 == int(found.sum()) and bool((i != j).all())
        assert torch.equal(found, brute(a, la, a, la).fill_diagonal_(False))


# --------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_empty_input(method):
    for dtype in (torch.float32, torch.float64):
        fused = fuse_boxes(
            torch.zeros(0, 4, dtype=dtype),
            torch.zeros(0, dtype=dtype),
            torch.zeros(0, dtype=torch.int64),
            method=method,
            num_views=3,
        )
        assert fused.boxes.shape == (0, 4) and fused.boxes.dtype == dtype
        assert fused.scores.shape == (0,) and fused.scores.dtype == dtype
        for field in (fused.labels, fused.source, fused.members):
            assert field.shape == (0,) and field.dtype == torch.int64
        assert agreement(
            fused, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3
        ).shape == (0,)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_invalid_boxes_raise_with_their_index(method):
    good = torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2], [3, 3, 4, 4]], dtype=torch.float32)
    scores, labels = torch.full((4,), 0.5), torch.zeros(4, dtype=torch.int64)
    for index, bad in [
        (1, [20, 5, 5, 20]),
        (2, [1, 2, 2, 1]),
        (3, [0, 0, float("nan"), 1]),
        (0, [0, 0, float("inf"), 1]),
    ]:
        boxes = good.clone()
        boxes[index] = torch.tensor(bad)
        with pytest.raises(ValueError, match=rf"boxes\[{index}\]"):
            fuse_boxes(boxes, scores, labels, method=method, num_views=2)
    for bad_score in (1.5, -0.1, float("nan")):
        s = scores.clone()
        s[2] = bad_score
        with pytest.raises(ValueError, match=r"scores\[2\]"):
            fuse_boxes(good, s, labels, method=method, num_views=2)


def test_bad_options_raise():
    boxes, scores, labels = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.5]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"nms.*vote.*soft-nms.*wbf"):
        fuse_boxes(boxes, scores, labels, method="mean")
    with pytest.raises(ValueError, match="num_views"):
        fuse_boxes(boxes, scores, labels, method="wbf")
    with pytest.raises(ValueError, match="soft_method"):
        fuse_boxes(boxes, scores, labels, method="soft-nms", soft_method="cubic")
    with pytest.raises(ValueError, match="view_ids"):
        fuse_boxes(boxes, scores, labels, method="wbf", num_views=2, view_ids=torch.tensor([2]))
    with pytest.raises(ValueError, match="iou_thresh"):
        fuse_boxes(boxes, scores, labels, iou_thresh=1.5)
    # wbf infers the number of views from view_ids
    fused = fuse_boxes(boxes, scores, labels, method="wbf", view_ids=torch.tensor([3]))
    torch.testing.assert_close(fused.scores, torch.tensor([0.5 / 4]))


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_scores_never_exceed_one_and_dtype_is_kept(method):
    boxes, scores, labels, views, _ = make_views(3, num_views=6, num_classes=2, num_objects=8)
    scores = torch.where(scores > 0.4, torch.ones_like(scores), scores)  # many saturated (tied) scores
    fused = fuse_boxes(boxes.float(), scores.float(), labels, method=method, num_views=6, view_ids=views)
    assert fused.boxes.dtype == fused.scores.dtype == torch.float32
    assert torch.all(fused.scores <= 1)
    check_consistency(fused, boxes.float(), scores.float(), labels)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_max_detections_keeps_the_top_and_remaps_members(method):
    boxes, scores, labels, _, _ = make_views(5, num_views=4, num_classes=3, num_objects=10)
    full = fuse_boxes(boxes, scores, labels, method=method, num_views=4)
    top = fuse_boxes(boxes, scores, labels, method=method, num_views=4, max_detections=5)
    assert len(top) == 5 < len(full)
    torch.testing.assert_close(top.scores, full.scores[:5])
    assert torch.equal(top.source, full.source[:5])
    expected = torch.where(full.members < 5, full.members, -1)
    assert torch.equal(top.members, expected)


def test_zero_area_boxes_are_valid_and_never_merged():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10.5]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.zeros(4, dtype=torch.int64)
    for method in FUSION_METHODS:
        fused = fuse_boxes(boxes, scores, labels, method=method, num_views=2)
        assert fused.members[1] != fused.members[2] and fused.members[1] != fused.members[0]
        assert torch.isfinite(fused.boxes).all()


def test_float32_matches_float64():
    boxes, scores, labels, _, _ = make_views(9, num_views=6, num_classes=3, num_objects=15)
    for method in FUSION_METHODS:
        f64 = fuse_boxes(boxes, scores, labels, method=method, num_views=6)
        f32 = fuse_boxes(boxes.float(), scores.float(), labels, method=method, num_views=6)
        assert len(f32) == len(f64)
        torch.testing.assert_close(f32.boxes, f64.boxes.float(), atol=1e-3, rtol=0)
        torch.testing.assert_close(f32.scores, f64.scores.float(), atol=1e-5, rtol=0)
