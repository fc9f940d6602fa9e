"""Output-level ("any-model") fusion: several COCO results lists of the same images -> one fused list.

For a detector that only gives final outputs, or for views computed elsewhere, every results list (a file of
``distill predict``, of another framework, of a view the user ran by hand) is one *view* (view id = its
position, ``T`` = the number of lists, empty lists included). The instances of all views are clustered by IoU
and each cluster becomes one fused instance:

clusters
    all instances of all views go through :func:`~distill.tta.boxes.fuse_boxes` with the pair (image_id,
    category_id) as class label, so instances of different images or categories never merge (one call per
    chunk of whole images of about ``_CHUNK`` instances: the same result as one call, but it keeps
    torchvision's ``batched_nms`` on its fast path). An instance belongs to the fused instance
    ``members[i]`` says (see :class:`~distill.tta.boxes.FusedBoxes`): ``nms``/``vote``: a suppressed box
    joins, among the kept boxes of its class scoring at least as high, the one it overlaps most (the box
    that suppressed it is among them, so that IoU is ``> iou_thresh``; it is not necessarily the
    suppressor); ``soft-nms``: a box decayed to ``<= 0.001`` joins the kept box among its decayers that it
    overlaps most, every other box is its own cluster; ``wbf``: its WBF cluster. Dropped instances
    (soft-NMS scores ``<= 0.001``, clusters cut by ``max_detections``) fuse into nothing.
boxes and scores (what ``--fusion`` selects; the same meaning as ``distill predict --fusion``)
    ``vote`` (the default): NMS, then the kept box is replaced by the score-weighted mean of the same-class
    boxes with IoU ``>= vote_iou_thresh`` (0.8) with it; the score is the kept (highest) score. Detectron's
    box voting: score-weighted boxes, as the spec asks, with single-model-like scores.
    ``wbf``: the score-weighted mean box of the cluster, score = mean member score x ``min(n, T) / T``;
    the only method whose box is averaged over exactly the cluster that keypoints and masks use.
    ``nms``: the kept (highest-scoring) box and score, not averaged. ``soft-nms``: the kept box, its decayed
    score.
keypoints (fused when at least one member carries ``keypoints``; members without them do not count)
    result keypoints are ``[x, y, c] * K`` with ``c`` a per-keypoint score (pycocotools' OKS ignores it).
    For keypoint ``j``, with ``s_i`` the member's score: ``(x, y)`` is the mean over the members with
    ``c_ij > 0`` weighted by ``s_i * c_ij``; when that weight sums to 0 (no member has ``c_ij > 0``) it is the
    ``s_i``-weighted mean over all members (plain mean if all ``s_i`` are 0), so members that store absent
    keypoints as ``0, 0, 0`` give ``0, 0, 0`` and a keypoint that only one member has comes from that member.
    The fused ``c`` is the ``s_i``-weighted mean of all members' ``c_ij`` (a keypoint half the weight misses
    gets about half the confidence). All members of a category must have the same number of keypoints.
masks (fused when at least one member carries an RLE ``segmentation``; COCO results masks are RLE)
    a pixel is in the fused mask when the members containing it hold at least half of the members' total
    score (``2 * sum_in >= sum``; equal weights when all scores are 0): the score-weighted average of the
    binary masks thresholded ``>= 0.5``, as ``distill predict`` binarises soft masks. Two members of equal
    score give their union, unequal scores the higher one's mask; a one-member mask is copied as is. All
    masks of one image must have the same RLE size.
agreement
    every fused instance carries ``"agreement"``: the fraction of the ``T`` views with a detection of the
    same image and category at IoU ``>= agreement_iou`` (0.5) with the fused box
    (:func:`~distill.tta.boxes.agreement`).

An instance without ``bbox`` is clustered with the box of its mask (pycocotools' ``toBbox``) or of its
keypoints with ``c > 0`` (all of them when none). A fused entry carries ``bbox`` / ``keypoints`` /
``segmentation`` when at least one of its members does, plus ``image_id``, ``category_id``, ``score`` and
``agreement`` (other keys are not carried over); entries are sorted by image id, then by descending score, at
most ``max_detections`` per image. Scores must be in [0, 1]. Coordinates are not rounded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.coco import encode_mask, load_results, rle_for_pycocotools, validate_results
from distill.errors import CocoFormatError
from distill.io import write_json_atomic
from distill.tta.boxes import FUSION_METHODS, agreement, fuse_boxes

__all__ = ["FuseSummary", "fuse_result_files", "fuse_results"]

_CHUNK = 1000  # instances per fuse_boxes call (whole images)


@dataclass(frozen=True)
class FuseSummary:
    """What :func:`fuse_result_files` did."""

    inputs: int  # results files
    input_detections: int
    images: int  # images with at least one fused detection
    detections: int  # fused detections written
    out: Path


def fuse_results(
    runs: Sequence[list[dict[str, Any]]],
    *,
    method: str = "vote",
    iou_thresh: float = 0.5,
    vote_iou_thresh: float = 0.8,
    agreement_iou: float = 0.5,
    max_detections: int | None = 100,
    sources: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Fuse COCO results lists (one per view or model) into one list; see the module docstring.

    ``sources`` names the lists in error messages (default ``run 0``, ``run 1``, ...). Every list is validated
    with :func:`~distill.data.coco.validate_results`; invalid input raises
    :class:`~distill.errors.CocoFormatError` / :class:`~distill.errors.InputError` naming the list, bad
    options ``ValueError``. ``max_detections`` is per image (``None``: no limit).
    """
    names = _names(runs, sources)
    for run, name in zip(runs, names, strict=True):
        validate_results(run, name)
    return _fuse(
        runs,
        names,
        method=method,
        iou_thresh=iou_thresh,
        vote_iou_thresh=vote_iou_thresh,
        agreement_iou=agreement_iou,
        max_detections=max_detections,
    )


