"""Does distillation help? Teacher vs student vs an equal-schedule labeled-only baseline, over seeds.

    python bench/distill_round.py --out runs/exp --seeds 0 1 2 [--variants-seeds 0 1 2] \
        [--preset demo] [--recipe synth] [--teacher-iterations N] [--schedule-factor F] [--fusion wbf]

Per seed ``s`` (the ``--preset`` benchmark generated with seed ``s``, everything else seeded with ``s`` too;
the round is the demo's, ``DEMO_SETTINGS``, with the recipe and schedule options applied):

* ``teacher``: trained on the labeled split (the demo's schedule);
* ``student``: the demo round, i.e. multi-view pseudo-labels of the unlabeled split (boxes fused by
  ``--fusion``, default the demo's NMS), globally calibrated, student re-initialised and trained on
  labeled : pseudo = 6 : 4 for 1.5x the teacher's iterations;
* ``baseline``: labeled only, *the student's* schedule: the control that separates the gain of the
  pseudo-labels from the gain of training longer. With ``--schedule-factor 1`` that model is the teacher
  itself (same data, recipe, init, seed and iterations), so the teacher's metrics are reused;
  ``--no-baseline`` skips it (when an earlier run of the same settings made it: it would be the same model).

With ``--variants-seeds`` (per listed seed, that seed's teacher): students from other pseudo-labels of the
same teacher, the ``--variants`` of ``VARIANTS`` (default: single-view pseudo-labels, per-class
calibration; ``reseeded`` / ``single_view_reseeded``: the same pseudo-labels, another student seed). Once a
seed's teacher is trained, its variants can also run in a process of their own beside its student
(``--seeds --variants-seeds 2``). Prints one table per metric, each pair of ``COMPARISONS`` the seeds have
(mean ± sd over seeds) and a final JSON line; everything lands under ``--out``; seeds already in
``--out/results.json`` are kept, so a bench can be extended seed by seed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import statistics
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import torch

from distill.demo import DEMO_SETTINGS, run_demo, synthetic_data_spec
from distill.io import write_json_atomic
from distill.models.files import is_complete
from distill.pipeline import PipelineConfig, primary_metric, run_pipeline
from distill.specs import InferenceSpec
from distill.steps import evaluate_model
from distill.train.torchvision import train_model

METRICS = ("bbox/AP", "segm/AP", "keypoints/AP", "bbox/AP50", "keypoints/AP50")
STUDENT_RESEED = 100
# name -> the pipeline sections (dict: updated) or top-level fields (seed: replaced) it changes
VARIANTS: dict[str, dict[str, dict | int]] = {
    "single_view": {"inference": {"views": "none"}},
    "per_class": {"calibration": {"per_class": True}},
    "wbf": {"inference": {"fusion": "wbf"}},  # weighted boxes fusion
    "nms": {"inference": {"fusion": "nms"}},  # the paper's union + NMS
    # the scales inside synth-small's training sizes (shorter side 128-192 around its test size 160)
    "in_range_views": {"inference": {"views": "0.8x,1x,1.2x:flip"}},
    # the same pseudo-labels (multi-view / single-view) with the student (init, sampling) seeded with
    # STUDENT_RESEED instead of the benchmark's seed: the run-to-run spread of one student
    "reseeded": {"seed": STUDENT_RESEED},
    "single_view_reseeded": {"inference": {"views": "none"}, "seed": STUDENT_RESEED},
}
# (model, reference) pairs whose per-seed differences are summarised, where a seed has both
COMPARISONS = (
    ("student", "teacher"),
    ("student", "baseline"),
    ("student", "student_single_view"),  # multi- vs single-view pseudo-labels
    ("student_reseeded", "student_single_view_reseeded"),  # the same, second student seed
    ("student_reseeded", "student"),  # one student's run-to-run spread
)
FUSIONS = typing.get_args(InferenceSpec.model_fields["fusion"].annotation)  # the pipeline's choices


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/exp"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--variants-seeds", type=int, nargs="*", default=[])
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["single_view", "per_class"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="demo", help="the embedded benchmark's preset")
    parser.add_argument("--recipe", default=DEMO_SETTINGS["teacher"]["recipe"], help="of all three models")
    parser.add_argument("--teacher-iterations", type=int, default=DEMO_SETTINGS["teacher"]["iterations"])
    parser.add_argument(
        "--schedule-factor",
        type=float,
        default=DEMO_SETTINGS["student"]["schedule_factor"],
        help="student (and baseline) iterations = this x the teacher's",
    )
    parser.add_argument(
        "--fusion",
        choices=FUSIONS,
        default=DEMO_SETTINGS["inference"]["fusion"],
        help="box fusion of the student's multi-view pseudo-labels",
    )
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the baseline (when an earlier run of the same settings made that model: single-threaded "
        "CPU training is deterministic, so it would be the same model again)",
    )
    return parser


def round_settings(args: argparse.Namespace) -> dict:
    """The pipeline sections of one round: the demo's, with this run's recipe and schedule."""
    spec = json.loads(json.dumps(DEMO_SETTINGS))
    spec["teacher"].update(recipe=args.recipe, iterations=args.teacher_iterations)
    spec["student"]["schedule_factor"] = args.schedule_factor
    spec["inference"]["fusion"] = args.fusion
    return spec


def _baseline(seed_dir: Path, seed: int, iterations: int, recipe: str, device: str) -> dict:
    data = seed_dir / "data"
    out = seed_dir / "baseline"
    metrics_file = seed_dir / "baseline_metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    train_model(
        data / "labeled.json",
        data / "images",
        out,
        recipe=recipe,
        device=device,
        train_overrides={"iterations": iterations, "seed": seed},
    )
    metrics = evaluate_model(out, data / "test.json", data / "images", device=device)
    write_json_atomic(metrics_file, metrics, indent=2)
    return metrics


def _baseline_is_teacher(settings: dict, student_iterations: int) -> bool:
    """Whether the equal-schedule baseline would be the teacher again: labeled only, same recipe, init, seed
    and iterations (``--schedule-factor 1``), so it is not trained twice."""
    teacher, student = settings["teacher"], settings["student"]
    return (
        teacher.get("model") is None
        and student_iterations == teacher["iterations"]
        and student.get("recipe") in (None, teacher["recipe"])
        and student.get("init", "scratch") == teacher.get("init", "scratch")
    )


def _teacher_dir(seed_dir: Path) -> Path:
    """The teacher the seed's round trained (its variants' teacher too)."""
    return seed_dir / "round_1" / "teacher"


def _variant(seed_dir: Path, name: str, seed: int, settings: dict, device: str, changes: dict) -> dict:
    data = seed_dir / "data"
    spec = json.loads(json.dumps(settings))
    spec["teacher"]["model"] = str(_teacher_dir(seed_dir))
    for key, value in changes.items():
        if isinstance(value, dict):
            spec.setdefault(key, {}).update(value)
        else:
            spec[key] = value
    config = PipelineConfig.model_validate({"data": synthetic_data_spec(data), "seed": seed, **spec})
    summary = run_pipeline(config, seed_dir / name, device=device)
    return summary["rounds"][0]["metrics"]["student"]


def _fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.2f}" if values else "-"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def _read_results(results_file: Path) -> dict[int, dict]:
    if not results_file.exists():
        return {}
    return {int(k): v for k, v in json.loads(results_file.read_text()).items()}


@contextlib.contextmanager
def _results_lock(results_file: Path) -> Iterator[None]:
    """Held while ``results.json`` is read, changed and written: runs of other seeds may share ``--out``."""
    results_file.parent.mkdir(parents=True, exist_ok=True)
    with open(results_file.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _save(results_file: Path, seed: int, entry: dict) -> dict[int, dict]:
    """Merge ``entry`` into ``seed``'s, model by model, keeping what other runs stored meanwhile (a variant's
    process may finish beside its seed's student); returns every seed's."""
    with _results_lock(results_file):
        results = _read_results(results_file)
        stored = results.get(seed, {})
        metrics = {**stored.get("metrics", {}), **entry.get("metrics", {})}
        results[seed] = {**stored, **entry, "metrics": metrics}
        write_json_atomic(results_file, results, indent=2)
    return results


def main(args: argparse.Namespace) -> None:
    results_file = args.out / "results.json"
    # earlier runs' seeds (and variants) are kept: a bench can be resumed or extended seed by seed, also by
    # several processes at once (one per seed) on the same --out
    results = _read_results(results_file)
    settings = round_settings(args)
    identity = {"preset": args.preset, **settings}  # kept per seed: a resumed seed must match it
    for seed in {*args.seeds, *args.variants_seeds} & set(results):
        if results[seed].get("settings", identity) != identity:
            raise SystemExit(
                f"{results_file}: seed {seed} was run with other settings ({results[seed]['settings']}); "
                "use another --out"
            )
    started = time.perf_counter()
    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        summary = run_demo(seed_dir, preset=args.preset, seed=seed, device=args.device, settings=settings)
        round_1 = summary["rounds"][0]
        metrics = {"teacher": round_1["metrics"]["teacher"], "student": round_1["metrics"]["student"]}
        if _baseline_is_teacher(settings, round_1["student_iterations"]):
            metrics["baseline"] = round_1["metrics"]["teacher"]
        elif args.baseline:
            iterations = round_1["student_iterations"]
            metrics["baseline"] = _baseline(seed_dir, seed, iterations, args.recipe, args.device)
        previous = results.get(seed, {})
        # a resumed seed's summary times only what ran now: keep the first complete run's minutes
        minutes = previous.get("minutes") or summary["minutes"]
        results = _save(results_file, seed, {"metrics": metrics, "minutes": minutes, "settings": identity})
        print(f"seed {seed} done after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    for seed in args.variants_seeds:  # after every seed's main comparison, or in a process of their own
        seed_dir = args.out / f"seed{seed}"
        if not is_complete(_teacher_dir(seed_dir)):
            raise SystemExit(
                f"{seed_dir}: seed {seed} has no trained teacher yet; run --seeds {seed} first (once its "
                "teacher is trained, its variants can run in another process beside its student)"
            )
        for name in args.variants:
            metrics = {
                f"student_{name}": _variant(seed_dir, name, seed, settings, args.device, VARIANTS[name])
            }
            results = _save(results_file, seed, {"metrics": metrics, "settings": identity})

    for metric in METRICS:
        print(f"\n{metric} (points)")
        names = sorted({n for r in results.values() for n in r["metrics"]})
        width = max([20, *map(len, names)]) + 2
        print(f"{'seed':<6}" + "".join(f"{n:>{width}}" for n in names))
        for seed, r in results.items():
            row = [
                100 * primary_metric(r["metrics"][n], metric) if n in r["metrics"] else None for n in names
            ]
            print(f"{seed:<6}" + "".join(f"{'-' if v is None else f'{v:.2f}':>{width}}" for v in row))
        for model, ref in COMPARISONS:
            gains = [
                100 * (primary_metric(m[model], metric) - primary_metric(m[ref], metric))
                for m in (r["metrics"] for r in results.values())
                if model in m and ref in m
            ]
            if gains:
                print(f"{model} - {ref}: {_fmt(gains)} (mean ± sd over {len(gains)} seeds)")
    print(json.dumps({"seeds": list(results), "minutes": (time.perf_counter() - started) / 60}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the pipeline's progress lines
    main(get_args_parser().parse_args())
