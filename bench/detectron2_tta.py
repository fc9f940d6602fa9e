"""distill's multi-view engine vs detectron2's own test-time augmentation, same model, views and images.

    python bench/detectron2_tta.py [--weights model_final.pth] [--images 4] [--scale 1.0]

Needs detectron2 (not on PyPI; see the README). Three parts (``--parts``):

1. ``mask``: Mask R-CNN R50-FPN, distill's engine (fusion = NMS at the config's NMS_THRESH_TEST and
   DETECTIONS_PER_IMAGE, as detectron2 merges) vs ``detectron2.modeling.GeneralizedRCNNWithTTA`` on the
   views 400..1200 step 100, each with and without flip (``--scale`` multiplies the sizes: 0.25 gives
   100..300 for a CPU run): throughput, and distill box-only for the heads' share.
2. ``agreement``: how well the merged boxes agree when both see the same pixels one image at a time: the
   share of detectron2's boxes that distill also has (same class) at IoU >= 0.5 / 0.9, and the relative
   difference of their scores.
3. ``keypoint``: Keypoint R-CNN R50-FPN (detectron2's TTA refuses keypoints): distill's multi-view with
   keypoint fusion vs the same engine box-only.

Without ``--weights`` the models are random (norm statistics set from the images so detections are finite);
timings hold, agreement then compares two runs of the same random model. Images: ``--images`` photos of
``../shared/data/tiny_coco/val2017`` (or ``--image-dir``). Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from distill.data.images import load_image
from distill.models.detectron2 import Detectron2Detector, init_norm_statistics, load_cfg
from distill.train.data import image_to_tensor
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import PAPER_SIZES, View, ViewSet

from timing import interleaved, timed

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
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds; the mask part reports each side's fastest round"
    )
    parser.add_argument(
        "--parts", default="mask,agreement,keypoint", help="which parts to run: mask, agreement, keypoint"
    )
    parser.add_argument(
        "--keypoint-top-k",
        type=int,
        default=None,
        help="fused boxes the keypoint heads run on (default: the config's TEST.DETECTIONS_PER_IMAGE)",
    )
    parser.add_argument(
        "--detections-per-image",
        type=int,
        default=None,
        help="TEST.DETECTIONS_PER_IMAGE for both sides: the merged boxes the heads run on (default: the "
        "config's 100; pseudo-labelling needs a few times the labeled density, the demo uses 20)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _cfg(name: str, weights: str, scale: float, device: str, detections: int | None = None):
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
    if detections is not None:
        opts += ["TEST.DETECTIONS_PER_IMAGE", str(detections)]
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


def _tta_inputs(images: list[torch.Tensor], cfg, *, exact: bool) -> list[dict]:
    """Original-size images in the config's channel order: uint8 as DefaultPredictor gives them, or
    (``exact``) the float pixels distill resizes, so that both resize the same values the same way."""
    inputs = []
    for image in images:
        pixels = image.permute(1, 2, 0) * 255
        array = pixels.numpy().astype(np.float32) if exact else pixels.round().byte().numpy()
        if cfg.INPUT.FORMAT == "BGR":
            array = array[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(array).transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": image.shape[1], "width": image.shape[2]})
    return inputs


def _versus_detectron2_tta(args: argparse.Namespace, images: list[torch.Tensor]) -> dict:
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = _cfg(MASK_CONFIG, args.weights, args.scale, args.device, args.detections_per_image)
    detector = _detector(cfg, images, args.device)
    views = _views(cfg)
    engine = MultiViewEngine(detector, views, _fusion(cfg))
    box_only = MultiViewEngine(detector, views, dataclasses.replace(_fusion(cfg), heads=False))
    tta = GeneralizedRCNNWithTTA(cfg, detector.model)
    runs = {
        # each as its users run it (detectron2 gets uint8 pixels and resizes them with PIL)
        "tta": lambda: tta(_tta_inputs(images, cfg, exact=False)),
        "ours": lambda: engine.predict(images),
        "box": lambda: box_only.predict(images),
        "backbone": lambda: _backbone_pass(detector, views, images),
    }
    if len(images) > 1:
        runs["ours_1"] = lambda: [engine.predict([image]) for image in images]
    best = interleaved(runs, args.repeats)
    t_tta, t_ours, t_box, t_backbone = best["tta"], best["ours"], best["box"], best["backbone"]
    t_ours_1 = best.get("ours_1", t_ours)
    return {
        "views": len(views),
        "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "backbone_s_per_image": t_backbone / len(images),
        # what skipping detectron2's second backbone pass per view accounts for (the rest of the speed-up is
        # detectron2's batching of views of different sizes, padded to the largest, and its per-view overhead)
        "speedup_from_one_backbone_pass": t_tta / max(t_tta - t_backbone, 1e-9),
        "detectron2_tta_s_per_image": t_tta / len(images),
        "distill_s_per_image": t_ours / len(images),
        "distill_batch1_s_per_image": t_ours_1 / len(images),
        "distill_box_only_s_per_image": t_box / len(images),
        "speedup": t_tta / t_ours,
        "speedup_batch1": t_tta / t_ours_1,
    }


def _backbone_pass(detector: Detectron2Detector, views: ViewSet, images: list[torch.Tensor]) -> None:
    """One backbone pass per view (resize + normalise + features): what detectron2's TTA runs twice."""
    for view in views:
        detector.features(detector.prepare(images, size=view.size, flip=view.flip, max_size=view.max_size))


