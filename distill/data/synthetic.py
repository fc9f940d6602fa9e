"""A procedural COCO dataset: the embedded benchmark of distill.

It makes the data-distillation question measurable on a CPU in minutes. Every image holds 1..N objects of
four categories on a textured, cluttered background:

* ``disk``, ``square`` (rotated) and ``triangle`` (rotated, slightly irregular): instance masks only;
* ``figure``: a stick figure (head disk, torso, two arms, two legs) with 9 keypoints, a skeleton, an OKS
  sigma per keypoint and a left/right flip map on its category.

Left and right are defined by chirality, as for real people: a figure is always seen from the front, so in
its own frame (head up) its LEFT limbs lie on the image's RIGHT side of the body axis. Figures are rotated
(up to ``max_rotation_deg``) and posed asymmetrically, and both sides are drawn alike, so a model has to learn
"left = right of the up axis"; a horizontal flip swaps the meaning, which is what flip-map un-swapping fixes.

Object sizes are log-uniform from ``min_object_size`` pixels to ``max_object_frac`` of the shorter image side.
Objects drawn later occlude earlier ones; an annotation describes the VISIBLE part (mask, tight box, pixel
area). An object whose visible fraction (visible pixels / pixels of the whole shape, including any part off
the image) is below ``min_visible`` is not drawn at all, so the image never shows an unannotated object;
the unannotated clutter (lines, dots, rings, blobs) is drawn on the background, beneath all objects.
Figure keypoints: ``v=0`` and ``x=y=0`` outside the image, ``v=1`` under a later object, else ``v=2``.

Images are saved as PNG: lossless, so the pixels a model sees are exactly the ones the masks were computed
for (JPEG would smear the edges of the 12-pixel objects the benchmark depends on), and decoding gives the
same array on every platform.

Everything is a pure function of ``(preset, seed, split, index)``: each image has its own
``numpy.random.Generator`` seeded from that tuple, so a single image can be regenerated on its own
(:func:`render_image`) and :func:`generate` writes byte-identical files for the same arguments.

Layout written by :func:`generate`::

    OUT/images/labeled/000001.png ...      OUT/labeled.json            (images + annotations)
    OUT/images/unlabeled/000001.png ...    OUT/unlabeled.json          (images, NO annotations)
                                           OUT/unlabeled_truth.json    (measurement only, never the pipeline)
    OUT/images/test/000001.png ...         OUT/test.json               (held out, with annotations)

``file_name`` is relative to ``OUT/images/``. Image ids are ``1_000_000 * split_number + index + 1``
(split numbers: labeled 1, unlabeled 2, test 3) and annotation ids ``10_000_000 * split_number + k``,
so ids never collide across splits.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from distill.data.presets import (
    _IMAGE_ID_STRIDE,
    _SPLIT_NUMBER,
    PRESETS,
    SPLITS,
    SynthPreset,
    _check_split,
    resolve_preset,
)
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_json_atomic

__all__ = [
    "CATEGORIES",
    "FIGURE_FLIP_MAP",
    "FIGURE_KEYPOINTS",
    "FIGURE_SIGMAS",
    "FIGURE_SKELETON",
    "GENERATOR_VERSION",
    "PRESETS",
    "SPLITS",
    "SynthPreset",
    "SynthResult",
    "generate",
    "render_image",
    "resolve_preset",
]

GENERATOR_VERSION = "1.0"

_ANNOTATION_ID_STRIDE = 10_000_000

DISK, SQUARE, TRIANGLE, FIGURE = 1, 2, 3, 4

FIGURE_KEYPOINTS: tuple[str, ...] = (
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_hand",
    "right_hand",
    "left_hip",
    "right_hip",
    "left_foot",
    "right_foot",
)
FIGURE_SKELETON: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 3), (2, 3), (2, 4), (3, 5), (2, 6), (3, 7), (6, 7), (6, 8), (7, 9),
)  # fmt: skip
FIGURE_FLIP_MAP: tuple[tuple[str, str], ...] = (
    ("left_shoulder", "right_shoulder"),
    ("left_hand", "right_hand"),
    ("left_hip", "right_hip"),
    ("left_foot", "right_foot"),
)
FIGURE_SIGMAS: tuple[float, ...] = (0.05, 0.07, 0.07, 0.07, 0.07, 0.09, 0.09, 0.08, 0.08)

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": DISK, "name": "disk", "supercategory": "shape"},
    {"id": SQUARE, "name": "square", "supercategory": "shape"},
    {"id": TRIANGLE, "name": "triangle", "supercategory": "shape"},
    {
        "id": FIGURE,
        "name": "figure",
        "supercategory": "person",
        "keypoints": list(FIGURE_KEYPOINTS),
        "skeleton": [list(pair) for pair in FIGURE_SKELETON],
        "keypoint_flip_map": [list(pair) for pair in FIGURE_FLIP_MAP],
        "keypoint_sigmas": list(FIGURE_SIGMAS),
    },
)

# Smallest figure: below this a stick figure's limbs and keypoints are no longer meaningful.
_MIN_FIGURE_SIZE = 20.0
# Wanted RGB distance between an object's colour and (most of) the background under it.
_MIN_CONTRAST = 80.0


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# --------------------------------------------------------------------------------------------- geometry


@dataclass
class _Shape:
    """One object before compositing: its whole mask on a local canvas and how to paint it."""

    category_id: int
    size: float
    mask: np.ndarray  # bool, whole shape (nothing clipped), on the canvas at (x0, y0)
    x0: int
    y0: int
    color: np.ndarray  # float32 (3,)
    shade_dir: np.ndarray  # unit vector (2,) of the shading gradient in image coordinates
    shade_amp: float
    center: np.ndarray  # (2,) image coordinates
    keypoints: np.ndarray | None = None  # (9, 2) COCO coordinates, figures only
    visible: np.ndarray | None = field(default=None)  # bool, full image, set by compositing


def _rotation(angle: float) -> np.ndarray:
    """2x2 rotation matrix acting on (x, y) column vectors in image coordinates (y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _canvas(center: np.ndarray, radius: float) -> tuple[Image.Image, int, int]:
    """A blank mode-'1' canvas covering the disc of ``radius`` around ``center``, and its origin."""
    x0 = math.floor(center[0] - radius) - 2
    y0 = math.floor(center[1] - radius) - 2
    side = math.ceil(2 * radius) + 5
    return Image.new("1", (side, side), 0), x0, y0


def _local(points: np.ndarray, x0: int, y0: int) -> list[tuple[float, float]]:
    """COCO coordinates (pixel j spans [j, j+1)) to PIL coordinates on a canvas at (x0, y0)."""
    return [(float(x) - x0 - 0.5, float(y) - y0 - 0.5) for x, y in points]


def _draw_disc(draw: ImageDraw.ImageDraw, x: float, y: float, r: float) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=1)


