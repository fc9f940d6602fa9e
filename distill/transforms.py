"""Geometric transforms that carry their own inverse.

A view of an image is "flip horizontally (optional), then resize by (sx, sy)". Predictions made in the view
are mapped back with :meth:`ResizeFlip.inverse_boxes` / :meth:`ResizeFlip.inverse_keypoints`. Coordinates are
continuous pixels, so a horizontal flip maps ``x -> W - x`` (and a box ``[x1, x2] -> [W - x2, W - x1]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def orientation_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the landscape (``W >= H``) and of the portrait images, each group in input order.

    Every image of a view is resized to the same shorter side, so images of one orientation pad to a batch
    only as long as the most elongated of them, while a portrait and a landscape image pad each other to a
    square of their long sides: 1.33-1.5x the pixels for 4:3 photos (detectron2 groups its training batches
    by aspect ratio for the same reason).
    """
    landscape = [i for i, image in enumerate(images) if image.shape[-1] >= image.shape[-2]]
    portrait = [i for i, image in enumerate(images) if image.shape[-1] < image.shape[-2]]
    return [group for group in (landscape, portrait) if group]


def per_orientation(fn: Callable[[list[torch.Tensor]], list[T]], images: Sequence[torch.Tensor]) -> list[T]:
    """``fn`` (images -> one result per image) run on each :func:`orientation_groups` group; the results come
    back in input order."""
    groups = orientation_groups(images)
    if len(groups) == 1:
        return fn(list(images))
    out: list[T | None] = [None] * len(images)
    for group in groups:
        for index, result in zip(group, fn([images[i] for i in group]), strict=True):
            out[index] = result
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class ResizeFlip:
    """Flip (optional) then resize from ``(height, width)`` to ``(out_height, out_width)``."""

    height: int
    width: int
    out_height: int
    out_width: int
    flip: bool = False

    def _inverse_ratios(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 (original / view) ratios, computed exactly as torchvision's postprocess does
        def ratio(orig: int, new: int) -> torch.Tensor:
            return torch.tensor(orig, dtype=torch.float32, device=like.device) / torch.tensor(
                new, dtype=torch.float32, device=like.device
            )

        return ratio(self.width, self.out_width), ratio(self.height, self.out_height)

    def apply_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Original-image XYXY boxes ``[N, 4]`` -> view coordinates."""
        rx, ry = self._inverse_ratios(boxes)
        out = boxes.clone()
        if self.flip:
            out[:, 0] = self.width - boxes[:, 2]
            out[:, 2] = self.width - boxes[:, 0]
        out[:, 0::2] /= rx
        out[:, 1::2] /= ry
        return out

    def inverse_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """View XYXY boxes ``[N, 4]`` -> original-image coordinates."""
        rx, ry = self._inverse_ratios(boxes)
        out = boxes.clone()
        out[:, 0::2] *= rx
        out[:, 1::2] *= ry
        if self.flip:
            x1 = self.width - out[:, 2]
            x2 = self.width - out[:, 0]
            out[:, 0] = x1
            out[:, 2] = x2
        return out

    def inverse_keypoints(self, keypoints: torch.Tensor, flip_indices: torch.Tensor | None) -> torch.Tensor:
        """View keypoints ``[N, K, 3]`` -> original coordinates; a flipped view also swaps left/right.

        ``flip_indices[k]`` is the keypoint that ``k`` becomes under a horizontal flip.
        """
        rx, ry = self._inverse_ratios(keypoints)
        out = keypoints.clone()
        out[..., 0] *= rx
        out[..., 1] *= ry
        if self.flip:
            out[..., 0] = self.width - out[..., 0]
            if flip_indices is not None:
                out = out[:, flip_indices]
        return out