def _merge_agreement(args: argparse.Namespace, images: list[torch.Tensor]) -> dict:
    """Identical resized pixels (float input: detectron2 resizes it with torch's plain bilinear, as distill
    does without antialiasing) and one image, one view per forward on both sides (batching pads to the
    largest image, and padding changes the features near a border), so that only the merging differs."""
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = _cfg(MASK_CONFIG, args.weights, args.scale, args.device)
    detector = _detector(cfg, images, args.device)
    detector.antialias = False
    views = _views(cfg)
    single = GeneralizedRCNNWithTTA(cfg, detector.model, batch_size=1)
    theirs = [single(_tta_inputs([image], cfg, exact=True))[0]["instances"] for image in images]
    ours = [engine_single_view_batches(detector, views, _fusion(cfg), image) for image in images]
    return _agreement(ours, theirs)


def engine_single_view_batches(detector, views: ViewSet, fusion: FusionConfig, image: torch.Tensor):
    """distill's fused detections of one image (each view then is a batch of one)."""
    return MultiViewEngine(detector, views, fusion).predict([image])[0].detections


def _keypoint_cost(args: argparse.Namespace, images: list[torch.Tensor]) -> dict:
    cfg = _cfg(KEYPOINT_CONFIG, args.keypoint_weights, args.scale, args.device)
    detector = _detector(cfg, images, args.device)
    views = _views(cfg)
    fusion = _fusion(cfg)
    if args.keypoint_top_k is not None:
        fusion = dataclasses.replace(fusion, max_detections=args.keypoint_top_k)
    heads = MultiViewEngine(detector, views, fusion)
    box_only = MultiViewEngine(detector, views, dataclasses.replace(fusion, heads=False))
    t_box, _ = timed(lambda: box_only.predict(images), args.repeats)
    t_kp, _ = timed(lambda: heads.predict(images), args.repeats)
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
            f"Mask R-CNN, {m['views']} views, heads on {m['detections_per_image']} merged boxes: "
            f"detectron2 TTA {m['detectron2_tta_s_per_image']:.2f} s/img",
            f"distill box-only {m['distill_box_only_s_per_image']:.2f} s/img",
            f"distill {m['distill_s_per_image']:.2f} s/img (one image at a time "
            f"{m['distill_batch1_s_per_image']:.2f})",
            f"speedup {m['speedup']:.2f}x (one image at a time {m['speedup_batch1']:.2f}x)",
            f"one backbone pass over the views {m['backbone_s_per_image']:.2f} s/img: skipping detectron2's "
            f"second one accounts for {m['speedup_from_one_backbone_pass']:.2f}x",
        ]
        print(" | ".join(lines), flush=True)
    if "agreement" in parts:
        a = report["agreement"] = _merge_agreement(args, images)
        print(
            f"Merged boxes, same pixels, one image per forward: detectron2 {a['boxes_detectron2']}, distill "
            f"{a['boxes_distill']}; detectron2's boxes matched at IoU>=0.5 {a['matched_iou_0.5']:.1%}, "
            f">=0.9 {a['matched_iou_0.9']:.1%}; median relative score difference "
            f"{a['median_relative_score_diff']:.2%}",
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
