"""COCO loading, validation, saving, statistics and converters."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.data.coco import (
    CocoDataset,
    CocoStats,
    coco_statistics,
    decode_segmentation,
    encode_mask,
    load_coco,
    load_results,
    save_coco,
    validate_coco,
    validate_results,
)
from distill.errors import CocoFormatError, InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not present at {SHARED_DATA} (a clone without shared/)"
)

PERSON_KEYPOINTS = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9]]


def _person_keypoints(seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in PERSON_KEYPOINTS:
        values += [float(rng.integers(0, 60)), float(rng.integers(0, 40)), int(rng.integers(0, 3))]
    return values


def _valid_dataset() -> dict[str, Any]:
    """2 images (60x40, 30x20), a keypoint category and a box-only one; 18 person annotations + 2 more."""
    annotations: list[dict[str, Any]] = []
    for i in range(18):
        keypoints = _person_keypoints(i)
        annotations.append(
            {
                "id": 100 + i,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1.5, 2.0, 20.25, 30.0],
                "area": 400.5,
                "iscrowd": 0,
                "keypoints": keypoints,
                "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
                "segmentation": [[1.0, 2.0, 21.0, 2.0, 21.0, 32.0, 1.0, 32.0]],
            }
        )
    # index 18: a crowd region with uncompressed RLE on image 2 (30 x 20): 600 pixels
    annotations.append(
        {
            "id": 200,
            "image_id": 2,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "area": 100,
            "iscrowd": 1,
            "keypoints": [0] * 51,
            "num_keypoints": 0,
            "segmentation": {"size": [20, 30], "counts": [50, 100, 450]},
        }
    )
    # index 19: a box-only category, no keypoints, empty segmentation
    annotations.append(
        {"id": 201, "image_id": 2, "category_id": 7, "bbox": [3, 4, 5, 6], "iscrowd": 0, "segmentation": []}
    )
    return {
        "info": {"description": "hand-made"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 60, "height": 40},
            {"id": 2, "file_name": "b.jpg", "width": 30, "height": 20},
        ],
        "annotations": annotations,
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(PERSON_KEYPOINTS),
                "skeleton": copy.deepcopy(SKELETON),
            },
            {"id": 7, "name": "box"},
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting ``data[path]`` (dotted path with [i] indices) to ``value``."""

    def mutate(data: dict[str, Any]) -> None:
        tokens = path.replace("[", ".").replace("]", "").split(".")
        target: Any = data
        for token in tokens[:-1]:
            target = target[int(token)] if token.isdigit() else target[token]
        last = tokens[-1]
        target[int(last) if last.isdigit() else last] = value

    return mutate