def _disk_mask(center: np.ndarray, size: float) -> tuple[np.ndarray, int, int]:
    canvas, x0, y0 = _canvas(center, size / 2)
    ((cx, cy),) = _local(center[None], x0, y0)
    _draw_disc(ImageDraw.Draw(canvas), cx, cy, size / 2)
    return np.array(canvas, dtype=bool), x0, y0


def _polygon_mask(center: np.ndarray, vertices: np.ndarray, radius: float) -> tuple[np.ndarray, int, int]:
    canvas, x0, y0 = _canvas(center, radius)
    ImageDraw.Draw(canvas).polygon(_local(vertices, x0, y0), fill=1)
    return np.array(canvas, dtype=bool), x0, y0


def _square_vertices(rng: np.random.Generator, center: np.ndarray, size: float) -> np.ndarray:
    """A square whose diagonal is ``size``, rotated uniformly."""
    angles = rng.uniform(0, math.pi / 2) + np.arange(4) * math.pi / 2
    return center + size / 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _triangle_vertices(rng: np.random.Generator, center: np.ndarray, size: float) -> np.ndarray:
    """A near-equilateral triangle inscribed in a circle of diameter ``size``, rotated uniformly."""
    angles = rng.uniform(0, 2 * math.pi / 3) + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15, 3)
    radii = size / 2 * rng.uniform(0.88, 1.0, 3)
    return center + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _figure_keypoints(
    rng: np.random.Generator, center: np.ndarray, size: float, max_rot: float
) -> np.ndarray:
    """The 9 keypoints of a stick figure ``size`` pixels tall, in COCO image coordinates.

    Built in the figure's own frame (x to the image right when upright, y down, head at negative y); the
    figure faces the viewer, so its LEFT side is at +x. Only a proper rotation is applied afterwards, which
    keeps the chirality: left limbs stay on the right of the up axis.
    """
    shoulder_w = rng.uniform(0.10, 0.14)
    hip_w = rng.uniform(0.05, 0.08)
    arm_len = rng.uniform(0.26, 0.32)
    leg_len = rng.uniform(0.38, 0.44)
    arm_angles = np.radians(rng.uniform(-30, 160, 2))  # from straight down, outward positive
    leg_angles = np.radians(rng.uniform(-5, 40, 2))
    head = np.array([0.0, -0.40])
    shoulders = np.array([[shoulder_w, -0.27], [-shoulder_w, -0.27]])  # left, right
    hips = np.array([[hip_w, 0.04], [-hip_w, 0.04]])
    outward = np.array([1.0, -1.0])  # left limbs point to +x, right ones to -x
    hands = shoulders + arm_len * np.stack([outward * np.sin(arm_angles), np.cos(arm_angles)], axis=1)
    feet = hips + leg_len * np.stack([outward * np.sin(leg_angles), np.cos(leg_angles)], axis=1)
    local = np.array(
        [head, shoulders[0], shoulders[1], hands[0], hands[1], hips[0], hips[1], feet[0], feet[1]]
    )
    local[:, 1] -= 0.02  # centre the figure vertically (head top -0.49 .. feet about +0.46)
    angle = math.radians(rng.uniform(-max_rot, max_rot))
    return center + size * local @ _rotation(angle).T


