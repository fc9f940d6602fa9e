"""Box-level fusion of the union of the detections of several views of ONE image.

Every view's detections are first mapped back to the original image (XYXY absolute pixels, contiguous int64
labels, scores in [0, 1], see :mod:`distill.structures`); :func:`fuse_boxes` then merges their union:

``nms``
    class-wise NMS over the union (Detectron's ``TEST.BBOX_AUG`` with the ``UNION`` heuristics), via
    :func:`torchvision.ops.batched_nms`. Same results as ``ensemble_boxes.nms``.
``vote``
    NMS, then every kept box is replaced by the score-weighted mean of all boxes of its class whose IoU with
    it is ``>= vote_iou_thresh`` (Detectron's ``box_voting`` with ``scoring_method="ID"``: the score stays the
    kept box's). Unlike Detectron, IoU is computed on continuous coordinates (no ``+ 1``), like everywhere in
    distill.
``soft-nms``
    per-class soft-NMS (Bodla et al. 2017). Keeps the same boxes as ``ensemble_boxes.soft_nms`` and reports
    their *decayed* scores (``ensemble_boxes.soft_nms`` reports the undecayed input scores of the kept boxes;
    those are ``scores[fused.source]``).
``wbf``
    weighted boxes fusion (Solovyev et al. 2021), the same results as ``ensemble_boxes.weighted_boxes_fusion``
    with ``conf_type="avg"`` and equal weights, each view being one "model".

Differences from ensemble-boxes, on purpose: inputs are absolute pixels (not normalised to [0, 1]); boxes
that are not finite or have ``x2 < x1`` / ``y2 < y1`` raise ``ValueError`` instead of being clamped or
swapped; zero-area boxes are valid input (their IoU with anything is 0, so they are never merged), where
ensemble-boxes silently drops them. Exact score ties are broken as documented per method.

IoU everywhere is ``inter / (area_a + area_b - inter)`` on continuous coordinates, computed in the boxes'
dtype (float64 for the accumulations of ``vote`` and ``wbf``). Candidate pairs of overlapping boxes come
from a sort-and-sweep over (class, y band, x), linear in the number of overlapping pairs (no ``N × N``
matrix). Python loops, all over rounds, never over boxes on the normal path: soft-NMS and WBF are
inherently sequential and run as a few vectorised rounds whose results provably equal the sequential ones
(soft-NMS: one round per "wave" of local maxima; WBF: fixed-point rounds, see ``_soft_nms`` and ``_wbf``);
the sweep loops over memory chunks. Two exact safety nets do loop per box: soft-NMS for a class where two
overlapping boxes tie exactly (to reproduce ensemble-boxes' tie-breaking), and WBF after
``_WBF_MAX_ROUNDS`` rounds without convergence (not reached in our tests, crowded scenes included).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = [
    "FUSION_METHODS",
    "SOFT_NMS_DEFAULT_SCORE_THRESH",
    "SOFT_NMS_METHODS",
    "FusedBoxes",
    "agreement",
    "fuse_boxes",
]

FUSION_METHODS = ("nms", "vote", "soft-nms", "wbf")
SOFT_NMS_METHODS = ("gaussian", "linear")
SOFT_NMS_DEFAULT_SCORE_THRESH = 1e-3
"""The score threshold of ``soft-nms`` when ``score_thresh`` is left at 0 (ensemble-boxes' ``thresh``)."""

_DENSE_MAX = 1 << 14  # na * nb up to which overlapping pairs are found with a dense matrix
_PAIR_CHUNK = 1 << 21  # candidate pairs materialised at once by the sweep
_WBF_MAX_ROUNDS = 32  # fixed-point rounds of WBF before finishing sequentially
_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class FusedBoxes:
    """The fused detections of one image, sorted by descending score.

    ``source[m]`` is the input index of the representative (highest-scoring) member of fused box ``m``;
    ``members[i]`` is the fused box input box ``i`` was merged into, or -1 when it was dropped (score below
    ``score_thresh``, for soft-NMS an input score at or below its threshold, or its fused box cut by
    ``max_detections``).
    """

    boxes: Tensor  # [M, 4] XYXY, the input's dtype
    scores: Tensor  # [M] in [0, 1]
    labels: Tensor  # [M] int64
    source: Tensor  # [M] int64 index into the input
    members: Tensor  # [N] int64 index into the fused boxes, or -1

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def fuse_boxes(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    method: str = "nms",
    iou_thresh: float = 0.5,
    vote_iou_thresh: float = 0.8,
    soft_sigma: float = 0.5,
    soft_method: str = "gaussian",
    score_thresh: float = 0.0,
    num_views: int | None = None,
    view_ids: Tensor | None = None,
    max_detections: int | None = None,
) -> FusedBoxes:
    """Fuse the union ``boxes [N, 4]`` (XYXY pixels), ``scores [N]``, ``labels [N]`` of one image's views.

    - ``iou_thresh``: NMS suppresses a box whose IoU with a kept box of its class is ``> iou_thresh``; linear
      soft-NMS decays boxes with IoU ``> iou_thresh``; WBF adds a box to the cluster whose fused box has the
      highest IoU with it when that IoU is ``> iou_thresh`` (ties: the oldest cluster).
    - ``vote_iou_thresh`` (``vote`` only): boxes with IoU ``>=`` it with a kept box vote for it; in (0, 1].
    - ``soft_sigma``, ``soft_method`` (``soft-nms`` only): gaussian ``score *= exp(-iou² / sigma)`` or linear
      ``score *= 1 - iou`` where ``iou > iou_thresh``.
    - ``score_thresh``: ``nms``, ``vote``, ``wbf`` ignore input boxes with ``score < score_thresh``
      (ensemble-boxes' ``skip_box_thr``); ``soft-nms`` keeps boxes whose decayed score is ``> score_thresh``,
      and ``score_thresh=0`` means :data:`SOFT_NMS_DEFAULT_SCORE_THRESH` (0.001, ensemble-boxes' default).
    - ``num_views`` (``wbf``): the number of views T; a cluster's score is the mean score of its members times
      ``min(members, T) / T``. Defaults to ``view_ids.max() + 1``; ``wbf`` needs one of the two.
    - ``view_ids``: the view of every box (int64 in ``[0, num_views)``); only checked, except to infer T.
    - ``max_detections``: keep only the highest-scoring fused boxes.

    Members: ``nms``/``vote``: a suppressed box joins, among the kept boxes of its class scoring at least as
    high, the one with the highest IoU (the box that suppressed it is one, so that IoU is > ``iou_thresh``;
    ``vote`` keeps the NMS membership, whoever voted); ``soft-nms``: a box decayed away joins, among the kept
    boxes that decayed it and scored at least as high (its first decayer is one), the one with the highest
    IoU; ``wbf``: its cluster.

    Ties between equal scores: ``nms``/``vote`` follow :func:`torchvision.ops.batched_nms`; ``wbf`` visits
    equal scores from the last input index to the first (what ensemble-boxes' ``argsort()[::-1]`` does on
    small inputs; on large ones its order for ties is unspecified); ``soft-nms`` reproduces ensemble-boxes'
    tie-breaking exactly (input order, updated by its swaps).
    Raises ``ValueError`` for an unknown method, bad options, or a bad box/score (naming its index).
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {FUSION_METHODS}")
    _check_detections(boxes, scores, labels)
    _check_fraction("iou_thresh", iou_thresh, low_open=False)
    if method == "vote":
        _check_fraction("vote_iou_thresh", vote_iou_thresh, low_open=True)
    if method == "soft-nms":
        if soft_method not in SOFT_NMS_METHODS:
            raise ValueError(f"unknown soft_method {soft_method!r}; expected one of {SOFT_NMS_METHODS}")
        if not soft_sigma > 0:
            raise ValueError(f"soft_sigma must be > 0, got {soft_sigma}")
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if max_detections is not None and max_detections < 0:
        raise ValueError(f"max_detections must be >= 0 or None, got {max_detections}")
    n = int(boxes.shape[0])
    num_views = _check_views(view_ids, num_views, n, boxes.device, required=method == "wbf")

    labels = labels.to(torch.int64)
    work = boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    work_scores = scores.to(work.dtype)
    if n == 0:
        empty = _empty_index(boxes)
        return _finish(work[:0], work_scores[:0], labels, empty, empty, n, boxes, scores, max_detections)

    if method == "soft-nms":
        thresh = score_thresh if score_thresh > 0 else SOFT_NMS_DEFAULT_SCORE_THRESH
        out_boxes, out_scores, source, members = _soft_nms(
            work,
            work_scores,
            labels,
            iou_thresh=iou_thresh,
            sigma=soft_sigma,
            thresh=thresh,
            linear=soft_method == "linear",
        )
    else:
        idx = torch.arange(n, device=boxes.device)
        if score_thresh > 0:
            idx = (work_scores >= score_thresh).nonzero().squeeze(1)
        fb, fs, fl = work[idx], work_scores[idx], labels[idx]
        if method == "wbf":
            assert num_views is not None
            out_boxes, out_scores, src, mem = _wbf(fb, fs, fl, iou_thresh=iou_thresh, num_views=num_views)
        else:
            vote = vote_iou_thresh if method == "vote" else None
            out_boxes, out_scores, src, mem = _nms(fb, fs, fl, iou_thresh=iou_thresh, vote_thresh=vote)
        source = idx[src]
        members = torch.full((n,), -1, dtype=torch.int64, device=boxes.device)
        members[idx] = mem
    return _finish(out_boxes, out_scores, labels, source, members, n, boxes, scores, max_detections)


def unfused(
    boxes: Tensor, scores: Tensor, labels: Tensor, *, max_detections: int | None = None
) -> FusedBoxes:
    """Every input box as its own fused box, for detections that need no fusion (one view, already NMS'd by
    the detector): sorted by descending score (stable, so sorted input keeps its order), cut to
    ``max_detections``, with ``fuse_boxes``' ``source`` / ``members`` bookkeeping."""
    index = torch.arange(int(boxes.shape[0]), device=boxes.device)
    labels = labels.to(torch.int64)
    return _finish(boxes, scores, labels, index, index, len(index), boxes, scores, max_detections)


def agreement(
    fused: FusedBoxes,
    boxes: Tensor,
    labels: Tensor,
    view_ids: Tensor,
    num_views: int,
    *,
    iou_thresh: float = 0.5,
) -> Tensor:
    """``[M]``: the fraction of the ``num_views`` views with a box of the fused box's class and IoU >= thresh.

    ``boxes``, ``labels``, ``view_ids`` are the per-view detections (all views concatenated, mapped to the
    original image); ``iou_thresh`` must be in (0, 1]. A detection identical to the fused box counts even
    when the box has zero area (IoU 0/0), so a one-view "fusion" agrees fully with its view.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    n = int(boxes.shape[0])
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
    _check_fraction("iou_thresh", iou_thresh, low_open=True)
    if view_ids is None:
        raise ValueError("agreement needs view_ids")
    num_views = _check_views(view_ids, num_views, n, boxes.device, required=True)
    assert num_views is not None
    m = len(fused)
    dtype = fused.scores.dtype if fused.scores.is_floating_point() else torch.float32
    if m == 0 or n == 0:
        return torch.zeros((m,), dtype=dtype, device=fused.boxes.device)
    work = boxes.to(fused.boxes.dtype)
    labels = labels.to(torch.int64)
    i, j, iou = _overlap_pairs(fused.boxes, fused.labels, work, labels, with_iou=True)
    assert iou is not None
    i, j = _take(iou >= iou_thresh, i, j)
    area = (fused.boxes[:, 2] - fused.boxes[:, 0]) * (fused.boxes[:, 3] - fused.boxes[:, 1])
    flat = (area == 0).nonzero().squeeze(1)
    for start in range(0, int(flat.shape[0]), 1024):  # zero-area fused boxes (rare): exact copies count
        rows = flat[start : start + 1024]
        equal = (fused.boxes.index_select(0, rows)[:, None] == work[None]).all(2)
        equal &= fused.labels.index_select(0, rows)[:, None] == labels[None]
        r, c = equal.nonzero(as_tuple=True)
        i, j = torch.cat([i, rows.index_select(0, r)]), torch.cat([j, c])
    key = torch.unique(i * num_views + view_ids.to(torch.int64).index_select(0, j))
    count = torch.bincount(torch.div(key, num_views, rounding_mode="floor"), minlength=m)
    return count.to(dtype) / num_views


# --------------------------------------------------------------------------------------------- checks


def _check_detections(boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] XYXY, got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating tensor, got {boxes.dtype}")
    n = int(boxes.shape[0])
    if scores.shape != (n,) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating [{n}] tensor, got {scores.dtype} {tuple(scores.shape)}")
    if labels.shape != (n,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer [{n}] tensor, got {labels.dtype} {tuple(labels.shape)}")
    if not (scores.device == labels.device == boxes.device):
        raise ValueError("boxes, scores and labels must be on the same device")
    if n == 0:
        return
    bad_box = ~torch.isfinite(boxes).all(1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    bad_score = ~((scores >= 0) & (scores <= 1))  # NaN is bad too
    if bool((bad_box | bad_score).any()):
        if bool(bad_box.any()):
            k = int(bad_box.nonzero()[0, 0])
            raise ValueError(
                f"boxes[{k}] = {boxes[k].tolist()} is not a finite XYXY box with x2 >= x1 and y2 >= y1 "
                "(boxes are neither clamped nor swapped: fix the view's back-mapping)"
            )
        k = int(bad_score.nonzero()[0, 0])
        raise ValueError(f"scores[{k}] = {float(scores[k])} is not in [0, 1]")


def _check_fraction(name: str, value: float, *, low_open: bool) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1], got {value}")


def _check_views(
    view_ids: Tensor | None, num_views: int | None, n: int, device: torch.device, *, required: bool
) -> int | None:
    if num_views is not None and num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if view_ids is not None:
        if view_ids.shape != (n,) or view_ids.is_floating_point() or view_ids.dtype == torch.bool:
            raise ValueError(
                f"view_ids must be an integer [{n}] tensor, got {view_ids.dtype} {tuple(view_ids.shape)}"
            )
        if view_ids.device != device:
            raise ValueError("view_ids must be on the boxes' device")
        if n:
            low, high = int(view_ids.min()), int(view_ids.max())
            if low < 0 or (num_views is not None and high >= num_views):
                raise ValueError(f"view_ids must be in [0, num_views={num_views}), found {low}..{high}")
            if num_views is None:
                num_views = high + 1
    if required and num_views is None:
        raise ValueError("wbf needs num_views (or view_ids) to rescale the fused scores")
    return num_views


# --------------------------------------------------------------------------------------------- helpers


def _empty_index(like: Tensor) -> Tensor:
    return torch.zeros((0,), dtype=torch.int64, device=like.device)


def _finish(
    out_boxes: Tensor,
    out_scores: Tensor,
    labels: Tensor,
    source: Tensor,
    members: Tensor,
    n: int,
    boxes: Tensor,
    scores: Tensor,
    max_detections: int | None,
) -> FusedBoxes:
    """Sort by descending score (stable), cut to ``max_detections``, remap ``members``, restore dtypes."""
    order = torch.sort(out_scores, descending=True, stable=True).indices
    if max_detections is not None:
        order = order[:max_detections]
    m = int(out_scores.shape[0])
    remap = torch.full((m + 1,), -1, dtype=torch.int64, device=boxes.device)
    remap[order] = torch.arange(order.shape[0], device=boxes.device)
    members = remap[torch.where(members >= 0, members, m)]
    return FusedBoxes(
        boxes=out_boxes[order].to(boxes.dtype),
        scores=out_scores[order].to(scores.dtype),
        labels=labels[source[order]],
        source=source[order],
        members=members,
    )


def _pair_iou(a: Tensor, b: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """IoU of ``a[i]`` and ``b[j]`` row by row: ``inter / (area_a + area_b - inter)``."""
    ac = [a[:, k].index_select(0, i) for k in range(4)]
    bc = [b[:, k].index_select(0, j) for k in range(4)]
    return _iou_cols(ac, bc)


def _iou_cols(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """IoU of boxes given as coordinate columns ``[x1, y1, x2, y2]`` (same formula as ensemble-boxes)."""
    iw = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp_min_(0)
    ih = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp_min_(0)
    inter = iw.mul_(ih)
    area_a = (a[2] - a[0]).mul_(a[3] - a[1])
    area_b = (b[2] - b[0]).mul_(b[3] - b[1])
    return inter / area_a.add_(area_b).sub_(inter)


def _take(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """``[t[mask] for t in tensors]`` with one ``nonzero`` (index_select is much faster than masking)."""
    sel = mask.nonzero().squeeze(1)
    return [t.index_select(0, sel) for t in tensors]


def _argmax_rows(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """For each row in ``0..n-1``: the col of its largest value (ties: the smallest col), or -1."""
    if rows.numel() == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    best = torch.full((n,), -torch.inf, dtype=values.dtype, device=rows.device)
    best.scatter_reduce_(0, rows, values, "amax")
    rows, cols = _take(values == best.index_select(0, rows), rows, cols)
    first = torch.full((n,), _INT64_MAX, dtype=torch.int64, device=rows.device)
    first.scatter_reduce_(0, rows, cols, "amin")
    return torch.where(first == _INT64_MAX, -1, first)


def _overlap_pairs(
    a: Tensor, la: Tensor, b: Tensor | None = None, lb: Tensor | None = None, *, with_iou: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pairs ``(i, j)`` with ``la[i] == lb[j]`` whose boxes ``a[i]``, ``b[j]`` have a positive overlap.

    Returns ``i``, ``j`` and their IoU when ``with_iou``. Without ``b`` (pairs within ``a``), every unordered
    pair ``{i, j}``, ``i != j``, comes once.

    Small inputs use a dense matrix. Larger ones: every box is put in each horizontal band (of the median box
    height) it spans; within a (class, band) group, the pairs are those where one box's x1 lies in the other's
    ``[x1, x2]``, found with ``searchsorted`` over the boxes sorted by x1, then filtered exactly on the
    original coordinates (a pair sharing several bands is kept in the first one). The cost is linear in the
    number of (band-local) x-overlapping pairs, materialised at most ``_PAIR_CHUNK`` at a time.
    """
    same = b is None
    if b is None or lb is None:
        b, lb = a, la
    na, nb = int(a.shape[0]), int(b.shape[0])
    if na == 0 or nb == 0:
        empty = _empty_index(a)
        return empty, empty, (a.new_zeros((0,)) if with_iou else None)
    if na * nb <= _DENSE_MAX:
        lo = torch.maximum(a[:, None, :2], b[None, :, :2])
        hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
        mask = (hi > lo).all(2) & (la[:, None] == lb[None, :])
        if same:
            mask = mask.triu_(1)
        i, j = mask.nonzero(as_tuple=True)
        return i, j, (_pair_iou(a, b, i, j) if with_iou else None)

    device = a.device
    both = a if same else torch.cat([a, b])
    total = int(both.shape[0])
    cols = [both[:, k].contiguous() for k in range(4)]
    wide = both.double()
    groups = torch.unique(la if same else torch.cat([la, lb]), return_inverse=True)[1]
    ymin = wide[:, 1].min()
    yspan = float(wide[:, 3].max() - ymin)
    height = float((wide[:, 3] - wide[:, 1]).median())
    if not height > 0:
        height = yspan if yspan > 0 else 1.0
    while True:  # coarser bands while a few tall boxes would be copied into too many of them
        start = torch.floor((wide[:, 1] - ymin) / height)
        count = (torch.floor((wide[:, 3] - ymin) / height) - start).long() + 1
        copies = int(count.sum())
        if copies <= 3 * total or height >= yspan:
            break
        height *= 2.0
    owner = torch.repeat_interleave(torch.arange(total, device=device), count, output_size=copies)
    rank = torch.arange(copies, device=device) - (torch.cumsum(count, 0) - count).index_select(0, owner)
    first_band = rank == 0
    band = start.long().index_select(0, owner) + rank
    num_bands = int(band.max()) + 1
    xmin = wide[:, 0].min()
    xspan = float(wide[:, 2].max() - xmin) or 1.0
    # int64 keys: (group, band) in the high bits, x quantised in the low ones. Quantising is monotone, so a
    # box's x1 in [x1, x2] of another stays in the quantised range: the candidates are a superset, and the
    # exact test below decides
    bits = min(40, 62 - (int(groups.max()) * num_bands + num_bands).bit_length())
    base = (groups.index_select(0, owner) * num_bands + band) << (bits + 1)
    scale = float(1 << bits) / xspan
    key1 = base + ((wide[:, 0] - xmin) * scale).long().index_select(0, owner)
    key2 = base + ((wide[:, 2] - xmin) * scale).long().index_select(0, owner)
    # every copy set sorted by x1 key once: the queries come sorted too (much faster searchsorted)
    order = torch.sort(key1).indices
    if same:
        copy_sets = [(order, order)]
    else:
        is_a = (owner < na).index_select(0, order)
        ca, cb = _take(is_a, order)[0], _take(~is_a, order)[0]
        copy_sets = [(ca, cb), (cb, ca)]  # b's x1 in [a.x1, a.x2], then a's x1 in (b.x1, b.x2]
    out_i, out_j, out_iou = [], [], []
    for direction, (p, q) in enumerate(copy_sets):
        qkey = key1.index_select(0, q)
        q_first = first_band.index_select(0, q)
        qkey_first, q_owner_first = _take(q_first, qkey, owner.index_select(0, q))
        p_first = first_band.index_select(0, p)
        # a pair is reported in its first common band, where one of the two boxes starts: a first copy meets
        # every copy, another copy meets first copies only
        searches = [
            (_take(p_first, p)[0], qkey, owner.index_select(0, q)),
            (_take(~p_first, p)[0], qkey_first, q_owner_first),
        ]
        for ps, keys, q_owner in searches:
            lo = torch.searchsorted(keys, key1.index_select(0, ps), side="left")
            hi = torch.searchsorted(keys, key2.index_select(0, ps), side="right")
            p_owner = owner.index_select(0, ps)
            for r0, r1, count, size in _chunks(hi - lo):
                ip = torch.repeat_interleave(p_owner[r0:r1], count, output_size=size)
                shift = lo[r0:r1] - (torch.cumsum(count, 0) - count)
                pos = torch.arange(size, device=device).add_(
                    torch.repeat_interleave(shift, count, output_size=size)
                )
                iq = q_owner.index_select(0, pos)
                pc = [c.index_select(0, ip) for c in cols]
                qc = [c.index_select(0, iq) for c in cols]
                keep = torch.minimum(pc[2], qc[2]) > torch.maximum(pc[0], qc[0])
                keep &= torch.minimum(pc[3], qc[3]) > torch.maximum(pc[1], qc[1])
                if direction == 0:
                    keep &= qc[0] >= pc[0]
                    if same:  # each unordered pair once
                        keep &= (qc[0] > pc[0]) | (iq > ip)
                else:
                    keep &= qc[0] > pc[0]
                sel = keep.nonzero().squeeze(1)
                ip, iq = ip.index_select(0, sel), iq.index_select(0, sel)
                out_i.append(ip if direction == 0 else iq)
                out_j.append(iq if direction == 0 else ip)
                if with_iou:
                    out_iou.append(
                        _iou_cols([c.index_select(0, sel) for c in pc], [c.index_select(0, sel) for c in qc])
                    )
    if not out_i:
        empty = _empty_index(a)
        return empty, empty, (a.new_zeros((0,)) if with_iou else None)
    i, j = torch.cat(out_i), torch.cat(out_j)
    return i, (j if same else j - na), (torch.cat(out_iou) if with_iou else None)


def _chunks(count: Tensor) -> list[tuple[int, int, Tensor, int]]:
    """Row ranges ``(r0, r1, count[r0:r1], sum)`` of about ``_PAIR_CHUNK`` candidates each (none if empty)."""
    ends = torch.cumsum(count, 0)
    total = int(ends[-1]) if ends.numel() else 0
    if total == 0:
        return []
    cuts = [0, int(count.shape[0])]
    if total > _PAIR_CHUNK:
        marks = torch.arange(_PAIR_CHUNK, total, _PAIR_CHUNK, device=count.device)
        cuts = sorted({*cuts, *torch.searchsorted(ends, marks, side="right").tolist()})
    out = []
    for r0, r1 in itertools.pairwise(cuts):
        c = count[r0:r1]
        size = int(c.sum())
        if size:
            out.append((r0, r1, c, size))
    return out


# --------------------------------------------------------------------------------------------- NMS, voting


def _nms(
    b: Tensor, s: Tensor, lab: Tensor, *, iou_thresh: float, vote_thresh: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-wise NMS (+ box voting). Returns fused boxes, scores, source and members (local indices).

    The member assignment uses the kept box with the highest IoU among the kept boxes of the class scoring
    at least as high (the one that suppressed it has IoU > iou_thresh, so the best one has too).
    """
    n = int(s.shape[0])
    keep = batched_nms(
        b.double(), s.double(), lab, iou_thresh
    )  # float64: the class offsets must not cost precision
    kept_boxes, kept_scores = b.index_select(0, keep), s.index_select(0, keep)
    i, k, iou = _overlap_pairs(b, lab, kept_boxes, lab.index_select(0, keep), with_iou=True)
    assert iou is not None
    earlier = kept_scores.index_select(0, k) >= s.index_select(0, i)
    members = _argmax_rows(*_take(earlier, i, k, iou), n)
    members[keep] = torch.arange(keep.shape[0], device=b.device)
    out_boxes = kept_boxes
    if vote_thresh is not None:
        # Detectron box_voting: every box of the class with IoU >= thresh votes, weighted by its score
        iv, kv = _take(iou >= vote_thresh, i, k)
        weight = s.index_select(0, iv).double()
        num = torch.zeros((keep.shape[0], 4), dtype=torch.float64, device=b.device)
        num.index_add_(0, kv, b.index_select(0, iv).double() * weight[:, None])
        den = torch.zeros((keep.shape[0],), dtype=torch.float64, device=b.device).index_add_(0, kv, weight)
        voted = (num / den[:, None]).to(b.dtype)
        out_boxes = torch.where((den > 0)[:, None], voted, kept_boxes)  # all-zero weights: keep the box
    return out_boxes, kept_scores, keep, members


# --------------------------------------------------------------------------------------------- soft-NMS


def _soft_nms(
    b: Tensor, s: Tensor, lab: Tensor, *, iou_thresh: float, sigma: float, thresh: float, linear: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class soft-NMS, equal to ensemble-boxes' ``cpu_soft_nms_float`` (to float rounding).

    The sequential algorithm repeatedly selects the box with the highest current score and decays the
    scores of the boxes it overlaps. Only overlapping boxes interact (the decay weight of IoU 0 is exactly
    1), so a box whose score is strictly above the scores of all its remaining overlapping neighbours is
    selected by the sequential algorithm before any of them and with its current score: every round selects
    all such local maxima at once and applies their decays (in descending selector score, the sequential
    order). Boxes at or below ``thresh`` can neither be kept nor decay a box that will be, so they leave the
    rounds. The number of rounds is the longest chain of successive decays (a handful for TTA clusters).
    When two overlapping boxes of a class are exactly tied for selection, the winner depends on the
    positions ensemble-boxes' swaps gave them, so that class is redone by ``_soft_nms_exact`` (the
    sequential algorithm, one Python step per box).
    """
    n = int(s.shape[0])
    device = b.device
    cand = (s > thresh).nonzero().squeeze(1)
    cb, cs, cl = b.index_select(0, cand), s.index_select(0, cand), lab.index_select(0, cand)
    m = int(cand.shape[0])
    i, j, iou = _overlap_pairs(cb, cl, with_iou=True)
    assert iou is not None
    if linear:
        w = torch.where(iou > iou_thresh, 1.0 - iou, torch.ones_like(iou))
    else:
        w = torch.exp(-(iou * iou) / sigma)
    i, j, iou, w = _take(w < 1, i, j, iou, w)
    src, dst, w = torch.cat([i, j]), torch.cat([j, i]), torch.cat([w, w])  # directed edges, both ways
    all_src, all_dst, all_iou = src, dst, torch.cat([iou, iou])

    cur = cs.clone()
    alive = torch.ones((m,), dtype=torch.bool, device=device)
    kept = torch.zeros((m,), dtype=torch.bool, device=device)
    kept_score = torch.zeros_like(cur)
    redo = torch.zeros((m,), dtype=torch.bool, device=device)  # classes left to the exact fallback
    minus_inf = cur.new_full((), -torch.inf)
    pruned_at = m
    while True:
        remaining = int(alive.sum())
        if remaining == 0:
            break
        if remaining < pruned_at // 2:  # dead boxes' edges are inert (-inf); drop them now and then
            src, dst, w = _take(alive.index_select(0, src) & alive.index_select(0, dst), src, dst, w)
            pruned_at = remaining
        live = torch.where(alive, cur, minus_inf)
        cur_src = live.index_select(0, src)
        nbr = torch.full_like(cur, -torch.inf).scatter_reduce_(0, dst, cur_src, "amax")
        local = alive & (cur > nbr)
        if bool((alive & (cur == nbr)).any()):  # a box tied with its best neighbour: is it a real tie?
            weak = alive & (cur >= nbr)
            tie = (
                weak.index_select(0, src) & weak.index_select(0, dst) & (cur_src == live.index_select(0, dst))
            )
            if bool(tie.any()):
                redo |= torch.isin(cl, cl.index_select(0, _take(tie, src)[0]))
                alive &= ~redo
                local &= ~redo
        kept |= local
        kept_score = torch.where(local, cur, kept_score)
        ds, dd, dw, dcur = _take(local.index_select(0, src), src, dst, w, cur_src)
        if ds.numel():
            order = torch.sort(dcur, descending=True, stable=True).indices  # the sequential order
            cur.scatter_reduce_(0, dd.index_select(0, order), dw.index_select(0, order), "prod")
        alive &= ~local & (cur > thresh)
    cur = kept_score

    keep_local = kept.nonzero().squeeze(1)
    source, out_scores = cand.index_select(0, keep_local), cur.index_select(0, keep_local)
    if bool(redo.any()):
        redo_labels = torch.unique(cl[redo])
        source, out_scores = _take(~torch.isin(lab.index_select(0, source), redo_labels), source, out_scores)
        parts_src, parts_scores = [source], [out_scores]
        for label in redo_labels.tolist():
            idx = (lab == label).nonzero().squeeze(1)
            area = (b[idx, 2] - b[idx, 0]) * (b[idx, 3] - b[idx, 1])
            flat, idx = idx[area == 0], idx[area > 0]  # never decayed, never decaying
            flat = flat[s[flat] > thresh]
            pos, sc = _soft_nms_exact(
                b[idx], s[idx], nt=iou_thresh, sigma=sigma, thresh=thresh, linear=linear
            )
            parts_src += [idx[pos], flat]
            parts_scores += [sc, s[flat]]
        source, out_scores = torch.cat(parts_src), torch.cat(parts_scores)
        kept = torch.zeros((n,), dtype=torch.bool, device=device)
        kept[source] = True
        kept = kept.index_select(0, cand)

    # members: a kept box is its own; a decayed-away box joins, among the kept boxes decaying it that scored
    # at least as high as it (its first decayer did), the one with the highest IoU
    fused_of = torch.full((n,), -1, dtype=torch.int64, device=device)
    fused_of[source] = torch.arange(source.shape[0], device=device)
    e = kept.index_select(0, all_src) & ~kept.index_select(0, all_dst)
    e &= cs.index_select(0, all_src) >= cs.index_select(0, all_dst)
    es, ed, eiou = _take(e, all_src, all_dst, all_iou)
    best = _argmax_rows(ed, cand.index_select(0, es), eiou, m)
    has = (best >= 0).nonzero().squeeze(1)
    members = torch.full((n,), -1, dtype=torch.int64, device=device)
    members[cand.index_select(0, has)] = fused_of.index_select(0, best.index_select(0, has))
    members[source] = fused_of.index_select(0, source)
    return b.index_select(0, source), out_scores, source, members


def _soft_nms_exact(
    b: Tensor, s: Tensor, *, nt: float, sigma: float, thresh: float, linear: bool
) -> tuple[Tensor, Tensor]:
    """ensemble-boxes' ``cpu_soft_nms_float`` step by step for one class (ties included).

    Sequential by nature (one Python step per selected box); only used for classes with exact ties.
    Returns the kept positions (into ``b``) in selection order and their decayed scores.
    """
    n = int(s.shape[0])
    b, s = b.clone(), s.clone()
    pos = torch.arange(n, device=b.device)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept = n
    for i in range(n):
        if i < n - 1:
            m = int(torch.argmax(s[i + 1 :])) + i + 1  # first maximum, like np.argmax
            if bool(s[i] < s[m]):
                swap = torch.tensor([m, i], device=b.device)
                for t in (b, s, area, pos):
                    t[[i, m]] = t[swap]
        if not bool(s[i] > thresh):  # everything left is <= s[i]: nothing more is kept
            kept = i
            break
        if i == n - 1:
            break
        rest = b[i + 1 :]
        wh = (torch.minimum(b[i, 2:], rest[:, 2:]) - torch.maximum(b[i, :2], rest[:, :2])).clamp_min(0)
        inter = wh[:, 0] * wh[:, 1]
        ovr = inter / (area[i] + area[i + 1 :] - inter)
        if linear:
            weight = torch.where(ovr > nt, 1.0 - ovr, torch.ones_like(ovr))
        else:
            weight = torch.exp(-(ovr * ovr) / sigma)
        s[i + 1 :] *= weight
    return pos[:kept], s[:kept]


# --------------------------------------------------------------------------------------------- WBF


def _wbf(
    b: Tensor, s: Tensor, lab: Tensor, *, iou_thresh: float, num_views: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted boxes fusion, equal to ensemble-boxes' (``conf_type="avg"``, equal weights).

    The sequential algorithm visits the boxes by descending score; each joins the existing cluster (of its
    class) whose *current* fused box (score-weighted mean of the members so far) has the highest IoU with it,
    if that IoU is ``> iou_thresh`` (ties: the oldest cluster), else it starts a new cluster.

    Vectorised as a fixed point: given a guess ``A`` (the cluster of every box, named by its first member's
    rank), ``replay(A)`` decides every box at once against the clusters of ``A`` as they were when it came
    (prefix sums over each cluster's members by rank; candidates are the clusters whose final hull overlaps
    the box, a superset of those whose fused box can). If ``A`` agrees with the sequential result on the
    first ``k`` boxes, ``replay(A)`` agrees on ``k + 1``, and ``replay(A) == A`` only for the sequential
    result. The guess links every box to the earlier box it overlaps most (IoU > iou_thresh) and follows the
    links to their root, which TTA's tight clusters make almost right; after the first replay, only the boxes
    overlapping a cluster whose membership changed are replayed. Typically 3-6 rounds (up to ~20 in crowded
    scenes with a low threshold); after ``_WBF_MAX_ROUNDS`` the unconfirmed rest is done sequentially.
    """
    n = int(s.shape[0])
    device = b.device
    if n == 0:
        e = _empty_index(b)
        return b[:0], s[:0], e, e
    order = torch.argsort(s, stable=True).flip(0)  # descending; ties: later index first (numpy's [::-1])
    box = b[order].double()
    score = s[order].double()
    lab = lab[order]
    ranks = torch.arange(n, device=device)

    # guess: every box points at the earlier box it overlaps most (IoU > iou_thresh), then to the root
    i, j, iou = _overlap_pairs(box, lab, with_iou=True)
    assert iou is not None
    late, early = torch.maximum(i, j), torch.minimum(i, j)
    parent = _argmax_rows(*_take(iou > iou_thresh, late, early, iou), n)
    guess = torch.where(parent >= 0, parent, ranks)
    while True:  # pointer jumping
        jumped = guess.index_select(0, guess)
        if torch.equal(jumped, guess):
            break
        guess = jumped

    weighted = torch.cat([box * score[:, None], score[:, None], box], 1)  # sums needed per cluster
    strips = _StripIndex(box, lab)
    replay = _wbf_replay(guess, box, lab, weighted, iou_thresh)
    confirmed = 0
    for _ in range(_WBF_MAX_ROUNDS):
        diff = (replay != guess).nonzero().squeeze(1)
        if diff.numel() == 0:
            break
        first = int(diff[0])
        confirmed = first + 1  # replay is right on [0, first difference]
        # only the boxes after `first` overlapping a cluster whose members changed can decide differently
        touched = torch.unique(torch.cat([guess.index_select(0, diff), replay.index_select(0, diff), diff]))
        old, new = (
            _group_hulls(guess, box).index_select(0, touched),
            _group_hulls(replay, box).index_select(0, touched),
        )
        hull = torch.cat([torch.minimum(old[:, :2], new[:, :2]), torch.maximum(old[:, 2:], new[:, 2:])], 1)
        hull, touched = _take(hull[:, 0] <= hull[:, 2], hull, touched)  # ids without members have no hull
        guess = replay
        rows = strips.overlapping(hull, lab.index_select(0, touched))
        rows = _take(rows > first, rows)[0]
        replay = guess.clone()
        if rows.numel():
            replay[rows] = _wbf_replay(guess, box, lab, weighted, iou_thresh, rows=rows)
    else:
        guess = _wbf_sequential(replay, confirmed, box, lab, weighted, iou_thresh)

    roots = (guess == ranks).nonzero().squeeze(1)
    slot = torch.full((n,), -1, dtype=torch.int64, device=device)
    slot[roots] = torch.arange(roots.shape[0], device=device)
    cluster = slot[guess]
    sums = torch.zeros((roots.shape[0], 9), dtype=torch.float64, device=device).index_add_(
        0, cluster, weighted
    )
    count = torch.bincount(cluster, minlength=int(roots.shape[0])).double()
    fused = _fused_box(sums, count)
    conf = sums[:, 4] / count * torch.clamp(count, max=num_views) / num_views
    members = torch.empty((n,), dtype=torch.int64, device=device)
    members[order] = cluster
    return fused.to(b.dtype), conf.to(s.dtype), order[roots], members


def _fused_box(sums: Tensor, count: Tensor) -> Tensor:
    """Score-weighted mean box from ``[sum(s*box), sum(s), sum(box)]`` rows; plain mean when all s are 0."""
    weight = sums[:, 4:5]
    return torch.where(weight > 0, sums[:, :4] / weight, sums[:, 5:] / count[:, None])


class _StripIndex:
    """Boxes sorted by (class, x1), to find those overlapping a few query rectangles without a new sort."""

    def __init__(self, box: Tensor, lab: Tensor) -> None:
        self.box, self.lab = box, lab
        self.classes, group = torch.unique(lab, return_inverse=True)
        self.xmin = box[:, 0].min()
        self.span = float(box[:, 2].max() - self.xmin) or 1.0
        self.keys, self.order = torch.sort(
            2.0 * group.double() + (box[:, 0].double() - self.xmin) / self.span
        )
        self.max_width = float(((box[:, 2] - box[:, 0]).double() / self.span).max())

    def overlapping(self, query: Tensor, qlab: Tensor) -> Tensor:
        """Sorted unique indices of the boxes of class ``qlab[t]`` overlapping ``query[t]`` for some t."""
        if query.shape[0] == 0:
            return _empty_index(query)
        base = 2.0 * torch.searchsorted(self.classes, qlab).double()
        slack = 1e-9  # covers rounding: candidates are a superset, filtered exactly below
        low = base + (query[:, 0].double() - self.xmin) / self.span - self.max_width - slack
        high = base + (query[:, 2].double() - self.xmin) / self.span + slack
        lo = torch.searchsorted(self.keys, low, side="left")
        hi = torch.searchsorted(self.keys, high, side="right")
        found = []
        for r0, r1, count, size in _chunks(hi - lo):
            iq = torch.repeat_interleave(torch.arange(r0, r1, device=query.device), count, output_size=size)
            shift = lo[r0:r1] - (torch.cumsum(count, 0) - count)
            pos = torch.arange(size, device=query.device) + torch.repeat_interleave(
                shift, count, output_size=size
            )
            ib = self.order.index_select(0, pos)
            q, b = query.index_select(0, iq), self.box.index_select(0, ib)
            hit = (torch.minimum(q[:, 2:], b[:, 2:]) > torch.maximum(q[:, :2], b[:, :2])).all(1)
            hit &= self.lab.index_select(0, ib) == qlab.index_select(0, iq)
            found.append(_take(hit, ib)[0])
        return torch.unique(torch.cat(found)) if found else _empty_index(query)


def _group_hulls(groups: Tensor, box: Tensor) -> Tensor:
    """``[n, 4]``: the bounding box of the boxes of each group id (``+inf, +inf, -inf, -inf`` if none)."""
    n = int(groups.shape[0])
    index = groups[:, None].expand(-1, 2)
    low = torch.full((n, 2), torch.inf, dtype=box.dtype, device=box.device)
    high = torch.full((n, 2), -torch.inf, dtype=box.dtype, device=box.device)
    low.scatter_reduce_(0, index, box[:, :2], "amin")
    high.scatter_reduce_(0, index, box[:, 2:], "amax")
    return torch.cat([low, high], 1)


def _wbf_replay(
    guess: Tensor, box: Tensor, lab: Tensor, weighted: Tensor, iou_thresh: float, rows: Tensor | None = None
) -> Tensor:
    """Sequential WBF decisions of all boxes (or ``rows``), the earlier boxes being clustered as ``guess``."""
    n = int(guess.shape[0])
    device = box.device
    ranks = torch.arange(n, device=device)
    key, perm = torch.sort(guess * n + ranks)  # members grouped by cluster, by rank within
    where = torch.empty_like(perm)
    where[perm] = ranks
    roots = (guess == ranks).nonzero().squeeze(1)
    hull = _group_hulls(guess, box).index_select(0, roots)
    queries = ranks if rows is None else rows
    qbox = box if rows is None else box.index_select(0, rows)
    jq, c, _ = _overlap_pairs(qbox, lab.index_select(0, queries), hull, lab.index_select(0, roots))
    j = queries.index_select(0, jq)
    c = roots.index_select(0, c)
    jq, j, c = _take(c < j, jq, j, c)
    prefix = torch.zeros((n + 1, weighted.shape[1]), dtype=weighted.dtype, device=device)
    prefix[1:] = torch.cumsum(weighted.index_select(0, perm), 0)
    end = torch.searchsorted(key, c * n + j)  # members of c with rank < j end here
    begin = where.index_select(0, c)  # the root is the first member of its cluster
    sums = prefix.index_select(0, end) - prefix.index_select(0, begin)
    fused = _fused_box(sums, (end - begin).double())
    iou = _iou_cols([fused[:, k] for k in range(4)], [box[:, k].index_select(0, j) for k in range(4)])
    best = _argmax_rows(*_take(iou > iou_thresh, jq, c, iou), int(queries.shape[0]))
    return torch.where(best >= 0, best, queries)


def _wbf_sequential(
    guess: Tensor, start: int, box: Tensor, lab: Tensor, weighted: Tensor, iou_thresh: float
) -> Tensor:
    """The plain sequential WBF from rank ``start`` on, ``guess[:start]`` being right (a safety net)."""
    n = int(guess.shape[0])
    device = box.device
    ranks = torch.arange(n, device=device)
    out = guess.clone()
    out[start:] = ranks[start:]
    sums = torch.zeros_like(weighted).index_add_(0, out[:start], weighted[:start])
    count = torch.bincount(out[:start], minlength=n).double()
    is_root = torch.zeros((n,), dtype=torch.bool, device=device)
    is_root[:start] = out[:start] == ranks[:start]
    for j in range(start, n):
        cand = (is_root & (lab == lab[j])).nonzero().squeeze(1)
        chosen = -1
        if cand.numel():
            fused = _fused_box(sums[cand], count[cand])
            rows = torch.arange(cand.shape[0], device=device)
            iou = torch.nan_to_num(_pair_iou(fused, box, rows, cand.new_full(cand.shape, j)), nan=0.0)
            best = int(torch.argmax(iou))  # first maximum: the oldest cluster
            if bool(iou[best] > iou_thresh):
                chosen = int(cand[best])
        if chosen < 0:
            chosen = j
            is_root[j] = True
        out[j] = chosen
        sums[chosen] += weighted[j]
        count[chosen] += 1
    return out