def _delete(path: str, key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        for token in path.replace("[", ".").replace("]", "").split("."):
            if token:
                target = target[int(token)] if token.isdigit() else target[token]
        del target[key]

    return mutate


def test_valid_dataset_passes_and_wraps() -> None:
    data = _valid_dataset()
    dataset = CocoDataset.from_dict(data)
    assert dataset.data is data
    assert dataset.source == "<memory>"
    assert len(dataset.images) == 2 and len(dataset.annotations) == 20 and len(dataset.categories) == 2
    assert dataset.image_by_id[2]["file_name"] == "b.jpg"
    assert dataset.category_by_id[7]["name"] == "box"
    grouped = dataset.annotations_by_image()
    assert sorted(grouped) == [1, 2]
    assert len(grouped[1]) == 18 and [a["id"] for a in grouped[2]] == [200, 201]
    assert [c["id"] for c in dataset.keypoint_categories()] == [1]


def test_annotations_by_image_lists_images_without_annotations() -> None:
    data = _valid_dataset()
    data["images"].append({"id": 3, "file_name": "c.jpg", "width": 5, "height": 5})
    grouped = CocoDataset.from_dict(data).annotations_by_image()
    assert grouped[3] == []


BAD_INPUTS: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("duplicate-image-id", _set("images[1].id", 1), "images[1].id", "duplicate image id 1"),
    ("bool-image-id", _set("images[0].id", True), "images[0].id", "true (a boolean)"),
    ("bool-annotation-id", _set("annotations[3].id", False), "annotations[3].id", "false (a boolean)"),
    ("float-image-id", _set("images[0].id", 1.0), "images[0].id", "expected an integer"),
    ("zero-width", _set("images[1].width", 0), "images[1].width", "positive integer"),
    ("missing-file-name", _delete("images[0]", "file_name"), "images[0].file_name", "missing"),
    (
        "missing-image",
        _set("annotations[5].image_id", 999),
        "annotations[5].image_id",
        "no image with id 999",
    ),
    ("unknown-category", _set("annotations[19].category_id", 42), "annotations[19].category_id", "unknown"),
    (
        "bbox-3-numbers",
        _set("annotations[2].bbox", [1, 2, 3]),
        "annotations[2].bbox",
        "expected 4 numbers, got 3",
    ),
    (
        "bbox-negative-width",
        _set("annotations[2].bbox[2]", -1),
        "annotations[2].bbox[2]",
        "negative box width",
    ),
    ("bbox-nan", _set("annotations[4].bbox[1]", float("nan")), "annotations[4].bbox[1]", "finite"),
    ("bbox-string", _set("annotations[4].bbox[0]", "3"), "annotations[4].bbox[0]", "expected a number"),
    ("area-negative", _set("annotations[0].area", -5), "annotations[0].area", "non-negative"),
    ("iscrowd-2", _set("annotations[0].iscrowd", 2), "annotations[0].iscrowd", "expected 0 or 1"),
    (
        "keypoints-50-of-51",
        lambda d: d["annotations"][17].__setitem__("keypoints", d["annotations"][17]["keypoints"][:50]),
        "annotations[17].keypoints",
        "annotations[17].keypoints: expected 51 numbers (17 x 3), got 50",
    ),
    (
        "visibility-3",
        _set("annotations[1].keypoints[11]", 3),
        "annotations[1].keypoints[11]",
        "expected 0, 1 or 2",
    ),
    (
        "keypoint-inf",
        _set("annotations[1].keypoints[9]", float("inf")),
        "annotations[1].keypoints[9]",
        "finite",
    ),
    (
        "num-keypoints-wrong",
        _set("annotations[0].num_keypoints", 99),
        "annotations[0].num_keypoints",
        "is 99",
    ),
    (
        "keypoints-on-box-category",
        _set("annotations[19].keypoints", [1, 2, 2]),
        "annotations[19].keypoints",
        "defines no keypoints",
    ),
    (
        "rle-size-mismatch",
        _set("annotations[18].segmentation.size", [30, 20]),
        "annotations[18].segmentation.size",
        "does not match",
    ),
    (
        "rle-counts-sum",
        _set("annotations[18].segmentation.counts", [50, 100, 449]),
        "annotations[18].segmentation.counts",
        "sum to 599",
    ),
    (
        "rle-negative-run",
        _set("annotations[18].segmentation.counts", [650, -50]),
        "annotations[18].segmentation.counts[1]",
        "non-negative",
    ),
    (
        "rle-bad-string",
        _set("annotations[18].segmentation.counts", "ab~~"),
        "annotations[18].segmentation.counts",
        "invalid compressed RLE",
    ),
    (
        "polygon-odd-length",
        _set("annotations[6].segmentation", [[1, 2, 3, 4, 5, 6, 7]]),
        "annotations[6].segmentation[0]",
        "even number of coordinates, got 7",
    ),
    (
        "polygon-too-short",
        _set("annotations[6].segmentation", [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4]]),
        "annotations[6].segmentation[1]",
        "at least 6",
    ),
    (
        "segmentation-string",
        _set("annotations[6].segmentation", "x"),
        "annotations[6].segmentation",
        "polygons",
    ),
    (
        "skeleton-out-of-range",
        _set("categories[0].skeleton[3]", [15, 18]),
        "categories[0].skeleton[3]",
        "1..17",
    ),
    ("skeleton-zero", _set("categories[0].skeleton[0]", [0, 1]), "categories[0].skeleton[0]", "out of range"),
    ("skeleton-not-pair", _set("categories[0].skeleton[1]", [1, 2, 3]), "categories[0].skeleton[1]", "pair"),
    ("keypoint-name-int", _set("categories[0].keypoints[2]", 5), "categories[0].keypoints[2]", "name"),
    ("duplicate-category-id", _set("categories[1].id", 1), "categories[1].id", "duplicate category id"),
    (
        "duplicate-annotation-id",
        _set("annotations[9].id", 100),
        "annotations[9].id",
        "duplicate annotation id",
    ),
    ("missing-images", _delete("", "images"), "images", "missing required key"),
    ("categories-missing", _delete("", "categories"), "categories", "missing required key"),
    ("annotations-not-list", _set("annotations", {}), "annotations", "expected a list"),
    ("missing-bbox", _delete("annotations[3]", "bbox"), "annotations[3].bbox", "missing"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_dataset_names_the_field(
    mutate: Callable[[dict[str, Any]], None], field: str, fragment: str
) -> None:
    data = _valid_dataset()
    mutate(data)
    with pytest.raises(CocoFormatError) as caught:
        validate_coco(data, "train.json")
    error = caught.value
    assert error.field == field
    assert error.file == "train.json"
    assert str(error).startswith(f"train.json: {field}: ")
    assert fragment in str(error)
    assert error.hint or error.problem  # a message is always there; most carry a hint too


def test_keypoint_length_message_is_exact() -> None:
    data = _valid_dataset()
    data["annotations"][17]["keypoints"].pop()
    with pytest.raises(CocoFormatError) as caught:
        validate_coco(data, "person.json")
    assert str(caught.value).startswith(
        "person.json: annotations[17].keypoints: expected 51 numbers (17 x 3), got 50"
    )
    assert "17 keypoints" in caught.value.hint


def test_first_problem_is_reported() -> None:
    data = _valid_dataset()
    data["images"][1]["height"] = -3
    data["annotations"][0]["bbox"] = []
    with pytest.raises(CocoFormatError) as caught:
        validate_coco(data, "x.json")
    assert caught.value.field == "images[1].height"


def test_top_level_not_an_object() -> None:
    with pytest.raises(CocoFormatError, match="JSON object"):
        validate_coco([1, 2], "x.json")  # type: ignore[arg-type]


def test_accepted_variants() -> None:
    # image-only ("unlabeled") file: no annotations, no categories
    CocoDataset.from_dict({"images": [{"id": 5, "file_name": "x.png", "width": 3, "height": 4}]})
    data = _valid_dataset()
    # crowd with polygons (COCO has a few), compressed RLE, keypoint category without keypoints
    data["annotations"][0]["iscrowd"] = 1
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:9, 10:30] = True
    data["annotations"][1]["segmentation"] = encode_mask(mask)
    del data["annotations"][2]["keypoints"]
    del data["annotations"][2]["num_keypoints"]
    data["annotations"][3]["keypoints"][2] = 2.0  # a float visibility equal to 2 is fine
    data["annotations"][3]["num_keypoints"] = sum(
        1 for v in data["annotations"][3]["keypoints"][2::3] if v > 0
    )
    validate_coco(data, "ok.json")