def _figure_mask(keypoints: np.ndarray, size: float) -> tuple[np.ndarray, int, int]:
    """Draw the silhouette: head disc, torso, four limbs with round joints (left and right alike)."""
    k = dict(zip(FIGURE_KEYPOINTS, keypoints, strict=True))
    center = (k["left_hip"] + k["right_hip"] + k["left_shoulder"] + k["right_shoulder"]) / 4
    limb_w = max(2.0, 0.065 * size)
    radius = float(np.max(np.linalg.norm(keypoints - center, axis=1))) + 0.1 * size + limb_w
    canvas, x0, y0 = _canvas(center, radius)
    draw = ImageDraw.Draw(canvas)
    p = {name: _local(point[None], x0, y0)[0] for name, point in k.items()}
    neck = _local(((k["left_shoulder"] + k["right_shoulder"]) / 2)[None], x0, y0)[0]
    pelvis = _local(((k["left_hip"] + k["right_hip"]) / 2)[None], x0, y0)[0]

    def limb(a: tuple[float, float], b: tuple[float, float], width: float) -> None:
        draw.line([a, b], fill=1, width=max(1, round(width)))
        _draw_disc(draw, *a, width / 2)
        _draw_disc(draw, *b, width / 2)

    limb(neck, pelvis, 1.6 * limb_w)
    limb(p["left_shoulder"], p["right_shoulder"], limb_w)
    limb(p["left_hip"], p["right_hip"], limb_w)
    for side in ("left", "right"):
        limb(p[f"{side}_shoulder"], p[f"{side}_hand"], limb_w)
        limb(p[f"{side}_hip"], p[f"{side}_foot"], limb_w)
    limb(p["head"], neck, limb_w)
    _draw_disc(draw, *p["head"], max(2.5, 0.09 * size))
    return np.array(canvas, dtype=bool), x0, y0


# --------------------------------------------------------------------------------------------- background


