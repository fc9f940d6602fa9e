"""The label sets the dashboard browses: a job round's pseudo-labels or a dataset's ground truth, as one
:class:`LabelSet` (images, their annotations, categories, and where the image files are stored), paged,
sorted and filtered for the grid."""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from distill.storage import Storage

PAGE_SIZE = 24
SORTS = ("agreement", "name", "instances")


@dataclass
class LabelSet:
    """``images`` (COCO image dicts, in file order), ``by_image`` (image id → its annotations) and
    ``categories`` (id → COCO category); ``image_key(image)`` is the stored file of an image."""

    images: list[dict[str, Any]]
    by_image: dict[int, list[dict[str, Any]]]
    categories: dict[int, dict[str, Any]]
    image_key: Callable[[dict[str, Any]], str | None] = field(repr=False)

    def image(self, image_id: int) -> dict[str, Any] | None:
        return next((im for im in self.images if im.get("id") == image_id), None)

    def lowest_agreement(self, image_id: int) -> float | None:
        """The lowest view agreement among an image's labels (None: no label carries one)."""
        values = [a.get("agreement") for a in self.by_image.get(image_id, [])]
        finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
        return min(finite) if finite else None

    def page(
        self, *, sort: str, category: int | None, number: int, size: int = PAGE_SIZE
    ) -> tuple[list[dict[str, Any]], int]:
        """One page (1-based) of the images, and how many pages there are. ``category`` keeps the images with
        at least one label of it; ``agreement`` puts the lowest agreement first (images without labels
        last), ``instances`` the most labels first, ``name`` the file order."""
        images = self.images
        if category is not None:
            images = [
                im
                for im in images
                if any(a.get("category_id") == category for a in self.by_image.get(im["id"], []))
            ]
        if sort == "agreement":
            images = sorted(images, key=lambda im: (self.lowest_agreement(im["id"]) is None,
                                                    self.lowest_agreement(im["id"]) or 0.0))  # fmt: skip
        elif sort == "instances":
            images = sorted(images, key=lambda im: -len(self.by_image.get(im["id"], [])))
        pages = max(1, math.ceil(len(images) / size))
        number = min(max(1, number), pages)
        return images[(number - 1) * size : number * size], pages


@lru_cache(maxsize=8)
def _parse(path: str, modified: float, size: int) -> dict[str, Any]:  # keyed on the file's version
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    """A stored JSON file, parsed once per version of it (None: not stored)."""
    if not storage.exists(key):
        return None
    path = storage.local(key)
    stat = path.stat()
    return _parse(str(path), stat.st_mtime, stat.st_size)


def label_set(coco: dict[str, Any], images_dir: str | None) -> LabelSet:
    """A COCO dict's images and annotations; image files under the storage key ``images_dir``."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for annotation in coco.get("annotations") or []:
        by_image.setdefault(annotation.get("image_id"), []).append(annotation)
    categories = {c["id"]: c for c in coco.get("categories") or [] if isinstance(c, dict) and "id" in c}

    def image_key(image: dict[str, Any]) -> str | None:
        name = str(image.get("file_name") or "")
        if images_dir is None or not name or name.startswith("/") or ".." in name.split("/"):
            return None
        return posixpath.join(images_dir, name)

    return LabelSet(list(coco.get("images") or []), by_image, categories, image_key)


def pseudo_labels(storage: Storage, job_id: int, spec: dict[str, Any], round_number: int) -> LabelSet | None:
    """Round ``round_number``'s pseudo-labels of job ``job_id`` over its unlabeled images (None: not written
    yet). Their categories are the labeled dataset's when the pseudo file names none."""
    coco = read_json(storage, f"jobs/{job_id}/round_{round_number}/pseudo.json")
    if coco is None:
        return None
    data = (spec.get("config") or {}).get("data") or {}
    labels = label_set(coco, data.get("unlabeled_images"))
    if not labels.categories and data.get("labeled"):
        labeled = read_json(storage, data["labeled"]) or {}
        labels.categories = label_set(labeled, None).categories
    return labels
