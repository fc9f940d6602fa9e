"""Multi-view engine costs and quality, measured side by side in one run.

    python bench/multiview_engine.py --model runs/demo/teacher --data runs/demo/data [--views paper]

1. engine (batched per view, backbone once per view) vs a naive loop (one forward per image per view, and
   the backbone run again per image per view for the heads on the merged boxes), same model/views/images
2. engine with keypoint + mask fusion vs the same engine box-only (heads skipped)
3. engine time / sum of plain single-view forwards (prepare + backbone + detect) at each view size (the floor)
4. quality: COCO AP of fused multi-view predictions vs single-view predictions of the same model, scored on
   the unlabeled split's hidden truth (``unlabeled_truth.json``)
Prints a table and a final JSON line. Timings are medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from distill.data.coco import load_coco
from distill.data.images import decode_images, iter_image_refs
from distill.evaluate import evaluate
from distill.export import detections_to_coco
from distill.models.store import load_model
from distill.structures import Detections
from distill.train.data import image_to_tensor
from distill.tta.boxes import fuse_boxes
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import parse_views


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a `distill synth` output folder")
    parser.add_argument("--images", type=int, default=16, help="images for the timing runs")
    parser.add_argument("--quality-images", type=int, default=200, help="unlabeled images scored for quality")
    parser.add_argument("--views", default="paper")
    parser.add_argument(
        "--score-floor", type=float, default=0.0, help="fused boxes below it get no heads (FusionConfig)"
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=100,
        help="fused boxes kept per image; the heads run on these (pseudo-labels need a few x the labeled "
        "density; the demo uses 20)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def naive_multiview(detector, views, images: list[torch.Tensor], max_detections: int) -> list[Detections]:
    """The loop people write by hand: every image alone through every view, twice."""
    out = []
    flip = detector.keypoint_flip_indices()
    for image in images:
        boxes, scores, labels, view_ids = [], [], [], []
        for v, view in enumerate(views):
            batch = detector.prepare([image], size=view.size, flip=view.flip, max_size=view.max_size)
            det = detector.detect(detector.features(batch), batch)[0]
            boxes.append(batch.transforms[0].inverse_boxes(det.boxes))
            scores.append(det.scores)
            labels.append(det.labels)
            view_ids.append(torch.full_like(det.labels, v))
        fused = fuse_boxes(
            torch.cat(boxes),
            torch.cat(scores),
            torch.cat(labels),
            view_ids=torch.cat(view_ids),
            num_views=len(views),
            max_detections=max_detections,
        )
        masks, kps = 0, 0
        for view in views:  # heads: the backbone runs again for every view
            batch = detector.prepare([image], size=view.size, flip=view.flip, max_size=view.max_size)
            feats = detector.features(batch)
            view_boxes = [batch.transforms[0].apply_boxes(fused.boxes)]
            if detector.has_masks:
                m = detector.mask_probs(feats, batch, view_boxes, [fused.labels])[0]
                masks = masks + (m.flip(-1) if view.flip else m)
            if detector.has_keypoints:
                k = detector.keypoint_logits(feats, batch, view_boxes)[0]
                kps = kps + (k.flip(-1)[:, flip] if view.flip else k)
        out.append(Detections(fused.boxes, fused.scores, fused.labels))
    return out


@torch.inference_mode()
def floor(detector, views, images: list[torch.Tensor], batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for view in views:
            batch = detector.prepare(chunk, size=view.size, flip=view.flip, max_size=view.max_size)
            detector.detect(detector.features(batch), batch)


def run_engine(engine: MultiViewEngine, images: list[torch.Tensor], batch_size: int) -> list:
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(engine.predict(images[start : start + batch_size]))
    return out


def _load(refs) -> tuple[list, list[torch.Tensor]]:
    kept, tensors = [], []
    for ref, image, _ in decode_images(refs):
        if image is not None:
            kept.append(ref)
            tensors.append(image_to_tensor(image))
    return kept, tensors


def quality(detector, view_spec: str, data: Path, count: int, batch_size: int, max_detections: int) -> dict:
    truth = load_coco(data / "unlabeled_truth.json")
    keep_ids = {img["id"] for img in truth.images[:count]}
    truth.data["images"] = [i for i in truth.images if i["id"] in keep_ids]
    truth.data["annotations"] = [a for a in truth.annotations if a["image_id"] in keep_ids]
    refs = [
        r
        for r in iter_image_refs(data / "unlabeled.json", images_dir=data / "images")
        if r.image_id in keep_ids
    ]
    refs, images = _load(refs)
    cfg = detector.config
    scores = {}
    variants = (
        ("single view", "none", FusionConfig(max_detections=max_detections)),
        (f"multi-view ({view_spec})", view_spec, FusionConfig(max_detections=max_detections)),
        (
            "multi-view, size-dependent heads",
            view_spec,
            FusionConfig(max_detections=max_detections, size_dependent=True),
        ),
    )
    for name, spec, fusion in variants:
        engine = MultiViewEngine(
            detector, parse_views(spec, test_size=cfg.test_size, max_size=cfg.max_size), fusion
        )
        results = []
        for ref, image, pred in zip(refs, images, run_engine(engine, images, batch_size), strict=True):
            results.extend(
                detections_to_coco(
                    pred.detections,
                    image_id=ref.image_id,
                    height=image.shape[1],
                    width=image.shape[2],
                    config=cfg,
                )
            )
        metrics = evaluate(truth, results)
        scores[name] = {t: round(100 * m["AP"], 2) for t, m in metrics.items()}
    return scores


def main(args: argparse.Namespace) -> dict:
    torch.set_grad_enabled(False)
    detector = load_model(args.model, device=args.device)
    cfg = detector.config
    views = parse_views(args.views, test_size=cfg.test_size, max_size=cfg.max_size)
    refs = iter_image_refs(args.data / "test.json", images_dir=args.data / "images")[: args.images]
    _, images = _load(refs)
    images = [i.to(args.device) for i in images]
    fusion = FusionConfig(max_detections=args.max_detections, score_floor=args.score_floor)
    engine = MultiViewEngine(detector, views, fusion)
    box_only = MultiViewEngine(detector, views, dataclasses.replace(fusion, heads=False))

    run_engine(engine, images[: args.batch_size], args.batch_size)  # warm-up
    t_engine = _timed(lambda: run_engine(engine, images, args.batch_size), args.repeats)
    t_boxes = _timed(lambda: run_engine(box_only, images, args.batch_size), args.repeats)
    t_floor = _timed(lambda: floor(detector, views, images, args.batch_size), args.repeats)
    t_naive = _timed(
        lambda: naive_multiview(detector, views, images, args.max_detections), max(1, args.repeats - 2)
    )
    report = {
        "bench": "multiview_engine",
        "device": args.device,
        "views": len(views),
        "max_detections": args.max_detections,
        "score_floor": args.score_floor,
        "images": len(images),
        "engine_images_per_s": round(len(images) / t_engine, 3),
        "naive_images_per_s": round(len(images) / t_naive, 3),
        "engine_vs_naive_speedup": round(t_naive / t_engine, 2),
        "heads_cost_ratio": round(t_engine / t_boxes, 3),
        "engine_over_floor": round(t_engine / t_floor, 3),
    }
    print(
        f"views: {len(views)} ({args.views}), images: {len(images)}, batch {args.batch_size}, {args.device}, "
        f"heads on the top {args.max_detections} fused boxes per image scoring >= {args.score_floor}"
    )
    print(f"1. engine vs naive loop            : {report['engine_vs_naive_speedup']:.2f}x  (target >= 2x)")
    print(f"2. kp+mask fusion / box-only        : {report['heads_cost_ratio']:.3f}   (target <= 1.10)")
    print(f"3. engine / plain forwards (floor)  : {report['engine_over_floor']:.3f}   (target <= 1.15)")
    if (args.data / "unlabeled_truth.json").exists() and args.quality_images > 0:
        report["quality_ap"] = quality(
            detector, args.views, args.data, args.quality_images, args.batch_size, args.max_detections
        )
        for name, aps in report["quality_ap"].items():
            print(f"4. {name:<30}: " + ", ".join(f"{t} AP {v:.1f}" for t, v in aps.items()))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
