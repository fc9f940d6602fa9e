"""COCO datasets and results: loading, validation, saving, statistics and box/mask converters.

A dataset is kept as the plain COCO dict (whatever extra keys it carries survive a load/save round trip
unchanged) inside a thin :class:`CocoDataset` wrapper. Validation stops at the first problem and raises
:class:`~distill.errors.CocoFormatError` naming the JSON path of the bad value, e.g.
``annotations[17].keypoints: expected 51 numbers (17 x 3), got 50``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from distill.errors import CocoFormatError
from distill.io import write_json_atomic

__all__ = [
    "CocoDataset",
    "CocoStats",
    "coco_statistics",
    "decode_segmentation",
    "encode_mask",
    "load_coco",
    "load_results",
    "rle_for_pycocotools",
    "save_coco",
    "validate_coco",
    "validate_results",
]

MEMORY_SOURCE = "<memory>"


# --------------------------------------------------------------------------------------------------
# The dataset wrapper
# --------------------------------------------------------------------------------------------------


class CocoDataset:
    """A COCO dataset kept as its plain JSON dict.

    The constructor does not validate (use :meth:`from_dict` or :func:`load_coco` for that). The
    lookup properties are computed on each access: bind them to a local name inside loops.
    """

    def __init__(self, data: dict[str, Any], source: str = MEMORY_SOURCE) -> None:
        self.data = data
        self.source = source

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MEMORY_SOURCE) -> CocoDataset:
        """Validate ``data`` (raising :class:`CocoFormatError`) and wrap it."""
        validate_coco(data, source)
        return cls(data, source)

    @property
    def images(self) -> list[dict[str, Any]]:
        """The ``images`` list."""
        return self.data.get("images") or []

    @property
    def annotations(self) -> list[dict[str, Any]]:
        """The ``annotations`` list (empty for an image-only file)."""
        return self.data.get("annotations") or []

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The ``categories`` list (empty when absent)."""
        return self.data.get("categories") or []

    @property
    def image_by_id(self) -> dict[int, dict[str, Any]]:
        """Images keyed by id."""
        return {image["id"]: image for image in self.images}

    @property
    def category_by_id(self) -> dict[int, dict[str, Any]]:
        """Categories keyed by id."""
        return {category["id"]: category for category in self.categories}

    def annotations_by_image(self) -> dict[int, list[dict[str, Any]]]:
        """Annotations grouped by image id; every image id is a key, possibly with an empty list."""
        grouped: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in self.images}
        for annotation in self.annotations:
            grouped.setdefault(annotation["image_id"], []).append(annotation)
        return grouped

    def keypoint_categories(self) -> list[dict[str, Any]]:
        """The categories that define a non-empty ``keypoints`` list."""
        return [category for category in self.categories if category.get("keypoints")]

    def __repr__(self) -> str:
        return (
            f"CocoDataset(source={self.source!r}, images={len(self.images)}, "
            f"annotations={len(self.annotations)}, categories={len(self.categories)})"
        )


# --------------------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _all_finite(values: list[Any]) -> bool:
    """Fast path for long coordinate lists; exact per-element checks happen only when it fails."""
    try:
        return {type(v) for v in values} <= {int, float} and math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return f"the string {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _decode_rle_string(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, as in pycocotools' ``rleFrString``)."""
    result: list[int] = []
    position = 0
    length = len(counts)
    while position < length:
        value = 0
        shift = 0
        more = True
        while more:
            if position >= length:
                raise ValueError("the string ends in the middle of a run length")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"invalid character {counts[position]!r} at position {position}")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(result) > 2:
            value += result[-2]
        result.append(value)
    return result


