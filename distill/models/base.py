"""What multi-view inference needs from a detector: its stages, not only ``predict``.

Paper-faithful keypoint and mask fusion runs the heads on the *same merged boxes* in every view, so a backend
exposes::

    batch = det.prepare(images, size=..., flip=...)    # resize + flip + normalise + pad, one view
    feats = det.features(batch)                         # backbone (+FPN), once per view
    dets  = det.detect(feats, batch)                    # per image, in view coordinates
    kps   = det.keypoint_logits(feats, batch, boxes)    # [R, K, S, S] heatmap logits for given boxes
    msk   = det.mask_probs(feats, batch, boxes, labels) # [R, M, M] soft masks for given boxes
    kp    = det.decode_keypoints(logits, boxes)          # [R, K, 3] (x, y, score) from (fused) logits

and ``predict`` composes them for one plain view, mapping back to original image coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from distill.models.config import ModelConfig
from distill.structures import Detections
from distill.transforms import ResizeFlip, per_orientation


@dataclass
class PreparedBatch:
    """Images of one view, normalised and padded into one tensor."""

    tensor: torch.Tensor  # [B, 3, H, W] padded
    image_sizes: list[tuple[int, int]]  # (h, w) of each image inside the padding
    transforms: list[ResizeFlip]  # original -> view, one per image

    def __len__(self) -> int:
        return len(self.transforms)


@runtime_checkable
class Detector(Protocol):
    """A detector distill can run views through, train and save."""

    config: ModelConfig
    device: torch.device

    @property
    def class_names(self) -> list[str]: ...

    @property
    def has_masks(self) -> bool: ...

    @property
    def has_keypoints(self) -> bool: ...

    def keypoint_flip_indices(self) -> torch.Tensor | None: ...

    def is_keypoint_class(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the labels (contiguous class indices) whose class carries keypoints."""
        ...

    def prepare(
        self,
        images: Sequence[torch.Tensor],
        size: int | None = None,
        flip: bool = False,
        max_size: int | None = None,
    ) -> PreparedBatch:
        """Float RGB images ``[3, H, W]`` in [0, 1] -> one view (shorter side ``size``, longer capped)."""
        ...

    def features(self, batch: PreparedBatch) -> Any: ...

    def detect(
        self,
        feats: Any,
        batch: PreparedBatch,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detections]:
        """Boxes, scores and labels per image in *view* coordinates."""
        ...

    def keypoint_logits(
        self, feats: Any, batch: PreparedBatch, boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Heatmap logits ``[R, K, S, S]`` for the given view-coordinate boxes of each image."""
        ...

    def mask_probs(
        self, feats: Any, batch: PreparedBatch, boxes: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Soft masks ``[R, M, M]`` (probabilities of each box's own class) for the given boxes."""
        ...

    def decode_keypoints(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Heatmap logits ``[R, K, S, S]`` on boxes ``[R, 4]`` -> keypoints ``[R, K, 3]`` (x, y, score), the
        backend's own decoding (sub-pixel convention and score)."""
        ...

    def predict(
        self, images: Sequence[torch.Tensor], *, size: int | None = None, score_thresh: float | None = None
    ) -> list[Detections]:
        """One plain view; detections in original image coordinates."""
        ...

    def save(self, directory: str | Path, *, extra: dict | None = None) -> Path: ...


def predict_plain_view(
    detector: Detector, images: Sequence[torch.Tensor], *, size: int | None, score_thresh: float | None
) -> list[Detections]:
    """``Detector.predict`` from the stages: one view, heads on the detections, original coordinates.

    Keypoints are decoded for detections of keypoint classes (zeros for the others). Landscape and portrait
    images go through the backbone in separate batches (:func:`distill.transforms.per_orientation`), as in
    multi-view inference.
    """
    detector.eval()
    return per_orientation(
        lambda group: _predict_plain_batch(detector, group, size=size, score_thresh=score_thresh), images
    )


def _predict_plain_batch(
    detector: Detector, images: Sequence[torch.Tensor], *, size: int | None, score_thresh: float | None
) -> list[Detections]:
    batch = detector.prepare(images, size=size)
    feats = detector.features(batch)
    dets = detector.detect(feats, batch, score_thresh=score_thresh)
    if detector.has_masks:
        probs = detector.mask_probs(feats, batch, [d.boxes for d in dets], [d.labels for d in dets])
        dets = [d.with_fields(masks=p) for d, p in zip(dets, probs, strict=True)]
    if detector.has_keypoints:
        selected = [detector.is_keypoint_class(d.labels) for d in dets]
        logits = detector.keypoint_logits(
            feats, batch, [d.boxes[s] for d, s in zip(dets, selected, strict=True)]
        )
        num_kp = len(detector.config.keypoint_names)
        with_keypoints = []
        for det, sel, lg in zip(dets, selected, logits, strict=True):
            keypoints = torch.zeros((len(det), num_kp, 3), device=det.boxes.device)
            if len(lg):
                keypoints[sel] = detector.decode_keypoints(lg, det.boxes[sel])
            with_keypoints.append(det.with_fields(keypoints=keypoints))
        dets = with_keypoints
    return [
        d.with_fields(
            boxes=t.inverse_boxes(d.boxes),
            keypoints=None if d.keypoints is None else t.inverse_keypoints(d.keypoints, None),
        )
        for d, t in zip(dets, batch.transforms, strict=True)
    ]
