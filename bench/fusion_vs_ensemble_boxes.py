"""distill's box fusion (``distill.tta.boxes``) vs ensemble-boxes: time and agreement, side by side.

    python bench/fusion_vs_ensemble_boxes.py [--sizes 1000 10000 100000] [--repeats 3] [--timeout 60]

Synthetic TTA output of one image (``make_tta_boxes``): ``N // views`` objects (sizes log-uniform 16-256 px,
aspect 0.5-2, one of ``--classes`` classes) on a canvas whose side is ``160 px * sqrt(objects)`` (the
density of a crowded street scene, constant across N); every one of the ``--views`` (default 18 = 9 scales
x flip) views detects each object with probability 0.9, each coordinate jittered by N(0, 5% of the object
size) and scored ``object score * U(0.6, 1)``; the missed detections' slots hold false positives (16-128
px, score U(0, 0.3), random class) so there are exactly N boxes. Scores are continuous, so there are no ties
(ensemble-boxes' order for tied scores is numpy's, unspecified).

For each N and method (nms, soft-nms gaussian, wbf) it times both implementations in this process on the
same data (median of ``--repeats`` runs after a warm-up; a single run when one takes over 5 s), and checks
the outputs match (sorted, within 1e-5 of the canvas size; for soft-nms the kept boxes and their input
scores, since ensemble-boxes reports undecayed scores). An ensemble-boxes run longer than ``--timeout`` s
is abandoned and reported as skipped. Ours runs on ``--threads`` torch threads (default 1: numpy is single
threaded, and on a small shared machine more threads are slower). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import signal
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from distill.tta.boxes import fuse_boxes

METHODS = ("nms", "soft-nms", "wbf")
IOU = {"nms": 0.5, "soft-nms": 0.5, "wbf": 0.55}  # ensemble-boxes' defaults
SOFT_SIGMA, SOFT_THRESH = 0.5, 0.001


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--views", type=int, default=18)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds; longer ensemble-boxes runs are skipped"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where ours runs (ensemble-boxes is numpy)")
    return parser


def make_tta_boxes(n: int, *, views: int, classes: int, seed: int):
    """``n`` boxes (XYXY px), scores, labels, view ids of one image's TTA views, and the canvas side."""
    rng = np.random.default_rng(seed)
    objects = max(n // views, 1)
    side = 160.0 * np.sqrt(objects)
    size = np.exp(rng.uniform(np.log(16), np.log(256), objects))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2), objects))
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx, cy = rng.uniform(0, side, objects), rng.uniform(0, side, objects)
    base = rng.uniform(0.05, 1.0, objects)
    cls = rng.integers(0, classes, objects)
    whwh = np.stack([w, h, w, h], 1)
    boxes = (
        np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)[None]
        + rng.normal(0, 0.05, (views, objects, 4)) * whwh[None]
    )
    scores = base[None] * rng.uniform(0.6, 1.0, (views, objects))
    labels = np.broadcast_to(cls, (views, objects)).copy()
    view_ids = np.broadcast_to(np.arange(views)[:, None], (views, objects)).copy()
    boxes, scores, labels, view_ids = (
        boxes.reshape(-1, 4),
        scores.reshape(-1),
        labels.reshape(-1),
        view_ids.reshape(-1),
    )
    boxes, scores, labels, view_ids = boxes[:n], scores[:n], labels[:n], view_ids[:n]
    # missed detections (10%) and the remainder up to n: false positives
    fp = rng.random(n) < 0.1
    fp[len(scores) :] = True
    boxes = np.concatenate([boxes, np.zeros((n - len(boxes), 4))])
    scores = np.concatenate([scores, np.zeros(n - len(scores))])
    labels = np.concatenate([labels, np.zeros(n - len(labels), dtype=labels.dtype)])
    view_ids = np.concatenate([view_ids, rng.integers(0, views, n - len(view_ids))])
    k = int(fp.sum())
    corner = rng.uniform(0, side, (k, 2))
    boxes[fp] = np.concatenate([corner, corner + rng.uniform(16, 128, (k, 2))], 1)
    scores[fp] = rng.uniform(0, 0.3, k)
    labels[fp] = rng.integers(0, classes, k)
    boxes = boxes.clip(0, side)
    flat = (boxes[:, 2] - boxes[:, 0] < 1) | (boxes[:, 3] - boxes[:, 1] < 1)  # ensemble-boxes drops those
    boxes[flat, 2:] = np.minimum(boxes[flat, :2] + 1, side)
    boxes[flat, :2] = boxes[flat, 2:] - 1
    order = np.argsort(view_ids, kind="stable")  # views concatenated, like ensemble-boxes' per-model lists
    return boxes[order], scores[order], labels[order], view_ids[order], side


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def time_it(
    fn: Callable[[], object], repeats: int, timeout: float | None = None
) -> tuple[float | None, object, int]:
    """Median seconds of ``repeats`` runs (one if a run takes > 5 s), the last result, the number of runs.

    With ``timeout``, a run that takes longer is interrupted: returns ``(None, None, 0)``.
    """
    times, result = [], None
    for _ in range(repeats):
        if timeout is not None:
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            start = time.perf_counter()
            result = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        except _Timeout:
            return None, None, 0
        finally:
            if timeout is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if times[-1] > 5.0:
            break
    return statistics.median(times), result, len(times)


