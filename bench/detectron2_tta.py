"""distill's multi-view engine vs detectron2's own test-time augmentation, same model, views and images.

    python bench/detectron2_tta.py [--weights model_final.pth] [--images 4] [--scale 1.0]

Needs detectron2 (not on PyPI; see the README). Two parts:

1. Mask R-CNN R50-FPN: distill's engine (fusion = NMS at the config's NMS_THRESH_TEST and
   DETECTIONS_PER_IMAGE, as detectron2 merges) vs ``detectron2.modeling.GeneralizedRCNNWithTTA`` on the
   views 400..1200 step 100, each with and without flip (``--scale`` multiplies the sizes: 0.25 gives
   100..300 for a CPU run).
   Throughput ratio, and how well the merged boxes agree: the share of detectron2's boxes that distill also
   has (same class) at IoU >= 0.5 / 0.9, and the relative difference in their scores.
2. Keypoint R-CNN R50-FPN (detectron2's TTA refuses keypoints): distill's multi-view with keypoint fusion vs
   the same engine box-only.

Without ``--weights`` the models are random (norm statistics set from the images so detections are finite);
timings hold, agreement then compares two runs of the same random model. Images: ``--images`` photos of
``../shared/data/tiny_coco/val2017`` (or ``--image-dir``). Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from distill.data.images import load_image
from distill.models.detectron2 import Detectron2Detector, init_norm_statistics, load_cfg
from distill.train.data import image_to_tensor
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import PAPER_SIZES, View, ViewSet

MASK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
KEYPOINT_CONFIG = "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco" / "val2017"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default="", help="Mask R-CNN weights (default: random init)")
    parser.add_argument("--keypoint-weights", default="", help="Keypoint R-CNN weights (default: random)")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the view sizes and test size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--parts", default="mask,keypoint", help="which parts to run: mask, keypoint")
    parser.add_argument(
        "--keypoint-top-k",
        type=int,
        default=None,
        help="fused boxes the keypoint heads run on (default: the config's TEST.DETECTIONS_PER_IMAGE)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _cfg(name: str, weights: str, scale: float, device: str):
    sizes = [round(s * scale) for s in PAPER_SIZES]
    opts = [
        "MODEL.WEIGHTS", weights,
        "MODEL.DEVICE", device,
        "INPUT.MIN_SIZE_TEST", str(round(800 * scale)),
        "INPUT.MAX_SIZE_TEST", str(round(1333 * scale)),
        "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", str(tuple(sizes)),
        "TEST.AUG.MAX_SIZE", str(round(4000 * scale)),
        "TEST.AUG.FLIP", "True",
    ]  # fmt: skip
    return load_cfg(name, opts)


def _detector(cfg, images: list[torch.Tensor], device: str) -> Detectron2Detector:
    torch.manual_seed(0)
    detector = Detectron2Detector.from_cfg(cfg, device=device)
    if not cfg.MODEL.WEIGHTS:
        init_norm_statistics(detector, images[:2])
    return detector


def _views(cfg) -> ViewSet:
    """detectron2's TTA views: every TEST.AUG.MIN_SIZES size, capped at TEST.AUG.MAX_SIZE, with flips."""
    views = []
    for size in cfg.TEST.AUG.MIN_SIZES:
        views += [View(size, cfg.TEST.AUG.MAX_SIZE, False), View(size, cfg.TEST.AUG.MAX_SIZE, True)]
    return ViewSet(tuple(views), cfg.INPUT.MIN_SIZE_TEST, "detectron2 TEST.AUG")


def _agreement(ours, theirs) -> dict[str, float]:
    """Share of detectron2's boxes that distill has too (same class), and score differences of the pairs."""
    hits5 = hits9 = total = 0
    score_diffs = []
    for o, t in zip(ours, theirs, strict=True):
        tb, ts, tl = t.pred_boxes.tensor.cpu(), t.scores.cpu(), t.pred_classes.cpu()
        ob, os_, ol = o.boxes.cpu(), o.scores.cpu(), o.labels.cpu()
        total += len(tb)
        if len(tb) == 0 or len(ob) == 0:
            continue
        iou = box_iou(tb, ob) * (tl[:, None] == ol[None, :])
        best, index = iou.max(1)
        hits5 += int((best >= 0.5).sum())
        hits9 += int((best >= 0.9).sum())
        close = best >= 0.9
        score_diffs += ((os_[index[close]] - ts[close]).abs() / ts[close].clamp(min=1e-6)).tolist()
    return {
        "boxes_detectron2": total,
        "boxes_distill": sum(len(o) for o in ours),
        "matched_iou_0.5": hits5 / max(total, 1),
        "matched_iou_0.9": hits9 / max(total, 1),
        "median_relative_score_diff": statistics.median(score_diffs) if score_diffs else float("nan"),
    }


