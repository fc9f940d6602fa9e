"""Multi-view engine costs and quality, measured side by side in one run.

    python bench/multiview_engine.py --model runs/demo/teacher --data runs/demo/data [--views paper]

1. engine (batched per view, backbone once per view) vs a naive loop (one forward per image per view, and
   the backbone run again per image per view for the heads on the merged boxes), same model/views/images
2. engine with keypoint + mask fusion vs the same engine box-only (heads skipped)
3. engine time / sum of plain single-view forwards (prepare + backbone + detect) at each view size (the floor)
4. quality: COCO AP of fused multi-view predictions vs single-view predictions of the same model, scored on
   the unlabeled split's hidden truth (``unlabeled_truth.json``)
Prints a table and a final JSON line. Timings are each measurement's fastest of --repeats interleaved rounds.

The ratios depend on the model: the embedded benchmark's ResNet-18 / 64-channel FPN at ~256 px has heads as
costly as its backbone. ``--arch resnet50`` times a randomly initialised torchvision R-CNN at COCO's defaults
instead (ResNet-50 FPN, 80 classes, masks, 17 person keypoints, test size 800, so ``paper`` = 400..1200 px)
on the photographs of ``--tiny-coco``; random weights hold for timing (every view is made to return its full
100 detections: per-view score threshold 0), not for quality, which is then skipped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from distill.backends import load_model
from distill.data.coco import load_coco
from distill.data.images import decode_images, iter_image_refs, load_image
from distill.evaluate import evaluate
from distill.export import detections_to_coco
from distill.models.config import config_from_coco_categories
from distill.models.torchvision import TorchvisionDetector
from distill.structures import Detections
from distill.train.data import image_to_tensor
from distill.transforms import orientation_groups
from distill.tta.boxes import fuse_boxes
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import parse_views

from timing import interleaved

TINY_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a model directory (or give --arch)")
    parser.add_argument("--data", type=Path, help="a `distill synth` output folder (with --model)")
    parser.add_argument(
        "--arch",
        choices=["resnet50", "resnet34", "resnet18", "mobilenet_v3_large"],
        help="time a random-init torchvision R-CNN of this backbone at COCO's defaults instead of --model",
    )
    parser.add_argument(
        "--tiny-coco",
        type=Path,
        default=TINY_COCO,
        help="for --arch: the tiny_coco folder (photos from val2017/, COCO's label space from annotations/)",
    )
    parser.add_argument("--images", type=int, default=16, help="images for the timing runs (0: no timing)")
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
    parser.add_argument(
        "--quality-fusions",
        default="nms",
        help="comma-separated fusion methods scored for quality (nms, vote, soft-nms, wbf)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--feature-cache-mb",
        type=float,
        default=None,
        help="FusionConfig.feature_cache_mb (default: sized from the free memory): views whose features do "
        "not fit are recomputed for the heads",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; each measurement's fastest round counts"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


@torch.inference_mode()
def naive_multiview(
    detector, views, images: list[torch.Tensor], max_detections: int, score_thresh: float | None = None
) -> list[Detections]:
    """The loop people write by hand: every image alone through every view, twice."""
    out = []
    flip = detector.keypoint_flip_indices()
    for image in images:
        boxes, scores, labels, view_ids = [], [], [], []
        for v, view in enumerate(views):
            batch = detector.prepare([image], size=view.size, flip=view.flip, max_size=view.max_size)
            det = detector.detect(detector.features(batch), batch, score_thresh=score_thresh)[0]
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
def floor(
    detector, views, images: list[torch.Tensor], batch_size: int, score_thresh: float | None = None
) -> None:
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        for group in orientation_groups(chunk):  # batched as the engine batches
            images_of_group = [chunk[i] for i in group]
            for view in views:
                batch = detector.prepare(
                    images_of_group, size=view.size, flip=view.flip, max_size=view.max_size
                )
                detector.detect(detector.features(batch), batch, score_thresh=score_thresh)


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


def quality(
    detector,
    view_spec: str,
    data: Path,
    count: int,
    batch_size: int,
    max_detections: int,
    fusions: Sequence[str] = ("nms",),
) -> dict:
    """AP of single-view and multi-view predictions (one entry per fusion method, plus NMS with Detectron's
    size-dependent heads) on the first ``count`` unlabeled images' hidden truth, overall and per class. Every
    variant keeps the same ``max_detections`` per image, so that AP compares equal recall budgets."""
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
    variants = [("single view", "none", FusionConfig(max_detections=max_detections))]
    for method in fusions:
        fusion = FusionConfig(method=method, max_detections=max_detections)
        variants.append((f"multi-view ({view_spec}), {method}", view_spec, fusion))
        if method == "nms":
            sized = dataclasses.replace(fusion, size_dependent=True)
            variants.append((f"multi-view ({view_spec}), nms, size-dependent heads", view_spec, sized))
    scores = {}
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
        scores[name]["per_class"] = _per_class_ap(truth, results, cfg)
    return scores


def _per_class_ap(truth, results: list[dict], cfg) -> dict[str, dict[str, float]]:
    """Box and mask AP of each class alone, and how many of the kept detections it has."""
    out = {}
    for category_id, name in zip(cfg.category_ids, cfg.class_names, strict=True):
        subset = [r for r in results if r["category_id"] == category_id]
        one = copy.copy(truth)
        one.data = {
            **truth.data,
            "annotations": [a for a in truth.annotations if a["category_id"] == category_id],
        }
        types = ["bbox", "segm"] if any("segmentation" in r for r in subset) else ["bbox"]
        metrics = evaluate(one, subset, iou_types=types)
        out[name] = {t: round(100 * m["AP"], 2) for t, m in metrics.items()} | {"detections": len(subset)}
    return out


def coco_architecture(
    backbone: str, device: str, images: list[torch.Tensor], tiny_coco: Path = TINY_COCO
) -> TorchvisionDetector:
    """A random-init torchvision R-CNN with COCO's label space (80 classes, person keypoints) and masks;
    its BatchNorm statistics are those of ``images`` (identity norms let a random ResNet's activations grow
    by orders of magnitude, and its boxes degenerate)."""
    annotations = tiny_coco / "annotations"
    categories = load_coco(annotations / "instances_val2017.json").categories
    person = {c["id"]: c for c in load_coco(annotations / "person_keypoints_val2017.json").categories}
    categories = [person.get(c["id"], c) for c in categories]
    torch.manual_seed(0)
    config = config_from_coco_categories(categories, backbone=backbone, norm="bn", masks=True)
    detector = TorchvisionDetector(config, device=device)
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batch
        m.train()
    detector.features(detector.prepare(images))
    detector.eval()
    return detector


def main(args: argparse.Namespace) -> dict:
    torch.set_grad_enabled(False)
    if (args.model is None) == (args.arch is None):
        raise SystemExit("give either --model (with --data) or --arch")
    if args.arch:
        photos = sorted((args.tiny_coco / "val2017").glob("*.jpg"))[: args.images]
        images = [image_to_tensor(load_image(p)) for p in photos]
        if not images:
            raise SystemExit(f"no .jpg images under {args.tiny_coco / 'val2017'}")
        detector = coco_architecture(args.arch, args.device, images, args.tiny_coco)
    else:
        if args.data is None:
            raise SystemExit("--model needs --data")
        detector = load_model(args.model, device=args.device)
        refs = iter_image_refs(args.data / "test.json", images_dir=args.data / "images")[: args.images]
        _, images = _load(refs)
    cfg = detector.config
    views = parse_views(args.views, test_size=cfg.test_size, max_size=cfg.max_size)
    images = [i.to(args.device) for i in images]
    report: dict = {
        "bench": "multiview_engine",
        "model": args.arch or str(args.model),
        "device": args.device,
        "views": len(views),
        "max_detections": args.max_detections,
        "score_floor": args.score_floor,
        "images": len(images),
    }
    if images:
        report.update(timing(args, detector, views, images))
    if args.data is not None and (args.data / "unlabeled_truth.json").exists() and args.quality_images > 0:
        fusions = args.quality_fusions.split(",")
        report["quality_ap"] = quality(
            detector,
            args.views,
            args.data,
            args.quality_images,
            args.batch_size,
            args.max_detections,
            fusions,
        )
        print(f"4. quality, {args.quality_images} unlabeled images, top {args.max_detections} per image:")
        for name, aps in report["quality_ap"].items():
            overall = ", ".join(f"{t} AP {v:.1f}" for t, v in aps.items() if t != "per_class")
            classes = "; ".join(
                f"{c} "
                + "/".join(f"{v:.1f}" for t, v in m.items() if t != "detections")
                + f" (n={m['detections']})"
                for c, m in aps["per_class"].items()
            )
            print(f"   {name:<45}: {overall}\n   {'':<45}  per class box/mask AP: {classes}")
    print(json.dumps(report))
    return report


def timing(args: argparse.Namespace, detector, views, images: list[torch.Tensor]) -> dict:
    """Ratios 1-3 of the module docstring on ``images``."""
    # random weights score every class ~1/81: a per-view threshold of 0 keeps each view's 100 detections
    view_thresh = 0.0 if args.arch else None
    fusion = FusionConfig(
        max_detections=args.max_detections,
        score_floor=args.score_floor,
        view_score_thresh=view_thresh,
        feature_cache_mb=args.feature_cache_mb,
    )
    engine = MultiViewEngine(detector, views, fusion)
    box_only = MultiViewEngine(detector, views, dataclasses.replace(fusion, heads=False))

    run_engine(engine, images[: args.batch_size], args.batch_size)  # warm-up
    best = interleaved(
        {
            "engine": lambda: run_engine(engine, images, args.batch_size),
            "box_only": lambda: run_engine(box_only, images, args.batch_size),
            "floor": lambda: floor(detector, views, images, args.batch_size, view_thresh),
            "naive": lambda: naive_multiview(detector, views, images, args.max_detections, view_thresh),
        },
        args.repeats,
    )
    t_engine, t_boxes, t_floor, t_naive = (best[k] for k in ("engine", "box_only", "floor", "naive"))
    report = {
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
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