def canonical(boxes, scores, labels, scale: float) -> np.ndarray:
    rows = np.concatenate(
        [
            np.asarray(labels, float)[:, None],
            np.asarray(scores, float)[:, None],
            np.asarray(boxes, float) / scale,
        ],
        1,
    )
    return rows[np.lexsort(rows.T[::-1])]


def same(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol))


def main(args: argparse.Namespace) -> dict:
    import ensemble_boxes

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    run_theirs = {
        "nms": lambda b, s, lab: ensemble_boxes.nms(b, s, lab, iou_thr=IOU["nms"]),
        "soft-nms": lambda b, s, lab: ensemble_boxes.soft_nms(
            b, s, lab, method=2, iou_thr=IOU["soft-nms"], sigma=SOFT_SIGMA, thresh=SOFT_THRESH
        ),
        "wbf": lambda b, s, lab: ensemble_boxes.weighted_boxes_fusion(b, s, lab, iou_thr=IOU["wbf"]),
    }
    # warm-up (numba compiles ensemble-boxes' nms on first use)
    wb, ws, wl, _, wside = make_tta_boxes(200, views=args.views, classes=args.classes, seed=1)
    for method in args.methods:
        run_theirs[method]([wb / wside], [ws], [wl])
        fuse_boxes(
            torch.from_numpy(wb).to(args.device, dtype),
            torch.from_numpy(ws).to(args.device, dtype),
            torch.from_numpy(wl).to(args.device),
            method=method,
            num_views=args.views,
        )

    results = []
    print(f"{'N':>8} {'method':>9} {'ours (s)':>10} {'ens.-boxes (s)':>15} {'speed-up':>9}  match  fused")
    for n in args.sizes:
        boxes, scores, labels, view_ids, side = make_tta_boxes(
            n, views=args.views, classes=args.classes, seed=args.seed
        )
        lists = (
            [boxes[view_ids == v] / side for v in range(args.views)],
            [scores[view_ids == v] for v in range(args.views)],
            [labels[view_ids == v] for v in range(args.views)],
        )
        tb = torch.from_numpy(boxes).to(args.device, dtype)
        ts = torch.from_numpy(scores).to(args.device, dtype)
        tl = torch.from_numpy(labels).to(args.device)
        for method in args.methods:
            ours = functools.partial(
                fuse_boxes, tb, ts, tl, method=method, iou_thresh=IOU[method], soft_sigma=SOFT_SIGMA,
                num_views=args.views,
            )  # fmt: skip
            ours_s, fused, ours_runs = time_it(ours, args.repeats)
            theirs = functools.partial(run_theirs[method], *lists)
            theirs_s, theirs, theirs_runs = time_it(theirs, args.repeats, timeout=args.timeout)
            match = None
            if theirs is not None:
                our_scores = ts[fused.source] if method == "soft-nms" else fused.scores
                match = same(
                    canonical(
                        fused.boxes.cpu().numpy(), our_scores.cpu().numpy(), fused.labels.cpu().numpy(), side
                    ),
                    canonical(*theirs, 1.0),
                )
            entry = {
                "n": n,
                "method": method,
                "ours_s": round(ours_s, 5),
                "ours_runs": ours_runs,
                "ensemble_boxes_s": None if theirs_s is None else round(theirs_s, 5),
                "ensemble_boxes_runs": theirs_runs,
                "speedup": None if theirs_s is None else round(theirs_s / ours_s, 2),
                "match": match,
                "fused": len(fused),
                "skipped": None if theirs_s is not None else f"ensemble-boxes over {args.timeout:g} s",
            }
            results.append(entry)
            theirs_txt = (
                f"{theirs_s:15.4f}" if theirs_s is not None else f"{'> ' + format(args.timeout, 'g'):>15}"
            )
            speed = f"{entry['speedup']:8.1f}x" if theirs_s is not None else f"{'-':>9}"
            print(
                f"{n:>8} {method:>9} {ours_s:10.4f} {theirs_txt} {speed}  {match!s:>5}  {len(fused)}",
                flush=True,
            )
    report = {
        "bench": "fusion_vs_ensemble_boxes",
        "machine": platform.machine(),
        "processor": platform.processor(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "views": args.views,
        "classes": args.classes,
        "results": results,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
