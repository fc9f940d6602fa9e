"""Detections (library convention) -> COCO results entries: XYWH boxes, RLE masks, category ids."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from distill.data.coco import encode_mask
from distill.models.config import ModelConfig
from distill.structures import Detections


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Box-frame soft masks ``[N, M, M]`` -> image-size soft masks ``[N, H, W]``."""
    if len(masks) == 0:
        return torch.zeros((0, height, width), device=masks.device)
    return paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0]


def detections_to_coco(
    det: Detections,
    *,
    image_id: int,
    height: int,
    width: int,
    config: ModelConfig,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """COCO results for one image: bbox + score always; keypoints for keypoint categories; RLE masks."""
    det = det.to("cpu")
    boxes = det.boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    category_ids = [config.category_ids[i] for i in det.labels.tolist()]
    keypoint_cats = set(config.keypoint_category_ids)
    binary = None
    if det.masks is not None:
        binary = (paste_masks(det.masks, boxes, height, width) >= mask_threshold).numpy().astype(np.uint8)
    results = []
    for i, (box, score, cat) in enumerate(
        zip(boxes.tolist(), det.scores.tolist(), category_ids, strict=True)
    ):
        entry: dict = {
            "image_id": int(image_id),
            "category_id": int(cat),
            "bbox": [
                round(box[0], 2),
                round(box[1], 2),
                round(box[2] - box[0], 2),
                round(box[3] - box[1], 2),
            ],
            "score": round(float(score), 5),
        }
        if det.keypoints is not None and cat in keypoint_cats:
            entry["keypoints"] = [round(float(v), 2) for v in det.keypoints[i].reshape(-1).tolist()]
        if binary is not None:
            entry["segmentation"] = encode_mask(binary[i])
        results.append(entry)
    return results