def _tta_inputs(images: list[torch.Tensor], cfg) -> list[dict]:
    """What DefaultPredictor hands the model: uint8 pixels in the config's channel order, original size."""
    inputs = []
    for image in images:
        array = (image * 255).round().byte().permute(1, 2, 0).numpy()
        if cfg.INPUT.FORMAT == "BGR":
            array = array[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(array).transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": image.shape[1], "width": image.shape[2]})
    return inputs


def _versus_detectron2_tta(args: argparse.Namespace, images: list[torch.Tensor]) -> dict:
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = _cfg(MASK_CONFIG, args.weights, args.scale, args.device)
    detector = _detector(cfg, images, args.device)
    views = _views(cfg)
    engine = MultiViewEngine(detector, views, _fusion(cfg))
    tta = GeneralizedRCNNWithTTA(cfg, detector.model)
    inputs = _tta_inputs(images, cfg)
    t_tta, theirs = _timed(lambda: [r["instances"] for r in tta(inputs)], args.repeats)
    t_ours, fused = _timed(lambda: engine.predict(images), args.repeats)
    t_ours_1, _ = _timed(lambda: [engine.predict([image]) for image in images], args.repeats)
    return {
        "views": len(views),
        "detectron2_tta_s_per_image": t_tta / len(images),
        "distill_s_per_image": t_ours / len(images),
        "distill_batch1_s_per_image": t_ours_1 / len(images),
        "speedup": t_tta / t_ours,
        "speedup_batch1": t_tta / t_ours_1,
        **_agreement([f.detections for f in fused], theirs),
    }


def _keypoint_cost(args: argparse.Namespace, images: list[torch.Tensor]) -> dict:
    cfg = _cfg(KEYPOINT_CONFIG, args.keypoint_weights, args.scale, args.device)
    detector = _detector(cfg, images, args.device)
    views = _views(cfg)
    fusion = _fusion(cfg)
    if args.keypoint_top_k is not None:
        fusion = dataclasses.replace(fusion, max_detections=args.keypoint_top_k)
    heads = MultiViewEngine(detector, views, fusion)
    box_only = MultiViewEngine(detector, views, dataclasses.replace(fusion, heads=False))
    t_box, _ = _timed(lambda: box_only.predict(images), args.repeats)
    t_kp, _ = _timed(lambda: heads.predict(images), args.repeats)
    return {
        "top_k": fusion.max_detections,
        "box_only_s_per_image": t_box / len(images),
        "with_keypoints_s_per_image": t_kp / len(images),
        "keypoints_over_box_only": t_kp / t_box,
    }


def _fusion(cfg) -> FusionConfig:
    """Merge as detectron2's TTA does: class-wise NMS at the test NMS threshold, its detections per image."""
    return FusionConfig(
        method="nms",
        iou_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


@torch.inference_mode()
def main(args: argparse.Namespace) -> None:
    paths = sorted(args.image_dir.glob("*.jpg"))[: args.images]
    if not paths:
        raise SystemExit(f"no .jpg images under {args.image_dir}")
    images = [image_to_tensor(load_image(p)) for p in paths]
    report: dict[str, object] = {"images": len(images), "scale": args.scale, "device": args.device}

    parts = set(args.parts.split(","))
    print(f"{len(images)} images, sizes x{args.scale}, {args.device}", flush=True)
    if "mask" in parts:
        m = report["mask_rcnn"] = _versus_detectron2_tta(args, images)
        lines = [
            f"Mask R-CNN, {m['views']} views: detectron2 TTA {m['detectron2_tta_s_per_image']:.2f} s/img",
            f"distill {m['distill_s_per_image']:.2f} s/img (one image at a time "
            f"{m['distill_batch1_s_per_image']:.2f})",
            f"speedup {m['speedup']:.2f}x (one image at a time {m['speedup_batch1']:.2f}x)",
        ]
        print(" | ".join(lines), flush=True)
        print(
            f"  boxes: detectron2 {m['boxes_detectron2']}, distill {m['boxes_distill']}; detectron2's boxes "
            f"matched at IoU>=0.5 {m['matched_iou_0.5']:.1%}, >=0.9 {m['matched_iou_0.9']:.1%}; "
            f"median relative score difference {m['median_relative_score_diff']:.2%}",
            flush=True,
        )
    if "keypoint" in parts:
        k = report["keypoint_rcnn"] = _keypoint_cost(args, images)
        lines = [
            f"Keypoint R-CNN, heads on the top {k['top_k']}: box-only {k['box_only_s_per_image']:.2f} s/img",
            f"with keypoint fusion {k['with_keypoints_s_per_image']:.2f} s/img",
            f"ratio {k['keypoints_over_box_only']:.2f}",
        ]
        print(" | ".join(lines), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
