"""Training iterations/s and inference images/s of the `synth` recipe's model (the demo's until 2026-12-04).

    python bench/train_infer_speed.py [--iterations 20] [--images 32] [--device cpu]

Generates a small slice of the `medium` benchmark in a temp dir, times `--iterations` training steps (after 2
warm-up steps) and plain batched inference over `--images` test images. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from distill.data.coco import load_coco
from distill.data.images import iter_image_refs
from distill.data.synthetic import generate
from distill.models.config import config_from_coco_categories
from distill.predict import iter_predictions
from distill.recipes import load_recipe
from distill.train.data import CocoDetectionDataset
from distill.train.loop import TrainConfig, train_detector
from distill.train.torchvision import build_detector


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(args: argparse.Namespace) -> dict:
    recipe = load_recipe("synth")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, preset="medium", seed=0, num_labeled=32, num_unlabeled=0, num_test=args.images)
        dataset = load_coco(data / "labeled.json")
        config = config_from_coco_categories(dataset.categories, **recipe["model"])
        torch.manual_seed(0)
        detector = build_detector(config, device=args.device)
        train_data = CocoDetectionDataset(dataset, data / "images", config)

        warm = TrainConfig(**{**recipe["train"], "iterations": 2, "batch_size": args.batch_size})
        train_detector(detector, train_data, warm, Path(tmp) / "warm")
        timed = TrainConfig(
            **{
                **recipe["train"],
                "iterations": args.iterations,
                "batch_size": args.batch_size,
                "checkpoint_period": 10**9,
                "seed": 1,
            }
        )
        result = train_detector(detector, train_data, timed, Path(tmp) / "timed")
        train_its = result.iterations / result.seconds

        refs = iter_image_refs(data / "test.json", images_dir=data / "images")
        list(iter_predictions(detector, refs[:4], batch_size=args.batch_size))  # warm-up
        started = time.perf_counter()
        count = sum(1 for _ in iter_predictions(detector, refs, batch_size=args.batch_size))
        infer_ips = count / (time.perf_counter() - started)
    report = {
        "bench": "train_infer_speed",
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "recipe": "synth",
        "batch_size": args.batch_size,
        "train_iterations_per_s": round(train_its, 3),
        "train_images_per_s": round(train_its * args.batch_size, 2),
        "inference_images_per_s": round(infer_ips, 2),
    }
    print(
        f"training : {train_its:.2f} it/s  ({train_its * args.batch_size:.1f} images/s, "
        f"batch {args.batch_size})"
    )
    print(f"inference: {infer_ips:.2f} images/s (one plain view, batch {args.batch_size})")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