def test_load_coco_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(CocoFormatError, match="file not found") as caught:
        load_coco(missing)
    assert caught.value.file == str(missing)
    assert isinstance(caught.value, InputError)


def test_load_coco_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [\n    {"id": 1,}\n  ]\n}\n')
    with pytest.raises(CocoFormatError) as caught:
        load_coco(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid JSON at line 3, column 14")


def test_load_coco_top_level_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(CocoFormatError, match="top level"):
        load_coco(path)


def test_load_coco_reports_file_path(tmp_path: Path) -> None:
    data = _valid_dataset()
    data["images"][0]["width"] = "60"
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError) as caught:
        load_coco(path)
    assert str(caught.value).startswith(f"{path}: images[0].width: expected an integer, got the string '60'")


def test_save_and_reload_in_memory_dataset(tmp_path: Path) -> None:
    data = _valid_dataset()
    target = tmp_path / "sub" / "out.json"
    save_coco(CocoDataset.from_dict(data), target)
    reloaded = load_coco(target)
    assert reloaded.data == data
    assert list(reloaded.data) == list(data)  # key order kept
    assert reloaded.source == str(target)
    save_coco(data, target, indent=2)  # a plain dict works too
    assert load_coco(target).data == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


# ------------------------------------------------------------------------------------------------ results