class _Checker:
    """Raises :class:`CocoFormatError` for one source; shared by the dataset and results validators."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str, hint: str = "") -> NoReturn:
        raise CocoFormatError(self.source, field, problem, hint)

    def obj(self, value: Any, field: str, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"expected {what} (a JSON object), got {_describe(value)}")
        return value

    def lst(self, value: Any, field: str, hint: str = "") -> list[Any]:
        if not isinstance(value, list):
            self.fail(field, f"expected a list, got {_describe(value)}", hint)
        return value

    def required(self, record: dict[str, Any], key: str, field: str, hint: str = "") -> Any:
        if key not in record:
            self.fail(f"{field}.{key}", "missing required key", hint)
        return record[key]

    def integer(self, value: Any, field: str, hint: str = "") -> int:
        if not _is_int(value):
            self.fail(field, f"expected an integer, got {_describe(value)}", hint)
        return value

    def positive_int(self, value: Any, field: str) -> int:
        self.integer(value, field, "image sizes are whole pixel counts")
        if value <= 0:
            self.fail(
                field, f"expected a positive integer, got {value}", "image sizes are whole pixel counts"
            )
        return value

    def finite(self, value: Any, field: str, hint: str = "") -> float:
        if not _is_number(value):
            self.fail(field, f"expected a number, got {_describe(value)}", hint)
        if not math.isfinite(value):
            self.fail(field, f"expected a finite number, got {value!r}", hint)
        return value

    def finite_list(self, values: list[Any], field: str, hint: str = "") -> None:
        if _all_finite(values):
            return
        for index, value in enumerate(values):
            self.finite(value, f"{field}[{index}]", hint)

    def bbox(self, value: Any, field: str) -> None:
        hint = "a box is [x, y, width, height] in pixels"
        box = self.lst(value, field, hint)
        if len(box) != 4:
            self.fail(field, f"expected 4 numbers, got {len(box)}", hint)
        self.finite_list(box, field, hint)
        for index, name in ((2, "width"), (3, "height")):
            if box[index] < 0:
                self.fail(f"{field}[{index}]", f"negative box {name} {box[index]!r}", hint)

    def rle(self, value: dict[str, Any], field: str, image: dict[str, Any] | None) -> None:
        hint = "RLE is {'size': [height, width], 'counts': compressed string or list of run lengths}"
        size = self.required(value, "size", field, hint)
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
            self.fail(
                f"{field}.size", f"expected [height, width] as two positive integers, got {size!r}", hint
            )
        height, width = size
        if image is not None and (height, width) != (image["height"], image["width"]):
            self.fail(
                f"{field}.size",
                f"mask size [{height}, {width}] does not match the image's height x width "
                f"[{image['height']}, {image['width']}]",
                f"image id {image['id']}; RLE size is [height, width], not [width, height]",
            )
        counts = self.required(value, "counts", field, hint)
        if isinstance(counts, str):
            try:
                runs = _decode_rle_string(counts)
            except ValueError as error:
                self.fail(f"{field}.counts", f"invalid compressed RLE string: {error}", hint)
            if any(run < 0 for run in runs):
                self.fail(f"{field}.counts", "compressed RLE decodes to a negative run length", hint)
        elif isinstance(counts, list):
            runs = counts
            if not ({type(c) for c in runs} <= {int} and all(c >= 0 for c in runs)):
                for index, run in enumerate(runs):
                    if not _is_int(run) or run < 0:
                        self.fail(
                            f"{field}.counts[{index}]",
                            f"expected a non-negative integer run length, got {_describe(run)}",
                            hint,
                        )
        else:
            self.fail(
                f"{field}.counts", f"expected a string or a list of integers, got {_describe(counts)}", hint
            )
        total = sum(runs)
        if total != height * width:
            self.fail(
                f"{field}.counts",
                f"run lengths sum to {total}, expected {height} x {width} = {height * width}",
                hint,
            )

    def polygons(self, value: list[Any], field: str) -> None:
        hint = "polygon segmentation is a list of [x1, y1, x2, y2, ...] lists with at least 3 points each"
        for index, polygon in enumerate(value):
            path = f"{field}[{index}]"
            points = self.lst(polygon, path, hint)
            if len(points) % 2:
                self.fail(path, f"expected an even number of coordinates, got {len(points)}", hint)
            if len(points) < 6:
                self.fail(path, f"expected at least 6 coordinates (3 points), got {len(points)}", hint)
            self.finite_list(points, path, hint)

    def segmentation(self, value: Any, field: str, image: dict[str, Any] | None) -> None:
        if isinstance(value, list):
            self.polygons(value, field)
        elif isinstance(value, dict):
            self.rle(value, field, image)
        else:
            self.fail(
                field,
                f"expected a list of polygons or an RLE object, got {_describe(value)}",
                "use [] for an annotation without a mask",
            )


def _category_label(category: dict[str, Any]) -> str:
    return f"category {category['id']} ({category.get('name')!r})"


# --------------------------------------------------------------------------------------------------
# Dataset validation
# --------------------------------------------------------------------------------------------------


def validate_coco(data: Any, source: str = MEMORY_SOURCE) -> None:
    """Check a COCO dataset dict, raising :class:`CocoFormatError` on the first problem found.

    ``annotations`` may be absent (an unlabeled, image-only file); ``categories`` is then optional too,
    but required as soon as there is an annotation.
    """
    check = _Checker(source)
    images, categories, annotations = _check_top_level(check, data)
    image_by_id = _check_images(check, images)
    category_by_id = _check_categories(check, categories)
    _check_annotations(check, annotations, image_by_id, category_by_id)


def _check_top_level(check: _Checker, data: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Check the top-level object and its lists; return ``(images, categories, annotations)``."""
    if not isinstance(data, dict):
        check.fail(
            "", f"expected a JSON object at the top level, got {_describe(data)}", "a COCO dataset is {...}"
        )
    if "images" not in data:
        check.fail("images", "missing required key", "a COCO dataset needs an 'images' list")
    images = check.lst(data["images"], "images")
    annotations = check.lst(data["annotations"], "annotations") if "annotations" in data else []
    if "categories" in data:
        categories = check.lst(data["categories"], "categories")
    elif annotations:
        check.fail(
            "categories",
            f"missing required key ({len(annotations)} annotations refer to categories)",
            "add a 'categories' list with an {'id', 'name'} entry per category",
        )
    else:
        categories = []
    return images, categories, annotations


