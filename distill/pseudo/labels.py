"""The pseudo-label file: hard labels for the unlabeled images as a COCO dataset, with provenance.

One annotation per kept prediction (score at or above its class's calibrated threshold, agreement at or above
the calibration's ``min_agreement``): ``bbox``, ``area``,
RLE ``segmentation`` when the prediction has a mask, and for keypoint categories ``keypoints`` with ``v=2``
where the keypoint's score clears the keypoint threshold and ``0, 0, 0`` where it does not, plus
``num_keypoints``. Each annotation keeps the prediction's ``score`` and ``agreement``. Every unlabeled image
is listed, with or without instances (an image with none is a negative for the student).

Ids cannot collide with the labeled set: annotation ids start after the labeled file's largest one, and if
any unlabeled image id is also a labeled image id, every unlabeled image id is shifted by
``max(labeled image id)`` (recorded as ``info.image_id_offset``; the predictions' ids are the unshifted ones).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from distill import __version__
from distill.data.coco import CocoDataset, rle_for_pycocotools, validate_coco
from distill.errors import InputError
from distill.pseudo.calibrate import Calibration


def build_pseudo_labels(
    predictions: Sequence[dict[str, Any]],
    *,
    images: Sequence[dict[str, Any]],
    labeled: CocoDataset,
    calibration: Calibration,
    provenance: dict[str, Any] | None = None,
    source: str = "predictions",
) -> dict[str, Any]:
    """A validated COCO dict of the kept predictions on ``images`` (COCO image entries with width/height)."""
    categories = {c["id"]: c for c in labeled.categories}
    unknown = sorted({int(p["category_id"]) for p in predictions} - set(categories))
    if unknown:
        raise InputError(
            f"{source}: category ids {unknown[:10]} are not categories of {labeled.source} "
            f"(its ids: {sorted(categories)[:10]})"
        )
    labeled_image_ids = {im["id"] for im in labeled.images}
    offset = 0
    if any(im["id"] in labeled_image_ids for im in images):
        offset = max(labeled_image_ids)
    next_ann_id = max((a["id"] for a in labeled.annotations), default=0) + 1
    image_ids = {im["id"] for im in images}
    keypoint_cats = {c["id"] for c in labeled.keypoint_categories()}

    annotations = []
    for p in predictions:
        if p["image_id"] not in image_ids:
            continue
        category_id = int(p["category_id"])
        if float(p["score"]) < calibration.threshold_for(category_id):
            continue
        if not calibration.admits_agreement(p):
            continue  # calibration counted without it: writing it would break the calibrated density
        ann = _annotation(p, category_id in keypoint_cats, calibration.keypoint_thresholds.get(category_id))
        ann["id"] = next_ann_id
        ann["image_id"] = int(p["image_id"]) + offset
        next_ann_id += 1
        annotations.append(ann)

    info = {
        "description": "distill pseudo-labels",
        "date_created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "distill_version": __version__,
        "image_id_offset": offset,
        "calibration": {
            "mode": calibration.mode,
            "threshold": _finite(calibration.threshold),
            "class_thresholds": {str(k): _finite(v) for k, v in calibration.class_thresholds.items()},
            "keypoint_thresholds": {str(k): _finite(v) for k, v in calibration.keypoint_thresholds.items()},
            "min_agreement": calibration.min_agreement,
            "labeled_instances_per_image": calibration.labeled_instances_per_image,
            "kept_per_image": calibration.kept_per_image,
        },
        "counts": {"images": len(images), "annotations": len(annotations)},
        **(provenance or {}),
    }
    data = {
        "info": info,
        "images": [{**im, "id": im["id"] + offset} for im in images],
        "annotations": annotations,
        "categories": [dict(c) for c in labeled.categories],
    }
    validate_coco(data, source="pseudo-labels")
    return data


def _annotation(p: dict[str, Any], is_keypoint_cat: bool, kp_threshold: float | None) -> dict[str, Any]:
    x, y, w, h = (float(v) for v in p["bbox"])
    ann: dict[str, Any] = {
        "category_id": int(p["category_id"]),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
        "score": float(p["score"]),
    }
    if "agreement" in p:
        ann["agreement"] = float(p["agreement"])
    segmentation = p.get("segmentation")
    if isinstance(segmentation, dict):
        ann["segmentation"] = segmentation
        ann["area"] = float(mask_utils.area(rle_for_pycocotools(segmentation)))
    else:
        ann["area"] = w * h
    if is_keypoint_cat and p.get("keypoints"):
        values = np.asarray(p["keypoints"], dtype=np.float64).reshape(-1, 3)
        threshold = math.inf if kp_threshold is None else kp_threshold
        visible = values[:, 2] >= threshold
        out = np.zeros_like(values)
        out[visible, :2] = values[visible, :2]
        out[visible, 2] = 2
        ann["keypoints"] = [round(float(v), 2) for v in out.ravel()]
        ann["num_keypoints"] = int(visible.sum())
    return ann


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value
