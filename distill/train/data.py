"""COCO annotations -> torchvision R-CNN training targets, and the horizontal-flip augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data.coco import CocoDataset, decode_segmentation
from distill.data.images import load_image
from distill.errors import InputError
from distill.models.config import ModelConfig

Target = dict[str, torch.Tensor]


def image_to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB image -> float tensor ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoDetectionDataset(Dataset):
    """Images and R-CNN targets of a COCO dataset, in the label space of a :class:`ModelConfig`.

    Crowd regions and boxes under 1 px are left out of the targets (torchvision R-CNN cannot ignore regions);
    images left without annotations stay in the dataset as negatives unless ``keep_empty`` is false.
    Annotations of categories the model does not know raise :class:`InputError`.
    """

    def __init__(
        self, dataset: CocoDataset, images_dir: str | Path, config: ModelConfig, *, keep_empty: bool = True
    ) -> None:
        self.dataset = dataset
        self.images_dir = Path(images_dir)
        self.config = config
        self._class_of = {cat_id: i + 1 for i, cat_id in enumerate(config.category_ids)}
        self._keypoint_cats = set(config.keypoint_category_ids)
        by_image = dataset.annotations_by_image()
        self.records: list[tuple[dict, list[dict]]] = []
        for image in dataset.images:
            anns = [a for a in by_image[image["id"]] if self._usable(a)]
            if anns or keep_empty:
                self.records.append((image, anns))
        if not self.records:
            raise InputError(f"{dataset.source}: no training images (all images lack usable annotations)")

    def _usable(self, ann: dict) -> bool:
        if ann["category_id"] not in self._class_of:
            raise InputError(
                f"{self.dataset.source}: annotation {ann['id']} has category_id {ann['category_id']}, "
                "which the "
                f"model does not know (its category_ids: {self.config.category_ids})"
            )
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_info, anns = self.records[index]
        image = image_to_tensor(load_image(self.images_dir / image_info["file_name"]))
        return image, self.target(image_info, anns, height=image.shape[1], width=image.shape[2])

    def target(self, image_info: dict, anns: list[dict], *, height: int, width: int) -> Target:
        """The torchvision target dict of one image."""
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([self._class_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_info["id"]),
        }
        if self.config.masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, ann in enumerate(anns):
                if ann.get("segmentation"):
                    masks[i] = decode_segmentation(ann["segmentation"], height, width)
                else:  # no outline given: the box is the best mask we have
                    x1, y1, x2, y2 = boxes[i].round().int().tolist()
                    masks[i, y1:y2, x1:x2] = 1
            target["masks"] = torch.from_numpy(masks)
        if self.config.has_keypoints:
            num_kp = len(self.config.keypoint_names)
            keypoints = torch.zeros((len(anns), num_kp, 3), dtype=torch.float32)
            for i, ann in enumerate(anns):
                if ann["category_id"] in self._keypoint_cats and ann.get("keypoints"):
                    keypoints[i] = torch.tensor(ann["keypoints"], dtype=torch.float32).reshape(num_kp, 3)
            target["keypoints"] = keypoints
        return target


def hflip(image: torch.Tensor, target: Target, flip_indices: list[int] | None) -> tuple[torch.Tensor, Target]:
    """Mirror an image and its target; keypoints move (x -> W - x) *and* swap left/right channels."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0] = width - target["boxes"][:, 2]
    boxes[:, 2] = width - target["boxes"][:, 0]
    out["boxes"] = boxes
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kps = target["keypoints"].clone()
        kps[..., 0] = torch.where(kps[..., 2] > 0, width - kps[..., 0], kps[..., 0])
        if flip_indices is not None:
            kps = kps[:, flip_indices]
        out["keypoints"] = kps
    return image.flip(-1), out
