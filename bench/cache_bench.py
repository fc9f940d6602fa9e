"""What the inference cache saves a nightly re-run: multi-view inference of one teacher over the same images
with no cache, with every image cached, and with a tenth of the images new — side by side, interleaved.

    python bench/cache_bench.py [--out runs/bench-cache] [--images 48] [--new 0.1] [--views ...] [--rounds 2]

Prints the seconds of each and their ratios to the uncached run; the fully cached output is checked equal
to the uncached one (and how many lines of the partial run differ is printed: its new images are batched
apart from the old ones). The
teacher is trained briefly on the embedded benchmark (its quality does not matter here, its detections'
count does a little: fusion and the keypoint / mask heads run per merged box).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from distill import steps
from distill.data.synthetic import generate
from distill.specs import InferenceSpec, InferSpec, TrainSpec

from timing import interleaved


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cache"))
    parser.add_argument("--images", type=int, default=48, help="unlabeled images inferred")
    parser.add_argument("--new", type=float, default=0.1, help="fraction of them new in the partial run")
    parser.add_argument("--views", default="0.75x,1x,1.25x:flip", help="the view set (paper: 18 views)")
    parser.add_argument("--teacher-iterations", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


def _images_json(data: Path, count: int, dest: Path) -> Path:
    coco = json.loads((data / "unlabeled.json").read_text())
    coco["images"] = coco["images"][:count]
    dest.write_text(json.dumps(coco))
    return dest


def main(args: argparse.Namespace) -> None:
    out = args.out
    data = out / "data"
    if not (data / "unlabeled.json").exists():
        generate(data, preset="medium", seed=0)
    teacher = out / "teacher"
    steps.train(
        TrainSpec(out=str(teacher), labeled=str(data / "labeled.json"), labeled_images=str(data / "images"),
                  config="synth", iterations=args.teacher_iterations, seed=0)
    )  # fmt: skip
    every = _images_json(data, args.images, out / "all.json")
    old = _images_json(data, args.images - round(args.new * args.images), out / "old.json")
    inference = InferenceSpec(views=args.views, batch_size=2)

    def infer(images: Path, name: str, cache: Path | None) -> str:
        target = out / f"{name}.jsonl"
        target.unlink(missing_ok=True)  # a finished output is reused: start clean every time
        spec = InferSpec(
            model=str(teacher), images=str(images), images_dir=str(data / "images"), out=str(target),
            inference=inference, cache=None if cache is None else str(cache),
        )  # fmt: skip
        info = steps.infer(spec).info
        return f"{info.get('cached', 0)} cached, {info.get('inferred', info['images'])} inferred"

    full, partial = out / "cache-full", out / "cache-partial"
    for folder in (full, partial):
        shutil.rmtree(folder, ignore_errors=True)
    infer(every, "fill-full", full)
    infer(old, "fill-partial", partial)
    said: dict[str, str] = {}

    def run(name: str, images: Path, cache: Path | None, fresh_from: Path | None = None):
        def go() -> None:
            used = cache
            if fresh_from is not None:  # the new images must be missing from the cache every round
                used = out / "cache-round"
                shutil.rmtree(used, ignore_errors=True)
                shutil.copytree(fresh_from, used)
            said[name] = infer(images, name, used)

        return go

    seconds = interleaved(
        {
            "no cache": run("cold", every, None),
            "every image cached": run("warm", every, full),
            f"{args.new:.0%} new images": run("partial", every, None, fresh_from=partial),
        },
        repeats=args.rounds,
    )
    cold, warm, partial_lines = (
        (out / f"{n}.jsonl").read_text().splitlines() for n in ("cold", "warm", "partial")
    )
    assert warm == cold, "the cached predictions differ from the uncached ones"
    # the new images are batched among themselves, not with their old neighbours: batch padding may move a
    # few numbers in the last digits (an inference property, not the cache's)
    moved = sum(a != b for a, b in zip(cold, partial_lines, strict=True))
    base = seconds["no cache"]
    print(
        f"{args.images} images x {args.views} ({inference.fusion}), best of {args.rounds} interleaved rounds"
    )
    for (name, value), detail in zip(seconds.items(), ("cold", "warm", "partial"), strict=True):
        print(f"  {name:>20}: {value:7.2f} s  = {value / base:.3f}x  ({said[detail]})")
    print(f"  every image cached: output identical; {args.new:.0%} new: {moved} of {len(cold)} lines differ")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