def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1], shape (h, w): a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    smooth = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def _pattern(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A scalar pattern in [0, 1] of the given kind, shape (h, w)."""
    xs, ys = _coords(h, w)
    theta = rng.uniform(0, math.pi)
    u = xs * math.cos(theta) + ys * math.sin(theta)
    if kind == "gradient":
        return (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    if kind == "stripes":
        period = rng.uniform(6, 40)
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
    if kind == "checker":
        cell = rng.uniform(8, 48)
        v = -xs * math.sin(theta) + ys * math.cos(theta)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    return _value_noise(rng, h, w, int(rng.integers(3, 13)))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured RGB background, float32 (h, w, 3) in [0, 255]."""
    kind = ("gradient", "stripes", "noise", "checker")[int(rng.integers(4))]
    base = _random_color(rng)
    other = base + rng.uniform(0.25, 0.7) * (_random_color(rng) - base)
    t = _pattern(rng, kind, h, w)
    img = base + t[..., None] * (other - base)
    texture = _value_noise(rng, h, w, int(rng.integers(8, 33))) - 0.5
    img += rng.uniform(0, 50) * texture[..., None]
    return np.clip(img, 0, 255)


def _draw_distractors(rng: np.random.Generator, img: Image.Image, count: int) -> None:
    """Unannotated clutter on the background: lines, dots, rings and irregular blobs."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(count):
        kind = int(rng.integers(4))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if kind == 0:  # line
            length, angle = rng.uniform(10, 0.6 * max(w, h)), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=color, width=int(rng.integers(1, 4)))
        elif kind == 1:  # dot
            r = rng.uniform(1, 3.5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif kind == 2:  # ring: a hollow disk
            r = rng.uniform(4, 28)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=int(rng.integers(1, 3)))
        else:  # blob: an elongated, irregular polygon (clearly not a disk, square or triangle)
            n = int(rng.integers(7, 11))
            angles = np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.uniform(-0.2, 0.2, n)
            radii = rng.uniform(4, 20) * rng.uniform(0.35, 1.0, n)
            local = np.stack([radii * np.cos(angles), rng.uniform(0.4, 1.0) * radii * np.sin(angles)], axis=1)
            pts = np.array([x, y]) + local @ _rotation(rng.uniform(0, math.pi)).T
            draw.polygon([(float(px), float(py)) for px, py in pts], fill=color)


# --------------------------------------------------------------------------------------------- objects


def _sample_sizes(rng: np.random.Generator, preset: SynthPreset, n: int, h: int, w: int) -> np.ndarray:
    """Log-uniform object sizes in pixels."""
    high = preset.max_object_frac * min(h, w)
    return np.exp(rng.uniform(math.log(preset.min_object_size), math.log(high), n))


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the ``background`` pixels (N, 3) under the object.

    The score is the 20th percentile of the RGB distances to those pixels, so a two-colour texture
    (checker, stripes) counts with both of its colours. Best of up to 12 draws.
    """
    if len(background) > 256:
        background = background[:: len(background) // 256 + 1]
    best, best_score = _random_color(rng), -1.0
    for _ in range(12):
        color = _random_color(rng)
        score = float(np.percentile(np.linalg.norm(background - color, axis=1), 20))
        if score > best_score:
            best, best_score = color, score
        if score >= _MIN_CONTRAST:
            break
    return best


def _make_shape(
    rng: np.random.Generator, preset: SynthPreset, category_id: int, size: float, h: int, w: int
) -> _Shape:
    """Place one object of ``category_id`` and draw its whole mask."""
    center = np.array([rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)])
    keypoints = None
    angle = rng.uniform(0, 2 * math.pi)
    shade_dir = np.array([math.cos(angle), math.sin(angle)])
    if category_id == DISK:
        mask, x0, y0 = _disk_mask(center, size)
    elif category_id == SQUARE:
        mask, x0, y0 = _polygon_mask(center, _square_vertices(rng, center, size), size / 2)
    elif category_id == TRIANGLE:
        mask, x0, y0 = _polygon_mask(center, _triangle_vertices(rng, center, size), size / 2)
    else:
        size = max(size, _MIN_FIGURE_SIZE)
        keypoints = _figure_keypoints(rng, center, size, preset.max_rotation_deg)
        mask, x0, y0 = _figure_mask(keypoints, size)
        # Shade along the body axis only: a sideways gradient would tell left from right by colour.
        up = keypoints[0] - (keypoints[5] + keypoints[6]) / 2
        shade_dir = up / max(float(np.linalg.norm(up)), 1e-6)
    return _Shape(
        category_id=category_id,
        size=float(size),
        mask=mask,
        x0=x0,
        y0=y0,
        color=np.zeros(3, np.float32),
        shade_dir=shade_dir,
        shade_amp=float(rng.uniform(0, 0.25)),
        center=center,
        keypoints=keypoints,
    )


def _paste(shape: _Shape, h: int, w: int) -> np.ndarray:
    """The shape's mask clipped onto a full (h, w) boolean image."""
    full = np.zeros((h, w), dtype=bool)
    mh, mw = shape.mask.shape
    ys, xs = max(shape.y0, 0), max(shape.x0, 0)
    ye, xe = min(shape.y0 + mh, h), min(shape.x0 + mw, w)
    if ys < ye and xs < xe:
        full[ys:ye, xs:xe] = shape.mask[ys - shape.y0 : ye - shape.y0, xs - shape.x0 : xe - shape.x0]
    return full


def _resolve_occlusion(shapes: list[_Shape], h: int, w: int, min_visible: float) -> list[_Shape]:
    """Keep the shapes (in drawing order) whose visible fraction is at least ``min_visible``.

    Walks from the last-drawn shape backwards: a shape's visibility depends only on the kept shapes drawn
    after it, so one pass decides everything. Sets ``visible`` on the kept shapes.
    """
    covered = np.zeros((h, w), dtype=bool)
    kept: list[_Shape] = []
    for shape in reversed(shapes):
        whole = int(shape.mask.sum())
        visible = _paste(shape, h, w) & ~covered
        if whole > 0 and visible.sum() >= max(min_visible * whole, 1):
            shape.visible = visible
            covered |= visible
            kept.append(shape)
    kept.reverse()
    return kept


def _paint(rng: np.random.Generator, img: np.ndarray, shape: _Shape) -> None:
    """Fill the shape's visible pixels of ``img`` with its (shaded, lightly textured) colour."""
    ys, xs = np.nonzero(shape.visible)
    proj = (xs - shape.center[0]) * shape.shade_dir[0] + (ys - shape.center[1]) * shape.shade_dir[1]
    shade = 1.0 + shape.shade_amp * np.clip(proj / (shape.size / 2), -1, 1)
    grain = rng.normal(0, 4.0, (len(ys), 1)) if shape.size > 24 else 0.0
    img[ys, xs] = np.clip(shape.color * shade[:, None] + grain, 0, 255)


# --------------------------------------------------------------------------------------------- annotations


def _mask_annotation(category_id: int, visible: np.ndarray) -> dict[str, Any]:
    """COCO fields of one visible mask: compressed RLE, tight XYWH box, pixel area."""
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    bbox = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "category_id": category_id,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
        "area": float(visible.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


def _keypoint_fields(shape: _Shape, owner: np.ndarray, index: int) -> dict[str, Any]:
    """COCO ``keypoints`` / ``num_keypoints`` of a figure, with visibility from the owner map."""
    h, w = owner.shape
    flat: list[float] = []
    for x, y in shape.keypoints:
        col, row = math.floor(x), math.floor(y)
        if not (0 <= col < w and 0 <= row < h):
            flat += [0.0, 0.0, 0]
            continue
        v = 1 if owner[row, col] > index else 2
        flat += [round(float(x), 2), round(float(y), 2), v]
    return {"keypoints": flat, "num_keypoints": sum(1 for v in flat[2::3] if v > 0)}


# --------------------------------------------------------------------------------------------- rendering


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_NUMBER[split], index]))


