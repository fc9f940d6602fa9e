"""Precision and recall of a pseudo-label file against hidden truth (the benchmark's unlabeled split).

    python bench/pseudo_label_quality.py --truth runs/demo/data/unlabeled_truth.json \
        --pseudo runs/demo/round_1/pseudo.json [--iou 0.5]

Per image and category, pseudo-instances are matched greedily by descending score to unmatched true instances
with box IoU >= --iou (pycocotools' IoU, crowd regions count as ordinary instances). Prints counts, precision,
recall, the same per category and class-agnostic (``any class``: a box that finds an object of another class
counts), then a JSON line. ``all`` well below ``any class`` means the teacher finds the objects but confuses
their classes; both low, that it misses objects or boxes clutter.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from distill.data.coco import load_coco


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--pseudo", type=Path, required=True)
    parser.add_argument("--iou", type=float, default=0.5)
    return parser


def match(truth_boxes: list, pseudo: list[tuple[float, list]], iou: float) -> int:
    """True positives among ``pseudo`` (score, xywh) against ``truth_boxes`` (xywh), greedy by score."""
    if not truth_boxes or not pseudo:
        return 0
    pseudo = sorted(pseudo, key=lambda p: -p[0])
    ious = np.asarray(mask_utils.iou([p[1] for p in pseudo], truth_boxes, [0] * len(truth_boxes)))
    used = np.zeros(len(truth_boxes), dtype=bool)
    hits = 0
    for row in ious:
        row = np.where(used, -1.0, row)
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            hits += 1
    return hits


def main(args: argparse.Namespace) -> dict:
    truth = load_coco(args.truth)
    pseudo = load_coco(args.pseudo)
    offset = pseudo.data.get("info", {}).get("image_id_offset", 0)
    gt: dict[tuple[int, int], list] = defaultdict(list)  # (image, category) -> boxes
    pr: dict[tuple[int, int], list] = defaultdict(list)
    gt_any: dict[int, list] = defaultdict(list)  # image -> boxes of every category
    pr_any: dict[int, list] = defaultdict(list)
    for a in truth.annotations:
        gt[(a["image_id"], a["category_id"])].append(a["bbox"])
        gt_any[a["image_id"]].append(a["bbox"])
    for a in pseudo.annotations:
        entry = (a.get("score", 1.0), a["bbox"])
        pr[(a["image_id"] - offset, a["category_id"])].append(entry)
        pr_any[a["image_id"] - offset].append(entry)
    report: dict = {"iou": args.iou, "per_category": {}}
    names = {c["id"]: c["name"] for c in truth.categories}
    totals = np.zeros(3, dtype=np.int64)  # hits, pseudo, truth
    for cat, name in names.items():
        keys = {k for k in (*gt, *pr) if k[1] == cat}
        hits = sum(match(gt.get(k, []), pr.get(k, []), args.iou) for k in keys)
        n_pseudo = sum(len(pr.get(k, [])) for k in keys)
        n_truth = sum(len(gt.get(k, [])) for k in keys)
        totals += (hits, n_pseudo, n_truth)
        report["per_category"][name] = _scores(hits, n_pseudo, n_truth)
    report["all"] = _scores(*totals.tolist())
    hits = sum(match(gt_any.get(i, []), pr_any.get(i, []), args.iou) for i in {*gt_any, *pr_any})
    report["class_agnostic"] = _scores(hits, int(totals[1]), int(totals[2]))
    shown = [("all", report["all"]), ("any class", report["class_agnostic"]), *report["per_category"].items()]
    for name, r in shown:
        print(
            f"{name:>10}: {r['pseudo']:>6} pseudo / {r['truth']:>6} true, precision {r['precision']:.3f}, "
            f"recall {r['recall']:.3f}"
        )
    print(json.dumps(report))
    return report


def _scores(hits: int, n_pseudo: int, n_truth: int) -> dict:
    return {
        "pseudo": n_pseudo,
        "truth": n_truth,
        "precision": round(hits / n_pseudo, 4) if n_pseudo else 0.0,
        "recall": round(hits / n_truth, 4) if n_truth else 0.0,
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