def fuse_result_files(
    paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **options: Any
) -> FuseSummary:
    """Load and validate the results files ``paths``, fuse them (``options`` as for :func:`fuse_results`) and
    write the fused list to ``out`` atomically. Errors name the offending file."""
    names = [str(p) for p in paths]
    runs = [load_results(p) for p in paths]
    fused = _fuse(runs, names, **options)
    target = write_json_atomic(out, fused)
    return FuseSummary(
        inputs=len(runs),
        input_detections=sum(len(r) for r in runs),
        images=len({e["image_id"] for e in fused}),
        detections=len(fused),
        out=target,
    )


# --------------------------------------------------------------------------------------------- internals


def _names(runs: Sequence[list[dict[str, Any]]], sources: Sequence[str] | None) -> list[str]:
    if sources is None:
        return [f"run {k}" for k in range(len(runs))]
    if len(sources) != len(runs):
        raise ValueError(f"got {len(sources)} sources for {len(runs)} results lists")
    return [str(s) for s in sources]


def _check_options(method: str, iou_thresh: float, vote_iou_thresh: float, agreement_iou: float) -> None:
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")
    for name, value in (
        ("iou_thresh", iou_thresh),
        ("vote_iou_thresh", vote_iou_thresh),
        ("agreement_iou", agreement_iou),
    ):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass
class _Flat:
    """All instances of all runs, concatenated."""

    entries: list[dict[str, Any]]
    run: np.ndarray  # [N] run (view) index
    image: np.ndarray  # [N] image id
    category: np.ndarray  # [N] category id
    score: np.ndarray  # [N] float64
    boxes: np.ndarray  # [N, 4] XYXY float64 (derived for entries without bbox)
    has_bbox: np.ndarray  # [N] bool


