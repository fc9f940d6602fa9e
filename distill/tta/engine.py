"""Multi-transform inference: run a detector over every view of a batch of images and fuse the views.

Per batch of images (the paper's procedure, Detectron's ``TEST.BBOX_AUG`` / ``KPS_AUG`` / ``MASK_AUG``)::

    for each view (size, flip):   prepare -> backbone once -> detections, mapped back to the original image
    per image:                    union of all views' detections -> box fusion (NMS / vote / soft-NMS / WBF)
    for each view again:          keypoint and mask heads on the *merged* boxes (mapped into that view),
                                  flipped views un-flipped (width reversed, left/right channels swapped)
    per image:                    heatmap logits averaged (or max) -> keypoints; soft masks averaged -> masks

The heads run only on the fused boxes that can become pseudo-labels: the ``max_detections`` highest-scoring
ones per image that score at least ``score_floor``. Calibration keeps about as many instances per image as the
labeled set has (a few), so a small ``max_detections`` (the demo uses 20) costs nothing in pseudo-label
quality and cuts the heads pass by 5x against the detector's usual 100.

Images of one view go through the backbone together (padding within the batch only; landscape and portrait
images are separate batches). The backbone features of each view are kept for the second (heads) pass while
their total size stays under ``feature_cache_mb``; views that do not fit are recomputed (one more backbone
pass for those views only). A larger budget trades memory for time: with everything cached, the backbone runs
exactly once per view. What it takes: the FPN features of all views of one batch, e.g. ~1.3 GB per 640 x 480
photo for a ResNet-50 FPN over the paper's 18 views (400..1200 px), ~40 MB for the embedded benchmark's model.
The default (``None``) sizes the budget from the memory free when a batch starts: half of the GPU's free
memory, a quarter of the available RAM on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distill.models.base import Detector, PreparedBatch
from distill.structures import Detections
from distill.transforms import per_orientation
from distill.tta.boxes import FusedBoxes, agreement, fuse_boxes, unfused
from distill.tta.views import View, ViewSet


@dataclass(frozen=True)
class FusionConfig:
    """How views are fused. Defaults follow Detectron's TTA (union + NMS, heatmap and soft-mask averaging)."""

    method: Literal["nms", "vote", "soft-nms", "wbf"] = "nms"
    iou_thresh: float = 0.5
    vote_iou_thresh: float = 0.8
    soft_sigma: float = 0.5
    soft_method: Literal["gaussian", "linear"] = "gaussian"
    view_score_thresh: float | None = None  # per-view detection threshold (default: the model's)
    view_nms_thresh: float | None = None  # per-view class-wise NMS (default: the model's; 1.0 turns it off)
    max_detections: int = 100  # fused boxes kept per image (highest scores); the heads run on these only
    score_floor: float = 0.0  # fused boxes scoring below this are dropped before the heads run
    keypoint_heuristic: Literal["mean", "max"] = "mean"
    mask_heuristic: Literal["mean", "max"] = "mean"
    size_dependent: bool = False  # Detectron's SCALE_SIZE_DEP for keypoints and masks
    area_thresh: float | None = None  # px^2; default (180 / 800 * test_size)^2, Detectron's 180^2 at 800 px
    agreement_iou: float = 0.5
    feature_cache_mb: float | None = None  # None: from the free memory (see the module docstring)
    heads: bool = True  # False: box-only multi-view (no keypoint/mask fusion even if the model has the heads)


@dataclass
class FusedPrediction:
    """Fused detections of one image (original coordinates) and each instance's view agreement."""

    detections: Detections
    agreement: torch.Tensor  # [M] fraction of views with a same-class detection at IoU >= agreement_iou
    num_views: int


@dataclass
class _ViewPass:
    view: View
    batch: PreparedBatch
    feats: Any | None  # None when it did not fit the cache budget
    dets: list[Detections]  # view coordinates


@dataclass
class _ImageFusion:
    fused: FusedBoxes  # original coordinates
    agreement: torch.Tensor  # [M]
    view_ids: torch.Tensor  # [N] view of each input detection
    view_boxes: torch.Tensor  # [N, 4] each input detection in its own view's coordinates


