"""The view set of multi-transform inference: shorter-side sizes, each with and without a horizontal flip.

The paper's set is 400, 500, ..., 1200 px with and without flip (18 views). Sizes are given in absolute pixels
(``400,500,600``) or relative to the model's own test size (``0.5x,1x,1.5x``), so a model trained at 256 px
gets the paper's *ratios* (400/800 ... 1200/800) rather than absurd upscaling. Spec grammar::

    paper                     the paper's 9 sizes relative to an 800 px test size, x flip
    none                      one plain view at the model's test size (equals plain inference)
    SIZES[:flip]              comma-separated sizes, 'px' or 'x' suffix optional/required, e.g. 400,600:flip
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.errors import InputError

PAPER_SIZES = tuple(range(400, 1201, 100))
PAPER_TEST_SIZE = 800


@dataclass(frozen=True)
class View:
    """One transform: shorter side resized to ``size`` px (longer side capped at ``max_size``), maybe flip."""

    size: int
    max_size: int
    flip: bool = False

    def __str__(self) -> str:
        return f"{self.size}{'f' if self.flip else ''}"


@dataclass(frozen=True)
class ViewSet:
    """An ordered set of views plus the test size they were resolved against."""

    views: tuple[View, ...]
    test_size: int
    spec: str

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self):
        return iter(self.views)

    def to_dict(self) -> dict:
        return {
            "spec": self.spec,
            "test_size": self.test_size,
            "views": [{"size": v.size, "max_size": v.max_size, "flip": v.flip} for v in self.views],
        }


def parse_views(spec: str, *, test_size: int, max_size: int) -> ViewSet:
    """Resolve a view spec against a model's test size and size cap (see the module docstring)."""
    text = spec.strip().lower()
    if not text:
        raise InputError("empty view spec; use 'paper', 'none' or e.g. '400,600:flip'")
    if text == "none":
        return ViewSet((View(test_size, max_size),), test_size, spec)
    if text == "paper":
        ratios = [s / PAPER_TEST_SIZE for s in PAPER_SIZES]
        return _build([max(1, round(r * test_size)) for r in ratios], True, test_size, max_size, ratios, spec)
    sizes_text, _, flag = text.partition(":")
    if flag not in ("", "flip"):
        raise InputError(f"view spec {spec!r}: unknown suffix ':{flag}' (only ':flip')")
    sizes, ratios = [], []
    for item in sizes_text.split(","):
        item = item.strip()
        try:
            if item.endswith("x"):
                ratio = float(item[:-1])
                sizes.append(max(1, round(ratio * test_size)))
                ratios.append(ratio)
            else:
                size = int(item.removesuffix("px"))
                sizes.append(size)
                ratios.append(size / test_size)
        except ValueError:
            raise InputError(f"view spec {spec!r}: {item!r} is not a size like 600, 600px or 0.75x") from None
        if sizes[-1] < 16:
            raise InputError(f"view spec {spec!r}: size {sizes[-1]} px is too small (minimum 16)")
    return _build(sizes, flag == "flip", test_size, max_size, ratios, spec)


def _build(sizes, flip: bool, test_size: int, max_size: int, ratios, spec: str) -> ViewSet:
    # the longer-side cap scales with the view, as Detectron's TEST.MAX_SIZE does relative to TEST.SCALE
    views = []
    for size, ratio in zip(sizes, ratios, strict=True):
        cap = max(size, round(max_size * ratio))
        views.append(View(size, cap, False))
        if flip:
            views.append(View(size, cap, True))
    unique = tuple(dict.fromkeys(views))
    return ViewSet(unique, test_size, spec)
