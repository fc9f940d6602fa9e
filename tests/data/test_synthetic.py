"""Tests of the procedural COCO benchmark (distill.data.synthetic)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from distill.data import synthetic
from distill.data.synthetic import (
    FIGURE,
    FIGURE_KEYPOINTS,
    PRESETS,
    SPLITS,
    SynthPreset,
    generate,
    render_image,
    resolve_preset,
)
from distill.hooks import StepContext

JSON_NAMES = ("labeled.json", "unlabeled.json", "unlabeled_truth.json", "test.json")
SEED = 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SynthResult:
    return generate(tmp_path_factory.mktemp("tiny_a"), preset="tiny", seed=SEED)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _annotated(result: synthetic.SynthResult) -> list[tuple[dict, dict]]:
    """(image, annotation) pairs of every file that carries annotations."""
    pairs = []
    for path in (result.labeled_json, result.unlabeled_truth_json, result.test_json):
        data = _load(path)
        images = {im["id"]: im for im in data["images"]}
        pairs += [(images[a["image_id"]], a) for a in data["annotations"]]
    return pairs


def test_same_seed_gives_identical_bytes(tiny: synthetic.SynthResult, tmp_path: Path) -> None:
    again = generate(tmp_path, preset="tiny", seed=SEED)
    for name in JSON_NAMES:
        assert (tiny.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes(), name
    first = sorted(p.relative_to(tiny.image_dir) for p in tiny.image_dir.rglob("*.png"))
    second = sorted(p.relative_to(again.image_dir) for p in again.image_dir.rglob("*.png"))
    assert first == second and len(first) == 12 + 24 + 12
    for rel in first:
        assert (tiny.image_dir / rel).read_bytes() == (again.image_dir / rel).read_bytes(), rel


def test_other_seed_differs(tiny: synthetic.SynthResult) -> None:
    a, _ = render_image("tiny", SEED, "labeled", 0)
    b, _ = render_image("tiny", SEED + 1, "labeled", 0)
    assert a.size != b.size or not np.array_equal(np.asarray(a), np.asarray(b))


def test_single_image_regenerates_independently_of_order(tiny: synthetic.SynthResult) -> None:
    data = _load(tiny.test_json)
    image = data["images"][5]
    regenerated, anns = render_image("tiny", SEED, "test", 5)
    on_disk = Image.open(tiny.image_dir / image["file_name"])
    assert np.array_equal(np.asarray(regenerated), np.asarray(on_disk.convert("RGB")))
    stored = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    strip = [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in stored]
    assert json.loads(json.dumps(anns)) == strip


def test_layout_and_counts(tiny: synthetic.SynthResult) -> None:
    for name in JSON_NAMES:
        assert (tiny.out_dir / name).is_file()
    assert tiny.num_images == {"labeled": 12, "unlabeled": 24, "test": 12}
    for split in SPLITS:
        data = _load(tiny.out_dir / f"{'unlabeled_truth' if split == 'unlabeled' else split}.json")
        assert len(data["annotations"]) == tiny.num_annotations[split] > 0
        for im in data["images"]:
            assert im["file_name"].startswith(f"{split}/") and im["file_name"].endswith(".png")
            with Image.open(tiny.image_dir / im["file_name"]) as img:
                assert img.format == "PNG" and img.mode == "RGB"
                assert img.size == (im["width"], im["height"])
                assert 128 <= img.width <= 160 and 128 <= img.height <= 160
    info = _load(tiny.labeled_json)["info"]
    assert info["preset"] == "tiny" and info["seed"] == SEED and info["version"]
    assert info["date_created"] == _load(tiny.test_json)["info"]["date_created"]


def test_unlabeled_has_no_annotations_but_truth_does(tiny: synthetic.SynthResult) -> None:
    unlabeled, truth = _load(tiny.unlabeled_json), _load(tiny.unlabeled_truth_json)
    assert not unlabeled.get("annotations")
    assert truth["annotations"]
    assert unlabeled["images"] == truth["images"]
    assert unlabeled["categories"] == truth["categories"]
    assert {a["image_id"] for a in truth["annotations"]} <= {im["id"] for im in truth["images"]}


def test_ids_unique_across_splits(tiny: synthetic.SynthResult) -> None:
    image_ids: list[int] = []
    annotation_ids: list[int] = []
    for name in ("labeled.json", "unlabeled_truth.json", "test.json"):
        data = _load(tiny.out_dir / name)
        image_ids += [im["id"] for im in data["images"]]
        annotation_ids += [a["id"] for a in data["annotations"]]
    assert len(set(image_ids)) == len(image_ids) == 48
    assert len(set(annotation_ids)) == len(annotation_ids)
    assert min(image_ids) > 0 and min(annotation_ids) > 0


def test_masks_match_boxes_and_areas(tiny: synthetic.SynthResult) -> None:
    pairs = _annotated(tiny)
    assert len(pairs) > 50
    for image, ann in pairs:
        assert ann["iscrowd"] == 0
        rle = ann["segmentation"]
        assert rle["size"] == [image["height"], image["width"]] and isinstance(rle["counts"], str)
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        assert mask.shape == (image["height"], image["width"])
        assert int(mask.sum()) == ann["area"] > 0
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert np.allclose(tight, ann["bbox"], atol=1), (tight, ann["bbox"])


def test_visible_masks_of_one_image_do_not_overlap(tiny: synthetic.SynthResult) -> None:
    _, anns = render_image("tiny", SEED, "unlabeled", 3)
    total = sum(mask_utils.decode(_rle(a)).astype(int) for a in anns)
    assert total.max() == 1


def _rle(ann: dict) -> dict:
    return {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode("ascii")}


def test_figure_keypoints(tiny: synthetic.SynthResult) -> None:
    figures = [(im, a) for im, a in _annotated(tiny) if a["category_id"] == FIGURE]
    assert len(figures) >= 10
    for image, ann in figures:
        kp = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
        assert kp.shape == (len(FIGURE_KEYPOINTS), 3)
        assert ann["num_keypoints"] == int((kp[:, 2] > 0).sum())
        assert set(kp[:, 2]) <= {0, 1, 2}
        x, y, w, h = ann["bbox"]
        for kx, ky, v in kp:
            if v == 0:
                assert kx == 0 and ky == 0
            else:
                assert 0 <= kx < image["width"] and 0 <= ky < image["height"]
            if v == 2:
                assert x - 1.5 <= kx <= x + w + 1.5 and y - 1.5 <= ky <= y + h + 1.5, (kx, ky, ann["bbox"])
    for ann in (a for _, a in _annotated(tiny) if a["category_id"] != FIGURE):
        assert "keypoints" not in ann


def test_left_is_on_the_image_right_of_the_body_axis(tiny: synthetic.SynthResult) -> None:
    """Chirality: seen from the front, the figure's left shoulder lies right of its up axis."""
    index = {name: i for i, name in enumerate(FIGURE_KEYPOINTS)}
    votes = []
    for _, ann in _annotated(tiny):
        if ann["category_id"] != FIGURE:
            continue
        kp = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
        needed = ("head", "left_shoulder", "right_shoulder", "left_hip", "right_hip")
        if any(kp[index[n], 2] == 0 for n in needed):
            continue
        xy = {n: kp[index[n], :2] for n in needed}
        up = xy["head"] - (xy["left_hip"] + xy["right_hip"]) / 2  # image coords, y down
        if abs(math.degrees(math.atan2(up[0], -up[1]))) > 30:
            continue  # not upright enough
        image_right = np.array([-up[1], up[0]])  # the up vector turned a quarter clockwise on screen
        votes.append(float(np.dot(xy["left_shoulder"] - xy["right_shoulder"], image_right)) > 0)
    assert len(votes) >= 10
    assert sum(votes) / len(votes) > 0.9


