"""Does a longer labeled-only schedule still improve the teacher? The `synth` recipe on the embedded
benchmark's labeled split for each schedule length, scored on its test split (issue 17's first question).

    python bench/teacher_convergence.py [--data runs/bench-cache/data] [--out runs/bench-convergence] \
        [--iterations 300 600 900 1800] [--seed 0] [--preset medium] [--recipe synth]

Each length is its own run (the learning-rate schedule follows the length), so a line is what a teacher
trained for that many iterations scores. Prints one JSON line per length: training seconds and AP per head.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill import steps
from distill.data.synthetic import generate
from distill.demo import benchmark_is_current
from distill.specs import EvaluateSpec, TrainSpec


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("runs/bench-convergence/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-convergence"))
    parser.add_argument("--iterations", type=int, nargs="+", default=[300, 600, 900, 1800])
    parser.add_argument("--recipe", default="synth")
    parser.add_argument("--preset", default="medium", help="benchmark preset of --data")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> None:
    data = args.data
    if not (data / "labeled.json").exists():
        generate(data, preset=args.preset, seed=args.seed)
    elif not benchmark_is_current(data, args.preset, args.seed):
        raise SystemExit(f"{data}: not the {args.preset!r} benchmark of seed {args.seed}; use another --data")
    for n in args.iterations:
        model = args.out / f"teacher-{n}"
        start = time.perf_counter()
        steps.train(
            TrainSpec(out=str(model), labeled=str(data / "labeled.json"), labeled_images=str(data / "images"),
                      config=args.recipe, iterations=n, seed=args.seed)
        )  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = steps.evaluate(
            EvaluateSpec(model=str(model), truth=str(data / "test.json"), images=str(data / "images"))
        ).metrics
        ap = {head: round(100 * values["AP"], 1) for head, values in metrics.items()}
        print(json.dumps({"iterations": n, "train_s": round(seconds), **ap}), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