def _plan_objects(
    rng: np.random.Generator, preset: SynthPreset, bg: np.ndarray, h: int, w: int
) -> list[_Shape]:
    """Sample classes, sizes and colours; order them mostly large-to-small (large ones behind)."""
    n = int(rng.integers(preset.min_objects, preset.max_objects + 1))
    weights = np.asarray(preset.class_weights, dtype=float)
    classes = rng.choice(4, size=n, p=weights / weights.sum()) + 1
    sizes = _sample_sizes(rng, preset, n, h, w)
    order = np.argsort(-(np.log(sizes) + rng.normal(0, 0.4, n)), kind="stable")
    shapes = []
    for i in order:
        shape = _make_shape(rng, preset, int(classes[i]), float(sizes[i]), h, w)
        under = bg[_paste(shape, h, w)]
        shape.color = _contrasting_color(rng, under if len(under) else bg.reshape(-1, 3))
        shapes.append(shape)
    return shapes


def render_image(
    preset: str | SynthPreset, seed: int, split: str, index: int
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Render image ``index`` of ``split``: the RGB image and its COCO annotations (no ids, no image_id).

    A pure function of its arguments. Annotations are in drawing order; figures carry ``keypoints`` and
    ``num_keypoints``.
    """
    p = resolve_preset(preset)
    _check_split(split)
    _check_seed(seed)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = _image_rng(seed, split, index)
    w, h = (int(v) for v in rng.integers(p.min_side, p.max_side + 1, 2))

    bg = _background(rng, h, w)
    canvas = Image.fromarray(bg.astype(np.uint8), "RGB")
    _draw_distractors(rng, canvas, _distractor_count(rng, p, h, w))
    img = np.asarray(canvas, dtype=np.float32).copy()

    shapes = _resolve_occlusion(_plan_objects(rng, p, bg, h, w), h, w, p.min_visible)
    owner = np.full((h, w), -1, dtype=np.int32)
    for i, shape in enumerate(shapes):
        _paint(rng, img, shape)
        owner[shape.visible] = i

    annotations = []
    for i, shape in enumerate(shapes):
        ann = _mask_annotation(shape.category_id, shape.visible)
        if shape.keypoints is not None:
            ann.update(_keypoint_fields(shape, owner, i))
        annotations.append(ann)
    return _degrade(rng, img, p), annotations


def _distractor_count(rng: np.random.Generator, p: SynthPreset, h: int, w: int) -> int:
    """Number of clutter items, scaled with the image area (relative to 256 x 256)."""
    n = rng.integers(p.min_distractors, p.max_distractors + 1)
    return round(int(n) * h * w / 256**2)


def _degrade(rng: np.random.Generator, img: np.ndarray, p: SynthPreset) -> Image.Image:
    """Mild blur and Gaussian sensor noise; returns the final 8-bit RGB image."""
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    radius = rng.uniform(0, p.max_blur_radius)
    if radius > 0.2:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    sigma = rng.uniform(0, p.max_noise_sigma)
    noisy = np.asarray(out, dtype=np.float32) + rng.normal(0, 1, (out.height, out.width, 3)) * sigma
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote."""

    out_dir: Path
    image_dir: Path
    labeled_json: Path
    unlabeled_json: Path
    unlabeled_truth_json: Path
    test_json: Path
    num_images: dict[str, int]
    num_annotations: dict[str, int]
    preset: SynthPreset
    seed: int


# json file stem -> (split, whether it carries the annotations)
_JSON_FILES = {
    "labeled": ("labeled", True),
    "unlabeled": ("unlabeled", False),
    "unlabeled_truth": ("unlabeled", True),
    "test": ("test", True),
}


def _image_id(split: str, index: int) -> int:
    return _IMAGE_ID_STRIDE * _SPLIT_NUMBER[split] + index + 1


def _file_name(split: str, index: int) -> str:
    return f"{split}/{index + 1:06d}.png"


def _info(preset: SynthPreset, seed: int, split: str) -> dict[str, Any]:
    """The COCO ``info`` block. Its date derives from the seed, not the clock, to keep files identical."""
    date = datetime.date(2018, 1, 1) + datetime.timedelta(days=seed % 3653)
    return {
        "description": f"distill synthetic benchmark ({split} split)",
        "version": GENERATOR_VERSION,
        "year": date.year,
        "date_created": date.isoformat(),
        "contributor": "distill.data.synthetic",
        "preset": preset.name,
        "preset_params": dataclasses.asdict(preset),
        "seed": seed,
        "split": split,
    }


def _coco(preset: SynthPreset, seed: int, split: str, images: list, annotations: list | None) -> dict:
    """A COCO dict; without ``annotations`` (None) the key is left out: an image-only, unlabeled file."""
    data: dict[str, Any] = {
        "info": _info(preset, seed, split),
        "licenses": [],
        "images": images,
        "categories": [copy.deepcopy(c) for c in CATEGORIES],
    }
    if annotations is not None:
        data["annotations"] = annotations
    return data


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_split(
    preset: SynthPreset,
    seed: int,
    split: str,
    image_root: Path,
    tick: Callable[[], None],
) -> tuple[list[dict], list[dict]]:
    """Render and save every image of ``split``; return its COCO images and annotations."""
    images: list[dict] = []
    annotations: list[dict] = []
    next_ann_id = _ANNOTATION_ID_STRIDE * _SPLIT_NUMBER[split] + 1
    for index in range(preset.count(split)):
        image, anns = render_image(preset, seed, split, index)
        image_id, file_name = _image_id(split, index), _file_name(split, index)
        (image_root / file_name).write_bytes(_png_bytes(image))
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for ann in anns:
            annotations.append({"id": next_ann_id, "image_id": image_id, **ann})
            next_ann_id += 1
        tick()
    return images, annotations


def generate(
    out_dir: str | os.PathLike[str],
    *,
    preset: str | SynthPreset = "demo",
    seed: int = 0,
    context: StepContext = NULL_CONTEXT,
    **overrides: Any,
) -> SynthResult:
    """Write the synthetic dataset to ``out_dir`` (see the module docstring for the layout).

    ``overrides`` replace preset fields, e.g. ``num_unlabeled=2000``. A ``synth`` progress event follows
    each image, and a cancel (``context``) raises :class:`~distill.errors.Cancelled` between images (no
    json written). Raises ValueError for an unknown preset, an unknown override or a bad seed.

    Images are written plainly; the four json files are removed first and written (atomically) last, so
    they exist only once every image they list is complete. Files of an earlier, larger run in the same
    directory are not removed.
    """
    p = resolve_preset(preset, **overrides)
    _check_seed(seed)
    out = Path(out_dir)
    image_root = out / "images"
    total = sum(p.count(s) for s in SPLITS)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        context.report("synth", done, total)
        context.check_cancelled(lambda: f"synthetic data after {done} of {total} images (no json written)")

    paths = {stem: out / f"{stem}.json" for stem in _JSON_FILES}
    for path in paths.values():  # the json files are the commit marker: none until all images are written
        path.unlink(missing_ok=True)
    for split in SPLITS:
        (image_root / split).mkdir(parents=True, exist_ok=True)
    rendered = {split: _render_split(p, seed, split, image_root, tick) for split in SPLITS}
    for stem, (split, with_annotations) in _JSON_FILES.items():
        images, annotations = rendered[split]
        write_json_atomic(
            paths[stem], _coco(p, seed, split, images, annotations if with_annotations else None)
        )
    return SynthResult(
        out_dir=out,
        image_dir=image_root,
        labeled_json=paths["labeled"],
        unlabeled_json=paths["unlabeled"],
        unlabeled_truth_json=paths["unlabeled_truth"],
        test_json=paths["test"],
        num_images={s: len(rendered[s][0]) for s in SPLITS},
        num_annotations={s: len(rendered[s][1]) for s in SPLITS},
        preset=p,
        seed=seed,
    )