def test_objects_span_a_wide_scale_range(tiny: synthetic.SynthResult) -> None:
    scales = [math.sqrt(a["bbox"][2] * a["bbox"][3]) for _, a in _annotated(tiny)]
    assert max(scales) / min(scales) >= 5


def test_all_categories_present(tiny: synthetic.SynthResult) -> None:
    assert {a["category_id"] for _, a in _annotated(tiny)} == {1, 2, 3, 4}


def test_category_block(tiny: synthetic.SynthResult) -> None:
    categories = {c["id"]: c for c in _load(tiny.labeled_json)["categories"]}
    assert sorted(categories) == [1, 2, 3, 4]
    assert all(c["supercategory"] for c in categories.values())
    figure = categories[FIGURE]
    assert figure["name"] == "figure"
    assert figure["keypoints"] == list(FIGURE_KEYPOINTS)
    n = len(figure["keypoints"])
    assert figure["skeleton"] and all(1 <= i <= n for pair in figure["skeleton"] for i in pair)
    assert len(figure["keypoint_sigmas"]) == n and all(0.03 < s < 0.12 for s in figure["keypoint_sigmas"])
    flip = figure["keypoint_flip_map"]
    assert {tuple(pair) for pair in flip} == {
        ("left_shoulder", "right_shoulder"),
        ("left_hand", "right_hand"),
        ("left_hip", "right_hip"),
        ("left_foot", "right_foot"),
    }


