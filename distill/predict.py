"""Plain (single-view) batched inference over an image source, streaming COCO results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from distill.data.images import ImageRef, decode_images
from distill.export import detections_to_coco
from distill.hooks import NULL_CONTEXT, StepContext
from distill.models.base import Detector
from distill.structures import Detections
from distill.train.data import image_to_tensor


@dataclass
class Skipped:
    """An image that could not be decoded, and why."""

    path: str
    reason: str


def iter_predictions(
    detector: Detector,
    refs: Sequence[ImageRef],
    *,
    batch_size: int = 4,
    size: int | None = None,
    score_thresh: float | None = None,
    skipped: list[Skipped] | None = None,
    context: StepContext = NULL_CONTEXT,
    stage: str = "predict",
) -> Iterator[tuple[ImageRef, int, int, Detections]]:
    """``(ref, height, width, detections)`` per decodable image, in order; bad files go to ``skipped``.

    Reports ``stage`` progress (images decoded) and checks ``context`` for a cancel before each batch.
    """
    batch: list[tuple[ImageRef, torch.Tensor]] = []

    def flush() -> Iterator[tuple[ImageRef, int, int, Detections]]:
        context.check_cancelled(f"{stage} after {done} of {len(refs)} images")
        dets = detector.predict([t for _, t in batch], size=size, score_thresh=score_thresh)
        for (ref, tensor), det in zip(batch, dets, strict=True):
            yield ref, int(tensor.shape[1]), int(tensor.shape[2]), det
        batch.clear()

    done = 0
    for done, (ref, image, error) in enumerate(decode_images(refs), start=1):
        if image is None:
            if skipped is not None:
                skipped.append(Skipped(ref.path, error or "unreadable"))
        else:
            batch.append((ref, image_to_tensor(image)))
            if len(batch) == batch_size:
                yield from flush()
        context.report(stage, done, len(refs))
    if batch:
        yield from flush()


def predict_coco(
    detector: Detector,
    refs: Sequence[ImageRef],
    **kwargs,
) -> list[dict]:
    """COCO results for every decodable image (image ids from the refs)."""
    results: list[dict] = []
    for ref, height, width, det in iter_predictions(detector, refs, **kwargs):
        if ref.image_id is None:
            raise ValueError(f"{ref.path}: image has no id; predict from a COCO file or a folder")
        results.extend(
            detections_to_coco(det, image_id=ref.image_id, height=height, width=width, config=detector.config)
        )
    return results