def _flatten(runs: Sequence[list[dict[str, Any]]], names: list[str]) -> _Flat:
    """Concatenate the runs; check scores, keypoint lengths per category and mask sizes per image."""
    entries: list[dict[str, Any]] = []
    run_ids: list[int] = []
    kp_length: dict[int, tuple[int, str]] = {}
    mask_size: dict[int, tuple[list[int], str]] = {}
    for r, (run, name) in enumerate(zip(runs, names, strict=True)):
        for index, entry in enumerate(run):
            score = entry["score"]
            if not 0.0 <= score <= 1.0:
                raise CocoFormatError(
                    name,
                    f"[{index}].score",
                    f"expected a score in [0, 1], got {score!r}",
                    "fusion weights by score",
                )
            if "keypoints" in entry:
                length, first = kp_length.setdefault(entry["category_id"], (len(entry["keypoints"]), name))
                if len(entry["keypoints"]) != length:
                    raise CocoFormatError(
                        name,
                        f"[{index}].keypoints",
                        f"{len(entry['keypoints']) // 3} keypoints, but category {entry['category_id']} "
                        f"has {length // 3} in {first}",
                        "fused results must use the same keypoint definition",
                    )
            if "segmentation" in entry:
                size, first = mask_size.setdefault(entry["image_id"], (entry["segmentation"]["size"], name))
                if entry["segmentation"]["size"] != size:
                    raise CocoFormatError(
                        name,
                        f"[{index}].segmentation.size",
                        f"mask size {entry['segmentation']['size']} for image {entry['image_id']}, "
                        f"but {size} in {first}",
                        "every mask of one image must have the image's [height, width]",
                    )
            entries.append(entry)
            run_ids.append(r)
    n = len(entries)
    boxes = np.full((n, 4), np.nan)
    has_bbox = np.fromiter(("bbox" in e for e in entries), dtype=bool, count=n)
    if has_bbox.any():
        xywh = np.array([e["bbox"] for e in entries if "bbox" in e], dtype=np.float64).reshape(-1, 4)
        boxes[has_bbox] = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    for i in np.flatnonzero(~has_bbox).tolist():
        boxes[i] = _derived_box(entries[i])
    bad = ~np.isfinite(boxes).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        name, index = names[run_ids[i]], i - sum(len(runs[k]) for k in range(run_ids[i]))
        raise CocoFormatError(name, f"[{index}].bbox", "x + width or y + height overflows")
    return _Flat(
        entries=entries,
        run=np.asarray(run_ids, dtype=np.int64),
        image=np.fromiter((e["image_id"] for e in entries), dtype=np.int64, count=n),
        category=np.fromiter((e["category_id"] for e in entries), dtype=np.int64, count=n),
        score=np.fromiter((e["score"] for e in entries), dtype=np.float64, count=n),
        boxes=boxes,
        has_bbox=has_bbox,
    )


def _derived_box(entry: dict[str, Any]) -> list[float]:
    """XYXY box of an entry without ``bbox``: its mask's bounding box, else its keypoints' (c > 0 if any)."""
    if "segmentation" in entry:
        from pycocotools import mask as mask_utils

        x, y, w, h = mask_utils.toBbox(rle_for_pycocotools(entry["segmentation"])).tolist()
        return [x, y, x + w, y + h]
    kp = np.asarray(entry["keypoints"], dtype=np.float64).reshape(-1, 3)
    if (kp[:, 2] > 0).any():
        kp = kp[kp[:, 2] > 0]
    return [kp[:, 0].min(), kp[:, 1].min(), kp[:, 0].max(), kp[:, 1].max()]


