"""The one detections type used inside distill.

Conventions (stated once, checked on construction):

- boxes are XYXY in absolute pixels of the image they refer to, continuous coordinates
  (pixel ``i`` covers ``[i, i + 1)``); COCO's XYWH appears only at the file edge;
- labels are *contiguous class indices* ``0..C-1`` of the model (``Detector.class_names``), mapped to COCO
  category ids only when exporting;
- keypoints are ``[N, K, 3]`` rows of ``(x, y, score)`` in the same pixel frame as the boxes;
- masks are soft masks ``[N, M, M]`` in [0, 1] *in the frame of their box* (what Mask R-CNN predicts and
  what multi-view fusion averages); they are pasted into the image only at export.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Detections:
    """Detections of one image. All fields have the same length ``N``."""

    boxes: torch.Tensor  # [N, 4] float32 XYXY
    scores: torch.Tensor  # [N] float32
    labels: torch.Tensor  # [N] int64 contiguous class index
    keypoints: torch.Tensor | None = None  # [N, K, 3] (x, y, score)
    masks: torch.Tensor | None = None  # [N, M, M] soft masks in the box frame

    def __post_init__(self) -> None:
        n = self.boxes.shape[0] if self.boxes.dim() == 2 else -1
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"Detections.boxes must be [N, 4], got {tuple(self.boxes.shape)}")
        for name in ("scores", "labels", "keypoints", "masks"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(
                    f"Detections.{name} has {value.shape[0]} rows but boxes has {n}; all fields must match"
                )
        if self.keypoints is not None and (self.keypoints.dim() != 3 or self.keypoints.shape[2] != 3):
            raise ValueError(f"Detections.keypoints must be [N, K, 3], got {tuple(self.keypoints.shape)}")
        if self.masks is not None and self.masks.dim() != 3:
            raise ValueError(f"Detections.masks must be [N, M, M], got {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Detections:
        """No detections."""
        return cls(
            boxes=torch.zeros((0, 4), device=device),
            scores=torch.zeros((0,), device=device),
            labels=torch.zeros((0,), dtype=torch.int64, device=device),
        )

    def index(self, keep: torch.Tensor) -> Detections:
        """The rows selected by a boolean mask or an index tensor."""
        return Detections(
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            labels=self.labels[keep],
            keypoints=None if self.keypoints is None else self.keypoints[keep],
            masks=None if self.masks is None else self.masks[keep],
        )

    def to(self, device: torch.device | str) -> Detections:
        """A copy on ``device``."""
        return Detections(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            keypoints=None if self.keypoints is None else self.keypoints.to(device),
            masks=None if self.masks is None else self.masks.to(device),
        )

    def with_fields(self, **fields: torch.Tensor | None) -> Detections:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **fields)