class MultiViewEngine:
    """Runs ``detector`` over ``views`` and fuses them; see the module docstring."""

    def __init__(self, detector: Detector, views: ViewSet, fusion: FusionConfig | None = None) -> None:
        if len(views) == 0:
            raise ValueError("the view set is empty")
        self.detector = detector
        self.views = views
        self.fusion = fusion or FusionConfig()
        self._flip_indices = detector.keypoint_flip_indices()
        self.recomputed_views = 0  # the most views of one batch so far whose features did not fit the cache

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor]) -> list[FusedPrediction]:
        """Fused predictions for a batch of float RGB images ``[3, H, W]`` in [0, 1].

        Landscape and portrait images run as separate batches (padding one orientation to the other's long
        side would cost 1.3-1.5x the pixels for 4:3 photos), each through every view and the heads before the
        next, so the feature cache holds one group's features at a time.
        """
        self.detector.eval()
        return per_orientation(self._predict_batch, images)

    def _predict_batch(self, images: Sequence[torch.Tensor]) -> list[FusedPrediction]:
        passes = self._detect_all_views(images)
        fusions = [self._fuse_boxes(passes, i) for i in range(len(images))]
        masks, heatmaps = self._heads(passes, fusions, images)
        out = []
        for i, item in enumerate(fusions):
            fused = item.fused
            det = Detections(fused.boxes, fused.scores, fused.labels)
            if masks is not None:
                det = det.with_fields(masks=masks[i])
            if heatmaps is not None:
                det = det.with_fields(keypoints=self._decode_keypoints(passes, i, item, heatmaps[i]))
            out.append(FusedPrediction(det, item.agreement, len(self.views)))
        return out

    # -- pass 1: detections in every view ----------------------------------------------------------------
    def _detect_all_views(self, images: Sequence[torch.Tensor]) -> list[_ViewPass]:
        passes, cached_bytes = [], 0.0
        budget = feature_cache_bytes(self.fusion.feature_cache_mb, self.detector.device)
        for view in self.views:
            batch = self.detector.prepare(images, size=view.size, flip=view.flip, max_size=view.max_size)
            feats = self.detector.features(batch)
            dets = self.detector.detect(
                feats,
                batch,
                score_thresh=self.fusion.view_score_thresh,
                nms_thresh=self.fusion.view_nms_thresh,
            )
            size = sum(t.numel() * t.element_size() for t in feats.values())
            keep = self._needs_heads() and cached_bytes + size <= budget
            cached_bytes += size if keep else 0
            passes.append(_ViewPass(view, batch, feats if keep else None, dets))
        if self._needs_heads():
            self.recomputed_views = max(self.recomputed_views, sum(p.feats is None for p in passes))
        return passes

    def _needs_heads(self) -> bool:
        return self.fusion.heads and (self.detector.has_masks or self.detector.has_keypoints)

    # -- fusion of boxes ---------------------------------------------------------------------------------
    def _fuse_boxes(self, passes: list[_ViewPass], index: int) -> _ImageFusion:
        boxes, scores, labels, view_ids = [], [], [], []
        for v, p in enumerate(passes):
            det = p.dets[index]
            boxes.append(p.batch.transforms[index].inverse_boxes(det.boxes))
            scores.append(det.scores)
            labels.append(det.labels)
            view_ids.append(torch.full_like(det.labels, v))
        all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
        all_labels, all_views = torch.cat(labels), torch.cat(view_ids)
        f = self.fusion
        if len(passes) == 1:  # one view was already NMS'd by the detector: fusion keeps its top detections
            fused = unfused(all_boxes, all_scores, all_labels, max_detections=f.max_detections)
        else:
            fused = fuse_boxes(
                all_boxes,
                all_scores,
                all_labels,
                method=f.method,
                iou_thresh=f.iou_thresh,
                vote_iou_thresh=f.vote_iou_thresh,
                soft_sigma=f.soft_sigma,
                soft_method=f.soft_method,
                num_views=len(passes),
                view_ids=all_views,
                max_detections=f.max_detections,
            )
        if f.score_floor > 0:
            fused = _drop_below(fused, f.score_floor)
        agree = agreement(fused, all_boxes, all_labels, all_views, len(passes), iou_thresh=f.agreement_iou)
        view_boxes = torch.cat([p.dets[index].boxes for p in passes])
        return _ImageFusion(fused, agree, all_views, view_boxes)

    def _boxes_in_view(self, item: _ImageFusion, index: int, v: int, p: _ViewPass) -> torch.Tensor:
        """The fused boxes in view ``v``; a box that *is* one of that view's detections (NMS, soft-NMS keep
        a member's coordinates) takes its exact view coordinates instead of a rounded round trip."""
        fused = item.fused
        boxes = p.batch.transforms[index].apply_boxes(fused.boxes)
        if self.fusion.method in ("nms", "soft-nms") or len(self.views) == 1:
            same = item.view_ids[fused.source] == v
            boxes[same] = item.view_boxes[fused.source[same]]
        return boxes

    # -- pass 2: heads on the merged boxes ---------------------------------------------------------------
    def _heads(
        self, passes: list[_ViewPass], fusions: list[_ImageFusion], images: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        det = self.detector
        if not self._needs_heads():
            return None, None
        fused = [item.fused for item in fusions]
        kp_select = [det.is_keypoint_class(f.labels) for f in fused] if det.has_keypoints else None
        mask_acc = _Accumulator(self.fusion.mask_heuristic) if det.has_masks else None
        kp_acc = _Accumulator(self.fusion.keypoint_heuristic) if det.has_keypoints else None
        areas = [(f.boxes[:, 2] - f.boxes[:, 0]) * (f.boxes[:, 3] - f.boxes[:, 1]) for f in fused]
        for v, p in enumerate(passes):
            feats = p.feats
            if feats is None:
                feats = det.features(
                    det.prepare(images, size=p.view.size, flip=p.view.flip, max_size=p.view.max_size)
                )
            view_boxes = [self._boxes_in_view(item, i, v, p) for i, item in enumerate(fusions)]
            weights = [self._view_weight(p.view, a) for a in areas]
            if mask_acc is not None:
                probs = det.mask_probs(feats, p.batch, view_boxes, [f.labels for f in fused])
                if p.view.flip:
                    probs = [m.flip(-1) for m in probs]
                mask_acc.add(probs, weights)
            if kp_acc is not None:
                chosen = [b[s] for b, s in zip(view_boxes, kp_select, strict=True)]
                logits = det.keypoint_logits(feats, p.batch, chosen)
                if p.view.flip:
                    logits = [lg.flip(-1)[:, self._flip_indices] for lg in logits]
                kp_acc.add(logits, [w[s] for w, s in zip(weights, kp_select, strict=True)])
        return (
            None if mask_acc is None else mask_acc.result(),
            None if kp_acc is None else kp_acc.result(),
        )

    def _view_weight(self, view: View, areas: torch.Tensor) -> torch.Tensor:
        """1 where this view counts for a box, 0 where Detectron's size rule drops it (down-scaled views for
        small/medium boxes, up-scaled views for large ones)."""
        ones = torch.ones_like(areas)
        if not self.fusion.size_dependent:
            return ones
        test = self.views.test_size
        thresh = self.fusion.area_thresh or (180.0 / 800.0 * test) ** 2
        if view.size < test:
            return (areas >= thresh).to(areas.dtype)
        if view.size > test:
            return (areas < thresh).to(areas.dtype)
        return ones

    def _decode_keypoints(
        self, passes: list[_ViewPass], index: int, item: _ImageFusion, heatmaps: torch.Tensor
    ) -> torch.Tensor:
        det = self.detector
        fused = item.fused
        select = det.is_keypoint_class(fused.labels)
        keypoints = torch.zeros(
            (len(fused.boxes), len(det.config.keypoint_names), 3), device=fused.boxes.device
        )
        if len(heatmaps) == 0:
            return keypoints
        if (
            len(passes) == 1 and not passes[0].view.flip
        ):  # decode in the view and map back, as plain inference
            t = passes[0].batch.transforms[index]
            boxes = self._boxes_in_view(item, index, 0, passes[0])[select]
            keypoints[select] = t.inverse_keypoints(det.decode_keypoints(heatmaps, boxes), None)
        else:
            keypoints[select] = det.decode_keypoints(heatmaps, fused.boxes[select])
        return keypoints


def feature_cache_bytes(megabytes: float | None, device: torch.device) -> float:
    """The feature cache budget in bytes: ``megabytes`` when given, else half of the GPU's free memory or a
    quarter of the RAM available (``MemAvailable``; 2 GiB where it cannot be read)."""
    if megabytes is not None:
        return megabytes * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2
    return available_ram_bytes() / 4


def available_ram_bytes() -> float:
    """RAM the kernel can hand out without swapping (``MemAvailable`` of ``/proc/meminfo``); 8 GiB where that
    cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8.0 * 2**30


def _drop_below(fused: FusedBoxes, floor: float) -> FusedBoxes:
    """``fused`` without the boxes scoring under ``floor`` (their members become -1, the rest re-indexed)."""
    keep = fused.scores >= floor
    if bool(keep.all()):
        return fused
    new_index = torch.cumsum(keep.long(), 0) - 1
    new_index[~keep] = -1
    members = torch.where(fused.members >= 0, new_index[fused.members.clamp(min=0)], fused.members)
    return FusedBoxes(fused.boxes[keep], fused.scores[keep], fused.labels[keep], fused.source[keep], members)


class _Accumulator:
    """Per-image, per-box mean (or max) of maps across views, each view weighted 0/1 per box.

    A box that no view counts (the size rule dropped all of them) falls back to all views.
    """

    def __init__(self, heuristic: str) -> None:
        self.heuristic = heuristic
        self.kept: list[torch.Tensor] = []
        self.every: list[torch.Tensor] = []
        self.weight: list[torch.Tensor] = []
        self.views = 0

    def add(self, maps: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not self.kept:
            start = 0.0 if self.heuristic == "mean" else -torch.inf
            self.kept = [torch.full_like(m, start) for m in maps]
            self.every = [torch.full_like(m, start) for m in maps]
            self.weight = [torch.zeros_like(w) for w in weights]
        self.views += 1
        for i, (m, w) in enumerate(zip(maps, weights, strict=True)):
            w = w.view((-1,) + (1,) * (m.dim() - 1))
            if self.heuristic == "mean":
                self.kept[i] += m * w
                self.every[i] += m
            else:
                self.kept[i] = torch.where(w > 0, torch.maximum(self.kept[i], m), self.kept[i])
                self.every[i] = torch.maximum(self.every[i], m)
            self.weight[i] += w.flatten()

    def result(self) -> list[torch.Tensor]:
        out = []
        for kept, every, weight in zip(self.kept, self.every, self.weight, strict=True):
            shape = (-1,) + (1,) * (kept.dim() - 1)
            if self.heuristic == "mean":
                kept = kept / weight.clamp(min=1).view(shape)
                every = every / self.views
            out.append(torch.where((weight > 0).view(shape), kept, every))
        return out