def _fuse(
    runs: Sequence[list[dict[str, Any]]],
    names: list[str],
    *,
    method: str = "vote",
    iou_thresh: float = 0.5,
    vote_iou_thresh: float = 0.8,
    agreement_iou: float = 0.5,
    max_detections: int | None = 100,
) -> list[dict[str, Any]]:
    _check_options(method, iou_thresh, vote_iou_thresh, agreement_iou)
    if not runs:
        raise ValueError("need at least one results list")
    if max_detections is not None and max_detections < 0:
        raise ValueError(f"max_detections must be >= 0 or None, got {max_detections}")
    flat = _flatten(runs, names)
    if not flat.entries:
        return []
    num_views = len(runs)

    # one class per (image, category), so that images and categories never mix
    pairs, inverse = np.unique(np.stack([flat.image, flat.category], 1), axis=0, return_inverse=True)
    fused = _fuse_boxes_by_chunks(
        flat,
        torch.from_numpy(inverse.reshape(-1).astype(np.int64)),
        pairs[:, 0],
        method=method,
        iou_thresh=iou_thresh,
        vote_iou_thresh=vote_iou_thresh,
        agreement_iou=agreement_iou,
        num_views=num_views,
    )

    # sort by image (stable: scores stay descending within an image), keep max_detections per image
    image_of = torch.from_numpy(pairs[:, 0])[fused.labels]
    agree = fused.agreement
    order = torch.sort(image_of, stable=True).indices
    if max_detections is not None and len(order):
        _, counts = torch.unique_consecutive(image_of[order], return_counts=True)
        start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        order = order[torch.arange(len(order)) - start < max_detections]
    m = int(order.shape[0])
    position = torch.full((len(fused) + 1,), -1, dtype=torch.int64)
    position[order] = torch.arange(m)
    members = position[torch.where(fused.members >= 0, fused.members, len(fused))].numpy()

    keypoints = _fuse_keypoints(flat, members, m)
    masks = _fuse_masks(flat, members, m)
    has_bbox = np.bincount(members[flat.has_bbox & (members >= 0)], minlength=m) > 0
    out_boxes = fused.boxes[order].tolist()
    out_pairs = pairs[fused.labels[order].numpy()].tolist()
    out_scores = fused.scores[order].tolist()
    out_agree = agree[order].tolist()
    results: list[dict[str, Any]] = []
    for k in range(m):
        entry: dict[str, Any] = {"image_id": out_pairs[k][0], "category_id": out_pairs[k][1]}
        if has_bbox[k]:
            x1, y1, x2, y2 = out_boxes[k]
            entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        entry["score"] = out_scores[k]
        if k in keypoints:
            entry["keypoints"] = keypoints[k]
        if k in masks:
            entry["segmentation"] = masks[k]
        entry["agreement"] = out_agree[k]
        results.append(entry)
    return results