def _results() -> list[dict[str, Any]]:
    return [
        {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [1, 2, 3, 4]},
        {"image_id": 1, "category_id": 1, "score": 0.8, "keypoints": [1.0, 2.0, 0.5] * 17},
        {"image_id": 2, "category_id": 7, "score": 0.1, "segmentation": encode_mask(np.ones((20, 30), bool))},
    ]


BAD_RESULTS: list[tuple[str, Callable[[list[dict[str, Any]]], None], str, str]] = [
    ("nan-score", lambda r: r[0].__setitem__("score", float("nan")), "[0].score", "finite"),
    ("missing-score", lambda r: r[2].pop("score"), "[2].score", "missing"),
    ("no-geometry", lambda r: r[0].pop("bbox"), "[0]", "at least one of"),
    ("bool-image-id", lambda r: r[1].__setitem__("image_id", True), "[1].image_id", "boolean"),
    ("unknown-image", lambda r: r[1].__setitem__("image_id", 3), "[1].image_id", "no image with id 3"),
    ("unknown-category", lambda r: r[0].__setitem__("category_id", 2), "[0].category_id", "unknown"),
    ("keypoints-length", lambda r: r[1]["keypoints"].pop(), "[1].keypoints", "expected 51 numbers"),
    ("keypoints-on-box", lambda r: r[2].__setitem__("keypoints", [1, 2, 3]), "[2].keypoints", "no keypoints"),
    ("bbox-negative", lambda r: r[0]["bbox"].__setitem__(3, -1), "[0].bbox[3]", "negative box height"),
    (
        "rle-size",
        lambda r: r[2].__setitem__("segmentation", encode_mask(np.ones((30, 20), bool))),
        "[2].segmentation.size",
        "does not match",
    ),
    (
        "polygon-result",
        lambda r: r[2].__setitem__("segmentation", [[1, 2, 3, 4, 5, 6]]),
        "[2].segmentation",
        "RLE",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "fragment"), [case[1:] for case in BAD_RESULTS], ids=[case[0] for case in BAD_RESULTS]
)
def test_bad_results_name_the_field(
    mutate: Callable[[list[dict[str, Any]]], None], field: str, fragment: str
) -> None:
    dataset = CocoDataset.from_dict(_valid_dataset())
    results = _results()
    validate_results(results, "res.json", dataset)
    mutate(results)
    with pytest.raises(CocoFormatError) as caught:
        validate_results(results, "res.json", dataset)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"res.json: {field}: ")
    assert fragment in str(caught.value)


def test_results_without_dataset_check_shape_only(tmp_path: Path) -> None:
    results = _results()
    results[0]["image_id"] = 12345  # unknown ids are fine without a dataset
    validate_results(results, "r.json")
    results[1]["keypoints"] = [1.0, 2.0]
    with pytest.raises(CocoFormatError, match=r"\[1\]\.keypoints: expected a non-empty multiple of 3"):
        validate_results(results, "r.json")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(CocoFormatError, match="JSON list"):
        load_results(path)
    path.write_text("[]")
    assert load_results(path) == []


# ------------------------------------------------------------------------------------------------ real data


def _real_dataset_files() -> list[Path]:
    if not SHARED_DATA.is_dir():
        return []
    files = sorted((SHARED_DATA / "tiny_coco" / "annotations").glob("*.json"))
    return [*files, SHARED_DATA / "mmpose_fixtures" / "coco" / "test_coco.json"]


@needs_shared
@pytest.mark.parametrize("path", _real_dataset_files(), ids=lambda p: p.name)
def test_real_coco_round_trip(path: Path, tmp_path: Path) -> None:
    original = json.loads(path.read_text(encoding="utf-8"))
    dataset = load_coco(path)
    assert dataset.data == original
    validate_coco(dataset.data, str(path))
    out = tmp_path / path.name
    save_coco(dataset, out)
    reloaded = load_coco(out)
    assert reloaded.data == original
    assert json.loads(out.read_text(encoding="utf-8")) == original


@needs_shared
def test_real_results_against_dataset() -> None:
    coco_dir = SHARED_DATA / "mmpose_fixtures" / "coco"
    dataset = load_coco(coco_dir / "test_coco.json")
    results = load_results(coco_dir / "test_coco_det_AP_H_56.json", dataset)
    assert len(results) == 118
    assert {r["image_id"] for r in results} <= set(dataset.image_by_id)
    stats = coco_statistics(dataset)
    assert stats.num_images == 4 and stats.num_instances == 14 and stats.num_crowd == 0


