"""Labels drawn on images: box, mask and keypoint pixels where they belong, scaling, modes, odd input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data.coco import encode_mask
from service.ui.draw import (
    CENTRE_COLOUR,
    LEFT_COLOUR,
    MASK_ALPHA,
    RIGHT_COLOUR,
    class_colour,
    load_image,
    render_labels,
)

BLACK = (0, 0, 0)
CATEGORIES = {
    1: {"id": 1, "name": "cat"},
    2: {
        "id": 2,
        "name": "person",
        "keypoints": ["nose", "left_eye", "right_eye", "left_ear"],
        "skeleton": [[1, 2], [2, 3], [2, 4]],
    },
}


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def black(width: int = 200, height: int = 150) -> Image.Image:
    return Image.new("RGB", (width, height), BLACK)


def tinted(colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(round(MASK_ALPHA * c) for c in colour)


def palette_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, *colour])
    return image


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = [0, *changes.tolist(), flat.size]
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def test_palette_is_deterministic_and_distinct() -> None:
    assert class_colour(1) == class_colour(1) == class_colour(21)
    assert len({class_colour(i) for i in range(20)}) == 20


def test_box_outline_has_the_class_colour_and_its_inside_does_not() -> None:
    ann = {"bbox": [40, 50, 80, 60], "category_id": 1}
    out = decode(render_labels(black(), [ann], CATEGORIES))
    colour = class_colour(1)
    assert out.size == (200, 150)
    assert out.getpixel((40, 80)) == colour  # left edge
    assert out.getpixel((119, 80)) == colour  # right edge: x + w - 1
    assert out.getpixel((80, 109)) == colour  # bottom edge
    assert out.getpixel((80, 80)) == BLACK  # inside, no mask
    assert out.getpixel((130, 80)) == BLACK  # outside
    tag = np.asarray(out)[35:50, 40:100]  # the label sits just above the box
    assert (tag == colour).all(axis=-1).any()


def test_label_shows_the_score() -> None:
    ann = {"bbox": [40, 50, 80, 60], "category_id": 1}
    plain = np.asarray(decode(render_labels(black(), [ann], CATEGORIES)))
    scored = np.asarray(decode(render_labels(black(), [{**ann, "score": 0.87}], CATEGORIES)))
    assert not np.array_equal(plain[:50], scored[:50])  # longer text above the box
    assert np.array_equal(plain[50:], scored[50:])


def test_polygon_mask_is_tinted_semi_transparently() -> None:
    ann = {"bbox": [40, 50, 80, 60], "category_id": 1, "segmentation": [[60, 60, 100, 60, 100, 100, 60, 100]]}
    out = decode(render_labels(black(), [ann], CATEGORIES))
    assert out.getpixel((80, 80)) == tinted(class_colour(1))
    assert out.getpixel((50, 55)) == BLACK  # inside the box, outside the mask


@pytest.mark.parametrize("encoding", ["compressed", "uncompressed"])
def test_rle_masks_tint_exactly_their_pixels(encoding: str) -> None:
    mask = np.zeros((150, 200), dtype=bool)
    mask[30:70, 50:90] = True
    mask[100:120, 10:15] = True
    rle = encode_mask(mask) if encoding == "compressed" else uncompressed_rle(mask)
    assert isinstance(rle["counts"], str if encoding == "compressed" else list)
    out = np.asarray(decode(render_labels(black(), [{"category_id": 2, "segmentation": rle}], CATEGORIES)))
    assert np.array_equal(out.any(axis=-1), mask)
    assert tuple(out[50, 60]) == tinted(class_colour(2))


def test_keypoints_and_skeleton_are_coloured_by_side() -> None:
    keypoints = [60, 40, 2, 60, 100, 2, 140, 100, 1, 20, 20, 0]  # nose, left_eye, right_eye, absent left_ear
    out = decode(render_labels(black(), [{"category_id": 2, "keypoints": keypoints}], CATEGORIES))
    assert out.getpixel((60, 40)) == CENTRE_COLOUR
    assert out.getpixel((60, 100)) == LEFT_COLOUR
    assert out.getpixel((140, 100)) == RIGHT_COLOUR
    assert out.getpixel((60, 70)) == LEFT_COLOUR  # nose - left_eye: touches the left side only
    assert out.getpixel((100, 100)) == CENTRE_COLOUR  # left_eye - right_eye
    assert out.getpixel((20, 20)) == BLACK  # v = 0: not drawn
    assert out.getpixel((40, 60)) == BLACK  # and no line to it


def test_max_side_scales_the_image_and_every_coordinate() -> None:
    ann = {"bbox": [40, 20, 80, 40], "category_id": 1, "keypoints": [160, 80, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    categories = {1: {**CATEGORIES[2], "id": 1, "name": "cat"}}
    out = decode(render_labels(black(200, 100), [ann], categories, max_side=100))
    assert out.size == (100, 50)
    colour = class_colour(1)
    assert out.getpixel((20, 20)) == colour  # left edge at x = 40 / 2
    assert out.getpixel((59, 20)) == colour  # right edge at (40 + 80) / 2 - 1
    assert out.getpixel((40, 20)) == BLACK  # the unscaled edge now lies inside
    assert out.getpixel((80, 40)) == CENTRE_COLOUR  # the keypoint at (160, 80) / 2


def test_max_side_never_enlarges() -> None:
    assert decode(render_labels(black(200, 100), [], {}, max_side=500)).size == (200, 100)
    with pytest.raises(ValueError, match="max_side"):
        render_labels(black(), [], {}, max_side=0)


def test_no_annotations_give_the_image_itself() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    assert np.array_equal(np.asarray(decode(render_labels(image, [], CATEGORIES))), pixels)
    assert decode(render_labels(image, [], CATEGORIES, max_side=40)).size == (40, 30)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (40, 30), 7), (7, 7, 7)),
        (Image.new("RGBA", (40, 30), (10, 20, 30, 255)), (10, 20, 30)),
        (palette_image((1, 2, 3)), (1, 2, 3)),
        (Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), (255, 255, 255)),
    ],
    ids=["L", "RGBA", "P", "I;16"],
)
def test_any_mode_becomes_rgb(image: Image.Image, expected: tuple[int, int, int]) -> None:
    ann = {"bbox": [5, 5, 30, 22], "category_id": 1}  # the label tag fills its top, inside
    raw = Image.open(io.BytesIO(render_labels(image, [ann], CATEGORIES)))
    assert raw.mode == "RGB" and raw.size == (40, 30)
    assert raw.getpixel((20, 24)) == expected
    assert raw.getpixel((5, 24)) == class_colour(1)


def test_odd_annotations_do_not_crash() -> None:
    odd = [
        {},
        {"bbox": [10, 10, 0, 5], "category_id": 1},
        {"bbox": [10, 10, -5, 5], "category_id": 1},
        {"bbox": "10 10 5 5"},
        {"bbox": [1, 2, 3]},
        {"bbox": [1, 2, float("nan"), 4], "score": None},
        {"bbox": [1, 2, 3, 4], "category_id": "1", "score": "high"},
        {"segmentation": [[1, 2]]},
        {"segmentation": [["a", "b", "c", "d", "e", "f"]]},
        {"segmentation": {"counts": "garbage!", "size": [150, 200]}},
        {"segmentation": {"counts": [10**9], "size": [150, 200]}},
        {"segmentation": {"counts": [-5, 3], "size": [150, 200]}},
        {"segmentation": {"counts": [30000], "size": [100, 300]}},  # not this image's size
        {"segmentation": {"size": [150, 200]}},
        {"segmentation": 7},
        {"keypoints": [1, 2]},
        {"keypoints": [1, "x", 2]},
        {"keypoints": [5, 5, 2], "category_id": 1},  # a category without keypoint names
        {"keypoints": [5, 5, 2, 9, 9, 2], "category_id": 3},
        {"keypoints": [5, 5, 2], "category_id": 4},
    ]
    categories = {
        **CATEGORIES,
        3: {"name": "odd", "keypoints": "nope", "skeleton": [[0, 5], [1], "ab", [1, 2]]},
        4: {"skeleton": 7},
    }
    out = decode(render_labels(black(), odd, categories))
    assert out.size == (200, 150)
    assert out.getpixel((100, 100)) == BLACK


def test_degenerate_boxes_draw_nothing() -> None:
    anns = [{"bbox": [10, 10, 0, 50], "category_id": 1}, {"bbox": [10, 10, 50, -1], "category_id": 1}]
    assert np.asarray(decode(render_labels(black(), anns, CATEGORIES))).max() == 0


def test_unknown_category_uses_the_palette_colour_of_its_id() -> None:
    out = decode(render_labels(black(), [{"bbox": [40, 50, 80, 60], "category_id": 57}], CATEGORIES))
    assert out.getpixel((40, 80)) == class_colour(57)


def test_large_images_get_thicker_lines() -> None:
    out = decode(render_labels(black(2000, 1000), [{"bbox": [100, 100, 500, 500], "category_id": 1}], {}))
    assert [out.getpixel((100 + dx, 300)) for dx in range(4)] == [class_colour(1)] * 4
    assert out.getpixel((104, 300)) == BLACK


def test_load_image_applies_the_exif_orientation(tmp_path: Path) -> None:
    stored = Image.new("L", (40, 20), 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 40)