@dataclass
class _Fused:
    """:class:`~distill.tta.boxes.FusedBoxes` of all chunks together (scores descending within an image)."""

    boxes: torch.Tensor  # [M, 4] XYXY float64
    scores: torch.Tensor  # [M]
    labels: torch.Tensor  # [M] (image, category) pair index
    members: torch.Tensor  # [N] index into the M fused instances, or -1
    agreement: torch.Tensor  # [M]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _fuse_boxes_by_chunks(
    flat: _Flat,
    labels: torch.Tensor,
    pair_image: np.ndarray,
    *,
    agreement_iou: float,
    num_views: int,
    **options,
) -> _Fused:
    """:func:`fuse_boxes` and :func:`agreement` over chunks of whole images of about ``_CHUNK`` instances.

    The result equals one call on everything (labels never mix images), but one call per chunk keeps
    :func:`torchvision.ops.batched_nms` on its fast path (it loops over the classes above 1000 boxes on CPU).
    """
    boxes, scores, views = (
        torch.from_numpy(flat.boxes),
        torch.from_numpy(flat.score),
        torch.from_numpy(flat.run),
    )
    order = torch.sort(labels, stable=True).indices  # pairs are sorted by image: so are the instances
    per_image = np.unique(pair_image[labels[order].numpy()], return_counts=True)[1]
    first = np.cumsum(per_image) - per_image
    cuts = first[np.flatnonzero(np.diff(first // _CHUNK)) + 1].tolist()
    parts: list[tuple[torch.Tensor, ...]] = []
    members = torch.full((len(flat.entries),), -1, dtype=torch.int64)
    offset = 0
    for idx in torch.tensor_split(order, cuts):
        b, s, lab, v = boxes[idx], scores[idx], labels[idx], views[idx]
        fused = fuse_boxes(b, s, lab, num_views=num_views, view_ids=v, **options)
        agree = agreement(fused, b, lab, v, num_views, iou_thresh=agreement_iou)
        parts.append((fused.boxes, fused.scores, fused.labels, agree))
        members[idx] = torch.where(fused.members >= 0, fused.members + offset, -1)
        offset += len(fused)
    out_boxes, out_scores, out_labels, out_agree = (torch.cat(column) for column in zip(*parts, strict=True))
    return _Fused(out_boxes, out_scores, out_labels, members, out_agree)


def _fuse_keypoints(flat: _Flat, members: np.ndarray, m: int) -> dict[int, list[float]]:
    """The fused keypoints of every fused instance with a member carrying keypoints (see the module doc)."""
    has = np.fromiter(("keypoints" in e for e in flat.entries), dtype=bool, count=len(flat.entries))
    idx = np.flatnonzero(has & (members >= 0))
    lengths = np.fromiter((len(flat.entries[i]["keypoints"]) for i in idx), dtype=np.int64, count=len(idx))
    out: dict[int, list[float]] = {}
    for length in np.unique(lengths).tolist():  # one length per category, so per cluster
        sel = idx[lengths == length]
        kp = torch.tensor([flat.entries[i]["keypoints"] for i in sel], dtype=torch.float64).view(
            len(sel), -1, 3
        )
        target = torch.from_numpy(members[sel])
        s = torch.from_numpy(flat.score[sel])
        xy, c = kp[..., :2], kp[..., 2]
        w = torch.where(c > 0, s[:, None] * c, 0.0)  # [n, K]
        total = functools.partial(_sum_into, target, m)
        w_sum, s_sum = total(w), total(s)  # [m, K], [m]
        count = total(torch.ones_like(s))
        by_c = total(w[..., None] * xy) / w_sum.clamp_min(1e-300)[..., None]
        by_s = total(s[:, None, None] * xy) / s_sum.clamp_min(1e-300)[:, None, None]
        plain = total(xy) / count.clamp_min(1)[:, None, None]
        fallback = torch.where((s_sum > 0)[:, None, None], by_s, plain)
        coords = torch.where((w_sum > 0)[..., None], by_c, fallback)
        conf = torch.where(
            (s_sum > 0)[:, None],
            total(s[:, None] * c) / s_sum.clamp_min(1e-300)[:, None],
            total(c) / count.clamp_min(1)[:, None],
        )
        fused = torch.cat([coords, conf[..., None]], 2).view(m, -1)
        for k in torch.unique(target).tolist():
            out[k] = fused[k].tolist()
    return out


def _sum_into(target: torch.Tensor, m: int, values: torch.Tensor) -> torch.Tensor:
    """``out[k] = sum of values[i] with target[i] == k``, ``k < m``."""
    return torch.zeros((m, *values.shape[1:]), dtype=values.dtype).index_add_(0, target, values)


def _fuse_masks(flat: _Flat, members: np.ndarray, m: int) -> dict[int, dict[str, Any]]:
    """Fused RLE mask of every fused instance with a member carrying one: score-weighted vote, ``>= 1/2``."""
    from pycocotools import mask as mask_utils

    has = np.fromiter(("segmentation" in e for e in flat.entries), dtype=bool, count=len(flat.entries))
    idx = np.flatnonzero(has & (members >= 0))
    if len(idx) == 0:
        return {}
    idx = idx[np.argsort(members[idx], kind="stable")]
    cuts = np.flatnonzero(np.diff(members[idx])) + 1
    out: dict[int, dict[str, Any]] = {}
    for group in np.split(idx, cuts):
        k = int(members[group[0]])
        if len(group) == 1:
            out[k] = dict(flat.entries[group[0]]["segmentation"])
            continue
        masks = mask_utils.decode(
            [rle_for_pycocotools(flat.entries[i]["segmentation"]) for i in group]
        )  # [H, W, n] uint8
        weight = flat.score[group]
        if not weight.sum() > 0:
            weight = np.ones_like(weight)
        out[k] = encode_mask(2.0 * masks.dot(weight) >= weight.sum())
    return out