def test_pycocotools_loads_every_file(tiny: synthetic.SynthResult) -> None:
    for name in JSON_NAMES:
        coco = COCO(str(tiny.out_dir / name))
        assert len(coco.getImgIds()) == len(_load(tiny.out_dir / name)["images"])
        assert coco.loadCats(FIGURE)[0]["name"] == "figure"


def test_files_pass_distill_validation(tiny: synthetic.SynthResult) -> None:
    from distill.data.coco import load_coco

    for name in JSON_NAMES:
        dataset = load_coco(tiny.out_dir / name)
        assert len(dataset.images) == len(_load(tiny.out_dir / name)["images"])


def test_progress_callback_and_overrides(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    result = generate(
        tmp_path,
        preset="tiny",
        seed=1,
        num_labeled=2,
        num_unlabeled=0,
        num_test=1,
        context=StepContext(progress=lambda e: calls.append((e.stage, e.done, e.total))),
    )
    assert calls == [("synth", 1, 3), ("synth", 2, 3), ("synth", 3, 3)]
    assert result.num_images == {"labeled": 2, "unlabeled": 0, "test": 1}
    assert _load(result.unlabeled_json)["images"] == []
    assert result.preset.num_labeled == 2 and PRESETS["tiny"].num_labeled == 12


def test_the_demo_benchmark_is_the_first_images_of_semi() -> None:
    """``make demo``'s benchmark is ``semi`` with fewer unlabeled images: the same images, so the bench's
    ``semi`` results describe the demo's data."""
    demo, semi = PRESETS["demo"], PRESETS["semi"]
    assert demo.num_unlabeled < semi.num_unlabeled and demo.num_labeled == semi.num_labeled
    for split, index in (("labeled", 0), ("unlabeled", 7), ("test", 3)):
        (image_a, anns_a), (image_b, anns_b) = (render_image(p, 2, split, index) for p in ("demo", "semi"))
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and anns_a == anns_b


def test_png_round_trip_is_lossless() -> None:
    image, _ = render_image("tiny", 0, "labeled", 1)
    buf = io.BytesIO(synthetic._png_bytes(image))
    assert np.array_equal(np.asarray(Image.open(buf).convert("RGB")), np.asarray(image))


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known presets: demo, medium, semi, tiny"):
        resolve_preset("huge")
    with pytest.raises(ValueError, match="unknown SynthPreset field"):
        generate(tmp_path, preset="tiny", num_images=3)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path, preset="tiny", seed=-1)
    with pytest.raises(ValueError, match="split"):
        render_image("tiny", 0, "train", 0)
    with pytest.raises(ValueError, match="max_side"):
        SynthPreset("bad", 1, 1, 1, min_side=200, max_side=100)
    with pytest.raises(ValueError, match="class_weights"):
        resolve_preset("tiny", class_weights=(0, 0, 0, 0))


def test_custom_preset_object(tmp_path: Path) -> None:
    preset = SynthPreset("mini", 1, 1, 1, min_side=96, max_side=96, max_objects=2)
    result = generate(tmp_path, preset=preset, seed=3)
    data = _load(result.test_json)
    assert data["info"]["preset"] == "mini"
    assert data["images"][0]["width"] == data["images"][0]["height"] == 96