def _check_unique_id(
    check: _Checker, record: dict[str, Any], field: str, seen: dict[int, str], kind: str, rule: str
) -> int:
    """Check that ``record['id']`` is an integer not in ``seen`` (id -> field path), then add it there."""
    record_id = check.integer(check.required(record, "id", field), f"{field}.id")
    if record_id in seen:
        check.fail(
            f"{field}.id", f"duplicate {kind} id {record_id}", f"already used by {seen[record_id]}; {rule}"
        )
    seen[record_id] = field
    return record_id


def _check_images(check: _Checker, images: list[Any]) -> dict[int, dict[str, Any]]:
    """Check every image entry; return the images keyed by id."""
    image_by_id: dict[int, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for index, raw in enumerate(images):
        field = f"images[{index}]"
        image = check.obj(raw, field, "an image")
        image_id = _check_unique_id(check, image, field, seen, "image", "image ids must be unique")
        file_name = check.required(image, "file_name", field)
        if not isinstance(file_name, str) or not file_name:
            check.fail(f"{field}.file_name", f"expected a non-empty string, got {_describe(file_name)}")
        for key in ("width", "height"):
            check.positive_int(check.required(image, key, field), f"{field}.{key}")
        image_by_id[image_id] = image
    return image_by_id


def _check_categories(check: _Checker, categories: list[Any]) -> dict[int, dict[str, Any]]:
    """Check every category entry; return the categories keyed by id."""
    category_by_id: dict[int, dict[str, Any]] = {}
    seen: dict[int, str] = {}
    for index, raw in enumerate(categories):
        field = f"categories[{index}]"
        category = check.obj(raw, field, "a category")
        category_id = _check_unique_id(
            check, category, field, seen, "category", "category ids must be unique"
        )
        name = check.required(category, "name", field)
        if not isinstance(name, str):
            check.fail(f"{field}.name", f"expected a string, got {_describe(name)}")
        num_keypoints = _check_keypoint_names(check, category, field)
        if "skeleton" in category:
            _check_skeleton(check, category["skeleton"], f"{field}.skeleton", num_keypoints)
        category_by_id[category_id] = category
    return category_by_id


def _check_keypoint_names(check: _Checker, category: dict[str, Any], field: str) -> int:
    """Check the category's optional ``keypoints`` name list; return its length (0 when absent)."""
    if "keypoints" not in category:
        return 0
    names = check.lst(category["keypoints"], f"{field}.keypoints", "a list of keypoint names")
    for k, keypoint_name in enumerate(names):
        if not isinstance(keypoint_name, str):
            check.fail(
                f"{field}.keypoints[{k}]",
                f"expected a keypoint name string, got {_describe(keypoint_name)}",
            )
    return len(names)


def _check_skeleton(check: _Checker, value: Any, field: str, num_keypoints: int) -> None:
    """Check a category's ``skeleton``: a list of [a, b] pairs of 1-based keypoint indices."""
    hint = f"skeleton entries are [a, b] pairs of 1-based keypoint indices (1..{num_keypoints})"
    skeleton = check.lst(value, field, hint)
    for k, pair in enumerate(skeleton):
        path = f"{field}[{k}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            check.fail(path, f"expected a pair [a, b], got {_describe(pair)}", hint)
        for end in pair:
            check.integer(end, path, hint)
            if not 1 <= end <= num_keypoints:
                check.fail(path, f"keypoint index {end} is out of range 1..{num_keypoints}", hint)


def _check_annotations(
    check: _Checker,
    annotations: list[Any],
    image_by_id: dict[int, dict[str, Any]],
    category_by_id: dict[int, dict[str, Any]],
) -> None:
    """Check every annotation entry, including that its image and category ids exist."""
    seen: dict[int, str] = {}
    for index, raw in enumerate(annotations):
        field = f"annotations[{index}]"
        annotation = check.obj(raw, field, "an annotation")
        _check_unique_id(check, annotation, field, seen, "annotation", "ids must be unique")
        image = _referenced_image(check, annotation, field, image_by_id)
        category = _referenced_category(check, annotation, field, category_by_id)
        _check_annotation_fields(check, annotation, field, image, category)


def _referenced_image(
    check: _Checker, annotation: dict[str, Any], field: str, image_by_id: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Return the image the annotation's ``image_id`` refers to, failing on a dangling id."""
    image_id = check.integer(check.required(annotation, "image_id", field), f"{field}.image_id")
    if image_id not in image_by_id:
        check.fail(
            f"{field}.image_id",
            f"no image with id {image_id}",
            "every annotation must refer to an entry of 'images'",
        )
    return image_by_id[image_id]


def _referenced_category(
    check: _Checker, annotation: dict[str, Any], field: str, category_by_id: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Return the category the annotation's ``category_id`` refers to, failing on an unknown id."""
    category_id = check.integer(check.required(annotation, "category_id", field), f"{field}.category_id")
    if category_id not in category_by_id:
        known = sorted(category_by_id)
        shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
        check.fail(
            f"{field}.category_id",
            f"unknown category id {category_id}",
            f"known category ids: {shown}" if known else "'categories' is empty",
        )
    return category_by_id[category_id]


def _check_annotation_fields(
    check: _Checker,
    annotation: dict[str, Any],
    field: str,
    image: dict[str, Any],
    category: dict[str, Any],
) -> None:
    """Check an annotation's bbox, area, iscrowd, keypoints and segmentation, in that order."""
    check.bbox(check.required(annotation, "bbox", field, "a box is [x, y, width, height]"), f"{field}.bbox")
    if "area" in annotation:
        area = check.finite(annotation["area"], f"{field}.area")
        if area < 0:
            check.fail(f"{field}.area", f"expected a non-negative area, got {area!r}")
    if "iscrowd" in annotation:
        iscrowd = annotation["iscrowd"]
        if not (_is_int(iscrowd) and iscrowd in (0, 1)):
            check.fail(f"{field}.iscrowd", f"expected 0 or 1, got {_describe(iscrowd)}")
    _check_gt_keypoints(check, annotation, category, field)
    if "segmentation" in annotation:
        check.segmentation(annotation["segmentation"], f"{field}.segmentation", image)


def _check_gt_keypoints(
    check: _Checker, annotation: dict[str, Any], category: dict[str, Any], field: str
) -> None:
    names = category.get("keypoints") or []
    if "keypoints" not in annotation:
        if "num_keypoints" in annotation:
            num = check.integer(annotation["num_keypoints"], f"{field}.num_keypoints")
            if num != 0:
                check.fail(f"{field}.num_keypoints", f"is {num} but the annotation has no 'keypoints'")
        return
    keypoints = check.lst(
        annotation["keypoints"], f"{field}.keypoints", "keypoints are [x1, y1, v1, x2, y2, v2, ...]"
    )
    if not names:
        if not keypoints:
            return
        check.fail(
            f"{field}.keypoints",
            f"{_category_label(category)} defines no keypoints, yet the annotation has {len(keypoints)}",
            "add a 'keypoints' name list to the category or remove the annotation's keypoints",
        )
    expected = 3 * len(names)
    if len(keypoints) != expected:
        check.fail(
            f"{field}.keypoints",
            f"expected {expected} numbers ({len(names)} x 3), got {len(keypoints)}",
            f"{_category_label(category)} has {len(names)} keypoints, each stored as x, y, visibility",
        )
    check.finite_list(keypoints, f"{field}.keypoints")
    visible = 0
    for k in range(len(names)):
        v = keypoints[3 * k + 2]
        if v not in (0, 1, 2):
            check.fail(
                f"{field}.keypoints[{3 * k + 2}]",
                f"visibility of keypoint {k + 1} ({names[k]!r}) is {v!r}, expected 0, 1 or 2",
                "0 = not labeled, 1 = labeled but not visible, 2 = labeled and visible",
            )
        if v > 0:
            visible += 1
    if "num_keypoints" in annotation:
        num = check.integer(annotation["num_keypoints"], f"{field}.num_keypoints")
        if num != visible:
            check.fail(
                f"{field}.num_keypoints",
                f"is {num} but {visible} keypoints have visibility > 0",
                "num_keypoints counts the keypoints with v = 1 or v = 2",
            )


# --------------------------------------------------------------------------------------------------
# Results validation
# --------------------------------------------------------------------------------------------------


def validate_results(results: Any, source: str = MEMORY_SOURCE, dataset: CocoDataset | None = None) -> None:
    """Check a COCO results list (detections with ``image_id``, ``category_id``, ``score`` and at least
    one of ``bbox`` / ``keypoints`` / ``segmentation``), raising :class:`CocoFormatError` on the first
    problem. With ``dataset`` the ids must exist in it and keypoint lengths match the category.
    """
    check = _Checker(source)
    if not isinstance(results, list):
        check.fail("", f"expected a JSON list of detections at the top level, got {_describe(results)}")
    image_by_id = dataset.image_by_id if dataset is not None else None
    category_by_id = dataset.category_by_id if dataset is not None else None
    for index, raw in enumerate(results):
        field = f"[{index}]"
        result = check.obj(raw, field, "a detection")
        image_id = check.integer(check.required(result, "image_id", field), f"{field}.image_id")
        image = None
        if image_by_id is not None:
            if image_id not in image_by_id:
                check.fail(
                    f"{field}.image_id",
                    f"no image with id {image_id} in {dataset.source}",
                    "results must refer to images of the dataset they are evaluated against",
                )
            image = image_by_id[image_id]
        category_id = check.integer(check.required(result, "category_id", field), f"{field}.category_id")
        category = None
        if category_by_id is not None:
            if category_id not in category_by_id:
                check.fail(
                    f"{field}.category_id",
                    f"unknown category id {category_id}",
                    f"known category ids: {sorted(category_by_id)[:10]}",
                )
            category = category_by_id[category_id]
        check.finite(
            check.required(result, "score", field, "every detection needs a confidence score"),
            f"{field}.score",
        )
        if not any(key in result for key in ("bbox", "keypoints", "segmentation")):
            check.fail(field, "a detection needs at least one of 'bbox', 'keypoints' or 'segmentation'")
        if "bbox" in result:
            check.bbox(result["bbox"], f"{field}.bbox")
        if "keypoints" in result:
            _check_result_keypoints(check, result["keypoints"], category, f"{field}.keypoints")
        if "segmentation" in result:
            segmentation = result["segmentation"]
            if not isinstance(segmentation, dict):
                check.fail(
                    f"{field}.segmentation",
                    f"expected an RLE object, got {_describe(segmentation)}",
                    "encode result masks with distill.data.coco.encode_mask",
                )
            check.rle(segmentation, f"{field}.segmentation", image)


def _check_result_keypoints(check: _Checker, value: Any, category: dict[str, Any] | None, field: str) -> None:
    hint = "result keypoints are [x1, y1, score1, x2, y2, score2, ...]"
    keypoints = check.lst(value, field, hint)
    if category is not None:
        names = category.get("keypoints") or []
        if not names:
            check.fail(field, f"{_category_label(category)} defines no keypoints", hint)
        if len(keypoints) != 3 * len(names):
            check.fail(
                field,
                f"expected {3 * len(names)} numbers ({len(names)} x 3), got {len(keypoints)}",
                f"{_category_label(category)} has {len(names)} keypoints",
            )
    elif not keypoints or len(keypoints) % 3:
        check.fail(field, f"expected a non-empty multiple of 3 numbers, got {len(keypoints)}", hint)
    check.finite_list(keypoints, field, hint)


# --------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike[str], what: str) -> tuple[Any, str]:
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise CocoFormatError(source, "", "file not found", f"check the path of the {what}")
    if not file.is_file():
        raise CocoFormatError(source, "", "not a regular file", f"expected the {what} JSON file")
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise CocoFormatError(source, "", f"cannot read the file: {error.strerror or error}") from error
    try:
        return json.loads(raw), source
    except json.JSONDecodeError as error:
        raise CocoFormatError(
            source,
            "",
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            f"the {what} must be a JSON document",
        ) from error
    except UnicodeDecodeError as error:
        raise CocoFormatError(
            source, "", f"not UTF-8 text: {error}", f"the {what} must be a JSON document"
        ) from error


def load_coco(path: str | os.PathLike[str]) -> CocoDataset:
    """Read and validate a COCO dataset file."""
    data, source = _read_json(path, "COCO dataset")
    return CocoDataset.from_dict(data, source)


def load_results(path: str | os.PathLike[str], dataset: CocoDataset | None = None) -> list[dict[str, Any]]:
    """Read and validate a COCO results file (a JSON list of detections), optionally against ``dataset``."""
    results, source = _read_json(path, "COCO results")
    validate_results(results, source, dataset)
    return results


def save_coco(
    dataset: CocoDataset | Mapping[str, Any], path: str | os.PathLike[str], *, indent: int | None = None
) -> Path:
    """Write a dataset (or a COCO dict) as JSON atomically; key order and extra keys are preserved."""
    data = dataset.data if isinstance(dataset, CocoDataset) else dataset
    return write_json_atomic(path, data, indent=indent)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoStats:
    """Summary counts of a dataset; crowd regions (``iscrowd=1``) are never counted as instances.

    ``per_category`` maps every category id to its mean number of instances per image, over all images
    (images without annotations included). ``visible_keypoints_per_instance`` maps every keypoint category
    id to the mean number of keypoints with v > 0 over *all* its non-crowd instances (instances with no
    visible keypoint, or no ``keypoints`` at all, count as 0); 0.0 for a category without instances.
    """

    num_images: int
    num_instances: int
    instances_per_image: float
    per_category: dict[int, float]
    num_crowd: int
    visible_keypoints_per_instance: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (category ids become string keys, as JSON requires)."""
        return {
            "num_images": self.num_images,
            "num_instances": self.num_instances,
            "instances_per_image": self.instances_per_image,
            "per_category": {str(k): v for k, v in self.per_category.items()},
            "num_crowd": self.num_crowd,
            "visible_keypoints_per_instance": {
                str(k): v for k, v in self.visible_keypoints_per_instance.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CocoStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            num_images=int(data["num_images"]),
            num_instances=int(data["num_instances"]),
            instances_per_image=float(data["instances_per_image"]),
            per_category={int(k): float(v) for k, v in data["per_category"].items()},
            num_crowd=int(data["num_crowd"]),
            visible_keypoints_per_instance={
                int(k): float(v) for k, v in data["visible_keypoints_per_instance"].items()
            },
        )


def coco_statistics(dataset: CocoDataset) -> CocoStats:
    """Count images, instances, crowd regions and visible keypoints of a (validated) dataset."""
    num_images = len(dataset.images)
    counts: dict[int, int] = {category["id"]: 0 for category in dataset.categories}
    keypoint_ids = {category["id"] for category in dataset.keypoint_categories()}
    visible_sum: dict[int, int] = dict.fromkeys(keypoint_ids, 0)
    num_crowd = 0
    for annotation in dataset.annotations:
        if annotation.get("iscrowd", 0) == 1:
            num_crowd += 1
            continue
        category_id = annotation["category_id"]
        counts[category_id] = counts.get(category_id, 0) + 1
        if category_id in keypoint_ids:
            keypoints = annotation.get("keypoints") or []
            visible_sum[category_id] += sum(1 for v in keypoints[2::3] if v > 0)
    num_instances = sum(counts.values())
    return CocoStats(
        num_images=num_images,
        num_instances=num_instances,
        instances_per_image=num_instances / num_images if num_images else 0.0,
        per_category={k: (n / num_images if num_images else 0.0) for k, n in counts.items()},
        num_crowd=num_crowd,
        visible_keypoints_per_instance={
            k: (visible_sum[k] / counts[k] if counts.get(k) else 0.0) for k in sorted(keypoint_ids)
        },
    )


# --------------------------------------------------------------------------------------------------
# Boxes and masks
# --------------------------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a 2-D boolean (or 0/1) mask as compressed COCO RLE ``{'size': [h, w], 'counts': str}``."""
    from pycocotools import mask as mask_utils

    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {array.shape}")
    rle = mask_utils.encode(np.asfortranarray(array.astype(bool).astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(array.shape[0]), int(array.shape[1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def rle_for_pycocotools(rle: Mapping[str, Any]) -> dict[str, Any]:
    """A COCO RLE dict (compressed string or list of run lengths) in the form pycocotools' C API takes."""
    from pycocotools import mask as mask_utils

    size = [int(s) for s in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
    return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, list-RLE or compressed RLE) to a bool (height, width) mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        polygons: list[list[float]] = []
        for polygon in segmentation:
            if not isinstance(polygon, Sequence) or len(polygon) < 6 or len(polygon) % 2:
                raise ValueError("each polygon must be a list of at least 6 coordinates, even in number")
            polygons.append([float(v) for v in polygon])
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(s) for s in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match [height, width] = [{height}, {width}]")
        rle = rle_for_pycocotools(segmentation)
    else:
        raise ValueError(f"expected a polygon list or an RLE dict, got {_describe(segmentation)}")
    return mask_utils.decode(rle).astype(bool)
