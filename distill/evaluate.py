"""pycocotools COCOeval -> a metrics dict (bbox, segm, keypoints), and a table to print."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distill.data.coco import CocoDataset

BOX_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_METRICS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]


def _coco_api(dataset: CocoDataset) -> COCO:
    api = COCO()
    data = copy.deepcopy(dataset.data)
    data.setdefault("annotations", [])
    data.setdefault("info", {})
    for ann in data["annotations"]:  # COCOeval reads these keys without defaults
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        if not ann.get("segmentation"):  # no outline: its box stands in (as pycocotools does for results)
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def evaluate(
    truth: CocoDataset,
    results: Sequence[dict],
    *,
    iou_types: Sequence[str] | None = None,
    keypoint_sigmas: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Standard COCO metrics as fractions in [0, 1] (pycocotools reports -1 where a metric is undefined).

    ``iou_types`` defaults to every type the results support: ``bbox`` always, ``segm`` when results carry
    ``segmentation``, ``keypoints`` when they carry keypoints and the truth has keypoint categories.
    ``keypoint_sigmas`` (OKS) default to the category's ``keypoint_sigmas`` field, then to the 17 COCO person
    sigmas when the category has 17 keypoints; other categories must give them.
    """
    if iou_types is None:
        iou_types = ["bbox"]
        if any("segmentation" in r for r in results):
            iou_types.append("segm")
        if any("keypoints" in r for r in results) and truth.keypoint_categories():
            iou_types.append("keypoints")
    gt = _coco_api(truth)
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        names = KEYPOINT_METRICS if iou_type == "keypoints" else BOX_METRICS
        subset = _results_for(iou_type, results, truth)
        if not subset:
            metrics[iou_type] = dict.fromkeys(names, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(subset)
            evaluator = COCOeval(gt, dt, iou_type)
            if iou_type == "keypoints":
                evaluator.params.catIds = [c["id"] for c in truth.keypoint_categories()]
                evaluator.params.kpt_oks_sigmas = _sigmas(truth, keypoint_sigmas)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(v) for name, v in zip(names, evaluator.stats, strict=True)}
    return metrics


def _results_for(iou_type: str, results: Sequence[dict], truth: CocoDataset) -> list[dict]:
    if iou_type == "bbox":
        return [{k: v for k, v in r.items() if k not in ("segmentation", "keypoints")} for r in results]
    if iou_type == "segm":
        # without the bbox, pycocotools uses the mask area for small/medium/large (as detectron2 does)
        return [
            {k: v for k, v in r.items() if k not in ("bbox", "keypoints")}
            for r in results
            if "segmentation" in r
        ]
    keypoint_cats = {c["id"] for c in truth.keypoint_categories()}
    return [
        {k: v for k, v in r.items() if k != "segmentation"}
        for r in results
        if "keypoints" in r and r["category_id"] in keypoint_cats
    ]


COCO_PERSON_SIGMAS = [
    0.026,
    0.025,
    0.025,
    0.035,
    0.035,
    0.079,
    0.079,
    0.072,
    0.072,
    0.062,
    0.062,
    0.107,
    0.107,
    0.087,
    0.087,
    0.089,
    0.089,
]


def _sigmas(truth: CocoDataset, given: Sequence[float] | None) -> np.ndarray:
    category = truth.keypoint_categories()[0]
    num = len(category["keypoints"])
    sigmas = given or category.get("keypoint_sigmas") or (COCO_PERSON_SIGMAS if num == 17 else None)
    if sigmas is None:
        raise ValueError(
            f"category {category['name']!r} has {num} keypoints and no keypoint_sigmas; pass keypoint_sigmas "
            "(one OKS sigma per keypoint, e.g. 0.05-0.1)"
        )
    if len(sigmas) != num:
        raise ValueError(f"expected {num} keypoint sigmas, got {len(sigmas)}")
    return np.asarray(sigmas, dtype=np.float64)


def format_table(
    columns: dict[str, dict[str, dict[str, float]]], *, keys: Sequence[str] = ("AP", "AP50", "AP75")
) -> str:
    """A plain-text table: one row per (iou type, metric), one column per named metrics dict, in AP points."""
    names = list(columns)
    iou_types = [t for t in ("bbox", "segm", "keypoints") if any(t in m for m in columns.values())]
    header = f"{'metric':<16}" + "".join(f"{n:>12}" for n in names)
    lines = [header, "-" * len(header)]
    for iou_type in iou_types:
        for key in keys:
            row = f"{iou_type + ' ' + key:<16}"
            for name in names:
                value = columns[name].get(iou_type, {}).get(key)
                row += f"{'-' if value is None else f'{100 * value:.1f}':>12}"
            lines.append(row)
    return "\n".join(lines)
