"""COCO labels drawn onto an image, server-side, for the dashboard's previews: boxes with a class label,
semi-transparent masks and keypoint skeletons (left side, right side and centre in their own colours).

Malformed annotations are drawn as far as they go (a degenerate box is skipped, its mask and keypoints are
still drawn); nothing in an annotation makes :func:`render_labels` fail.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from distill.data.coco import decode_segmentation
from distill.data.images import _to_rgb, load_image

__all__ = [
    "CENTRE_COLOUR",
    "LEFT_COLOUR",
    "MASK_ALPHA",
    "RIGHT_COLOUR",
    "class_colour",
    "load_image",
    "render_labels",
]

Colour = tuple[int, int, int]

LEFT_COLOUR: Colour = (30, 144, 255)
RIGHT_COLOUR: Colour = (255, 140, 0)
CENTRE_COLOUR: Colour = (255, 255, 255)
MASK_ALPHA = 0.4

# Sasha Trubetskoy's 20 distinct colours
_PALETTE: tuple[Colour, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


def class_colour(category_id: int) -> Colour:
    """The fixed palette colour of a category id (the palette repeats every 20 ids)."""
    return _PALETTE[category_id % len(_PALETTE)]


def render_labels(
    image: Image.Image,
    annotations: list[dict[str, Any]],
    categories: dict[int, dict[str, Any]],
    *,
    max_side: int | None = None,
) -> bytes:
    """PNG bytes of ``image`` (any mode, converted to RGB) with ``annotations`` drawn on it.

    ``categories`` maps category ids to COCO category dicts (``name``, ``keypoints``, ``skeleton``). With
    ``max_side`` the image is shrunk (never enlarged) so that its longer side is at most ``max_side``
    pixels, and every coordinate with it.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    rgb = _to_rgb(image)
    width, height = rgb.size
    scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    sx, sy = rgb.width / width, rgb.height / height
    line = max(1, round(math.sqrt(max(rgb.size)) / 12))  # 1 px below 324 px, 2 at 640, 4 at 2000

    pixels = np.array(rgb)  # uint8 (height, width, 3); blended where a mask lies only
    for ann in annotations:
        mask = _mask(ann.get("segmentation"), (height, width), rgb.size, sx, sy)
        if mask is not None:
            colour = np.asarray(class_colour(_category_id(ann)), dtype=np.float64)
            blend = (1.0 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * colour
            pixels[mask] = np.rint(blend).astype(np.uint8)
    canvas = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(canvas)

    labels: list[tuple[int, int, str, Colour]] = []
    for ann in annotations:
        box = _numbers(ann.get("bbox"), 4)
        if box is None or box[2] <= 0 or box[3] <= 0:
            continue
        category_id = _category_id(ann)
        colour = class_colour(category_id)
        x0, y0 = round(box[0] * sx), round(box[1] * sy)
        x1 = max(x0, round((box[0] + box[2]) * sx) - 1)
        y1 = max(y0, round((box[1] + box[3]) * sy) - 1)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = _name(categories, category_id)
        score = _number(ann.get("score"))
        labels.append((x0, y0, text if score is None else f"{text} {score:.2f}", colour))

    radius = line + 2
    for ann in annotations:
        points = _keypoints(ann.get("keypoints"), sx, sy)
        if not points:
            continue
        category = categories.get(_category_id(ann), {})
        names = category.get("keypoints")
        names = names if isinstance(names, list) else []
        sides = {i: _side(names[i]) if i < len(names) else CENTRE_COLOUR for i in points}
        skeleton = category.get("skeleton")
        for pair in skeleton if isinstance(skeleton, list) else []:
            ends = _skeleton_pair(pair, points)
            if ends is not None:
                a, b = ends
                draw.line((points[a], points[b]), fill=_line_colour(sides[a], sides[b]), width=line)
        for index, (x, y) in points.items():
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius), fill=sides[index], outline=(0, 0, 0)
            )

    font = _font(max(10, round(max(canvas.size) / 60)))
    for x0, y0, text, colour in labels:
        _label(draw, canvas.size, x0, y0, text, colour, font)

    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _numbers(value: Any, length: int) -> list[float] | None:
    """``value`` as ``length`` finite floats, or None."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != length:
        return None
    numbers = [n for n in map(_number, value) if n is not None]
    return numbers if len(numbers) == length else None


def _category_id(ann: dict[str, Any]) -> int:
    """The annotation's category id; -1 (no category) when missing or not an integer."""
    value = ann.get("category_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _name(categories: dict[int, dict[str, Any]], category_id: int) -> str:
    """The category's name; ``category N`` for an id without a category, ``no category`` for -1."""
    if category_id in categories and "name" in categories[category_id]:
        return str(categories[category_id]["name"])
    return "no category" if category_id == -1 else f"category {category_id}"


def _mask(
    segmentation: Any, original: tuple[int, int], size: tuple[int, int], sx: float, sy: float
) -> np.ndarray | None:
    """The segmentation as a bool (height, width) mask at the drawn ``size``, or None if absent/malformed.

    Polygons are scaled and rasterised at the drawn size. An RLE must have the image's ``original``
    (height, width) (one of another size belongs to other pixels, e.g. the image before its EXIF rotation);
    it is decoded at that size and resized to the drawn size.
    """
    width, height = size
    try:
        if isinstance(segmentation, list) and segmentation:
            polygons = [[v * (sy if i % 2 else sx) for i, v in enumerate(p)] for p in segmentation]
            return decode_segmentation(polygons, height, width)
        if isinstance(segmentation, dict):
            mask = decode_segmentation(segmentation, *original)
            if mask.shape == (height, width):
                return mask
            layer = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            return np.asarray(layer.resize(size, Image.Resampling.NEAREST)) > 127
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        return None
    return None


def _keypoints(value: Any, sx: float, sy: float) -> dict[int, tuple[float, float]]:
    """Index -> scaled (x, y) of the present keypoints (v > 0) of a flat ``[x, y, v] * K`` list."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) % 3:
        return {}
    triples = [_numbers(value[i : i + 3], 3) for i in range(0, len(value), 3)]
    return {i: (t[0] * sx, t[1] * sy) for i, t in enumerate(triples) if t is not None and t[2] > 0}


def _side(name: Any) -> Colour:
    """The colour of a keypoint by its name: ``left*``, ``right*``, anything else."""
    lowered = str(name).lower()
    if lowered.startswith("left"):
        return LEFT_COLOUR
    if lowered.startswith("right"):
        return RIGHT_COLOUR
    return CENTRE_COLOUR


def _line_colour(a: Colour, b: Colour) -> Colour:
    """A skeleton line's colour: a side's when it touches only that side (and maybe the centre)."""
    sides = {a, b} - {CENTRE_COLOUR}
    return sides.pop() if len(sides) == 1 else CENTRE_COLOUR


def _skeleton_pair(pair: Any, points: dict[int, tuple[float, float]]) -> tuple[int, int] | None:
    """The 0-based indices of a 1-based skeleton pair whose both keypoints are present, or None."""
    if not isinstance(pair, Sequence) or len(pair) != 2:
        return None
    a, b = pair
    if not (isinstance(a, int) and isinstance(b, int)) or (a - 1) not in points or (b - 1) not in points:
        return None
    return a - 1, b - 1


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    x: int,
    y: int,
    text: str,
    colour: Colour,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """``text`` on a tag in ``colour`` just above (x, y), or just below it when there is no room above."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0, min(x, size[0] - tag_w))
    y = y - tag_h if y - tag_h >= 0 else y
    draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=colour)
    ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)
