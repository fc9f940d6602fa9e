"""Shrink two screenshots of ``tests/ui/test_live_stack.py`` into the README's ``docs/images/``.

Run the live browser test first (``pytest tests/ui/test_live_stack.py``), then ``python
tools/readme_screenshots.py``: each page is cut to its top, scaled to 860 px wide and reduced to a palette so
that the committed PNGs stay near 100 KB."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

# screenshot -> (README image, rows of the full-size page kept (None: all), palette colours)
PAGES = {
    "live-job-detail": ("dashboard-job-detail", None, 64),
    "live-pseudo-browser": ("dashboard-pseudo-browser", 1100, 128),
}
WIDTH = 860


def shrink(source: Path, target: Path, keep_rows: int | None, colours: int) -> None:
    image = Image.open(source).convert("RGB")
    if keep_rows is not None:
        image = image.crop((0, 0, image.width, min(keep_rows, image.height)))
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshots", type=Path, default=Path("runs/screenshots"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (target, keep_rows, colours) in PAGES.items():
        source = args.screenshots / f"{name}.png"
        if not source.is_file():
            raise SystemExit(f"{source}: missing; run pytest tests/ui/test_live_stack.py first")
        out = args.out / f"{target}.png"
        shrink(source, out, keep_rows, colours)
        print(f"{out}: {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