@needs_shared
def test_real_crowd_masks_decode() -> None:
    dataset = load_coco(SHARED_DATA / "tiny_coco" / "annotations" / "person_keypoints_val2017.json")
    images = dataset.image_by_id
    crowds = [a for a in dataset.annotations if a["iscrowd"] == 1]
    assert crowds, "the fixture has crowd regions"
    for annotation in crowds:
        image = images[annotation["image_id"]]
        mask = decode_segmentation(annotation["segmentation"], image["height"], image["width"])
        assert mask.shape == (image["height"], image["width"])
        assert mask.sum() == sum(annotation["segmentation"]["counts"][1::2])
        x, y, w, h = annotation["bbox"]
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x - 1 and xs.max() <= x + w + 1 and ys.min() >= y - 1 and ys.max() <= y + h + 1


# ------------------------------------------------------------------------------------------------ statistics


def test_statistics_by_hand() -> None:
    def person(ann_id: int, image_id: int, visibilities: list[int], crowd: int = 0) -> dict[str, Any]:
        keypoints: list[int] = []
        for v in visibilities:
            keypoints += [5, 5, v] if v else [0, 0, 0]
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "iscrowd": crowd,
            "keypoints": keypoints,
        }

    def dog(ann_id: int, image_id: int, crowd: int = 0) -> dict[str, Any]:
        return {"id": ann_id, "image_id": image_id, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": crowd}

    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20} for i in (1, 2, 3, 4)],
        "categories": [
            {"id": 1, "name": "person", "keypoints": ["a", "b", "c"], "skeleton": [[1, 2]]},
            {"id": 2, "name": "dog"},
            {"id": 3, "name": "cat"},
        ],
        "annotations": [
            person(1, 1, [2, 1, 0]),  # 2 visible
            person(2, 1, [0, 0, 0]),  # 0 visible, still counted
            dog(3, 1),
            person(4, 2, [2, 2, 2]),  # 3 visible
            person(5, 2, [0, 0, 0], crowd=1),  # crowd: excluded everywhere
            dog(6, 3),
            dog(7, 3),
            dog(8, 3, crowd=1),
            # image 4 has no annotations but is in every denominator
        ],
    }
    stats = coco_statistics(CocoDataset.from_dict(data))
    assert stats.num_images == 4
    assert stats.num_instances == 6  # 3 persons + 3 dogs, crowds excluded
    assert stats.num_crowd == 2
    assert stats.instances_per_image == pytest.approx(6 / 4)
    assert stats.per_category == {1: pytest.approx(3 / 4), 2: pytest.approx(3 / 4), 3: 0.0}
    assert stats.visible_keypoints_per_instance == {1: pytest.approx((2 + 0 + 3) / 3)}
    as_json = json.loads(json.dumps(stats.to_dict()))
    assert CocoStats.from_dict(as_json) == stats


def test_statistics_of_empty_dataset() -> None:
    stats = coco_statistics(CocoDataset.from_dict({"images": []}))
    assert stats == CocoStats(0, 0, 0.0, {}, 0, {})


# ------------------------------------------------------------------------------------------------ converters


def test_mask_round_trip_and_polygon_decode() -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (7, 13), (40, 25)]:
        mask = rng.random(shape) < 0.4
        rle = encode_mask(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        json.dumps(rle)
        np.testing.assert_array_equal(decode_segmentation(rle, *shape), mask)
    square = decode_segmentation([[2, 3, 12, 3, 12, 9, 2, 9]], 20, 30)
    assert square.shape == (20, 30) and square.dtype == bool
    assert square[5, 6] and not square[15, 20]
    assert 40 <= square.sum() <= 80  # a 10 x 6 square, give or take the boundary rule
    list_rle = {"size": [20, 30], "counts": [50, 100, 450]}
    decoded = decode_segmentation(list_rle, 20, 30)
    assert decoded.sum() == 100
    assert decoded.flatten(order="F")[50:150].all()  # COCO RLE runs are column-major
    assert not decode_segmentation([], 4, 5).any()
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation(list_rle, 30, 20)
