"""A distillation round, and rounds: teacher -> multi-view inference -> calibration -> pseudo-labels ->
student -> evaluation -> promotion.

``distill run --config PIPELINE.yaml`` reads a :class:`PipelineConfig`. Everything a run makes lives under
one directory::

    RUN/
      summary.json            every round's thresholds, counts, metrics, decision, minutes
      report.md               the same for people: AP table, calibration plot, settings
      round_1/
        teacher/              trained from the labeled split when no teacher model is given
        predictions.jsonl     fused multi-view predictions on every unlabeled image (+ agreement)
        pseudo.json           the pseudo-label COCO file, with provenance in ``info``
        pseudo.calibration.json / .png
        student/
        metrics.json          teacher and student on the test split
      round_2/ ...            round k's teacher is round k-1's promoted model; a round whose student is
                              not promoted ends the run (the next round would repeat it)

Every step skips what is already complete (a finished model, a complete predictions file, an existing
pseudo-label file, a metrics file), and training resumes from its checkpoint, so re-running the same
command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distill.errors import InputError
from distill.evaluate import BOX_METRICS, KEYPOINT_METRICS, format_table
from distill.io import write_json_atomic, write_text_atomic
from distill.models.store import read_meta
from distill.train.loop import TrainProgress


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    labeled: Path  # COCO json with annotations
    labeled_images: Path
    unlabeled: Path  # COCO json (annotations ignored) or an image folder
    unlabeled_images: Path | None = None  # folder for the unlabeled json's file names
    test: Path | None = None  # COCO json used to compare teacher and student
    test_images: Path | None = None


class TeacherSpec(_Strict):
    model: Path | None = None  # an existing model directory; else trained from the labeled split
    recipe: str | None = "synth"
    init: str = "scratch"
    iterations: int | None = Field(None, ge=1)


class InferenceSpec(_Strict):
    views: str = "paper"
    fusion: Literal["nms", "vote", "soft-nms", "wbf"] = "nms"
    batch_size: int = Field(2, ge=1)
    max_detections: int = Field(100, ge=1)
    score_floor: float = Field(0.0, ge=0, le=1)
    view_score_thresh: float | None = Field(None, ge=0, le=1)
    feature_cache_mb: float | None = Field(None, gt=0)  # None: sized from the free memory (FusionConfig)


class CalibrationSpec(_Strict):
    per_class: bool = False
    threshold: float | None = None
    min_agreement: float | None = Field(None, ge=0, le=1)
    strict: bool = False


class StudentSpec(_Strict):
    recipe: str | None = None  # default: the teacher's recipe
    init: str = "scratch"  # scratch | imagenet | teacher | PATH
    iterations: int | None = Field(None, ge=1)  # default: schedule_factor x the teacher's iterations
    schedule_factor: float = Field(1.5, gt=0)
    ratio: tuple[float, float] = (6.0, 4.0)  # labeled : pseudo per minibatch


class EvaluationSpec(_Strict):
    primary: str = "bbox/AP"  # IOU_TYPE/METRIC deciding promotion, e.g. keypoints/AP

    @field_validator("primary")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        iou_type, _, name = value.partition("/")
        names = {"bbox": BOX_METRICS, "segm": BOX_METRICS, "keypoints": KEYPOINT_METRICS}.get(iou_type)
        if names is None or (name or "AP") not in names:
            raise ValueError(
                f"{value!r} is not IOU_TYPE/METRIC with IOU_TYPE bbox, segm or keypoints and METRIC one of "
                f"{', '.join(KEYPOINT_METRICS if iou_type == 'keypoints' else BOX_METRICS)}"
            )
        return value


class PipelineConfig(_Strict):
    data: DataSpec
    teacher: TeacherSpec = TeacherSpec()
    inference: InferenceSpec = InferenceSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    student: StudentSpec = StudentSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    rounds: int = Field(1, ge=1)
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Load and validate; relative data paths are resolved against the YAML file's folder."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: pipeline config not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML: {exc}") from None
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"{path}: {where}: {first['msg']} ({exc.error_count()} problem(s))") from None
        base = path.parent
        data = config.data.model_dump()
        for key, value in data.items():
            if value is not None and not Path(value).is_absolute():
                data[key] = base / value
        if config.teacher.model is not None and not config.teacher.model.is_absolute():
            config.teacher.model = base / config.teacher.model
        config.teacher.recipe = _relative_file(config.teacher.recipe, base)
        config.student.recipe = _relative_file(config.student.recipe, base)
        if config.student.init not in ("scratch", "imagenet", "teacher"):
            config.student.init = _relative_file(config.student.init, base) or config.student.init
        config.data = DataSpec.model_validate(data)
        return config


def _relative_file(value: str | None, base: Path) -> str | None:
    """A recipe name stays; a relative file path is taken relative to the pipeline YAML's folder."""
    from distill.recipes import RECIPES

    if value is None or value in RECIPES or Path(value).is_absolute():
        return value
    return str(base / value)


def primary_metric(metrics: dict[str, dict[str, float]], primary: str) -> float:
    """The value of ``IOU_TYPE/METRIC`` in a metrics dict; an error when the model has no such metric (e.g.
    ``keypoints/AP`` for a model without a keypoint head)."""
    iou_type, _, name = primary.partition("/")
    if iou_type not in metrics:
        raise InputError(
            f"evaluation.primary: {primary} cannot decide promotion: the model has no {iou_type} results "
            f"(it is evaluated on {', '.join(metrics) or 'nothing'})"
        )
    return float(metrics[iou_type][name or "AP"])


def run_pipeline(
    config: PipelineConfig,
    out: str | Path,
    *,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
    progress: Callable[[TrainProgress], None] | None = None,
) -> dict[str, Any]:
    """Run ``config.rounds`` distillation rounds under ``out``; returns (and writes) the summary."""
    out = Path(out)
    _check_same_config(config, out / "pipeline.yaml")
    _check_inputs(config)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "pipeline.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    rounds: list[dict[str, Any]] = []
    teacher_dir = config.teacher.model
    teacher_metrics: dict[str, dict[str, float]] | None = None
    for k in range(1, config.rounds + 1):
        round_dir = out / f"round_{k}"
        minutes: dict[str, float] = {}
        if teacher_dir is None:
            teacher_dir = round_dir / "teacher"
            with _timer(minutes, "teacher"):
                _train_teacher(config, teacher_dir, device, echo, progress)
        if config.data.test is not None and teacher_metrics is None:
            with _timer(minutes, "evaluate_teacher"):
                teacher_metrics = _cached_metrics(
                    round_dir / "teacher_metrics.json", teacher_dir, config, device
                )
            primary_metric(teacher_metrics, config.evaluation.primary)  # fails now, not after the student
        with _timer(minutes, "inference"):
            predictions, views = _infer(config, teacher_dir, round_dir / "predictions.jsonl", device, echo)
        with _timer(minutes, "calibrate"):
            calibration = _pseudo_labels(config, teacher_dir, predictions, views, round_dir, echo)
        student_dir = round_dir / "student"
        with _timer(minutes, "student"):
            iterations = _train_student(config, teacher_dir, round_dir, student_dir, device, echo, progress)
        record: dict[str, Any] = {
            "round": k,
            "teacher": str(teacher_dir),
            "student": str(student_dir),
            "student_iterations": iterations,
            "views": views,
            "calibration": {
                key: calibration[key]
                for key in ("mode", "threshold", "class_thresholds", "keypoint_thresholds", "kept_per_image")
            }
            | {
                "labeled_per_image": calibration["labeled_instances_per_image"],
                "warnings": calibration["warnings"],
            },
            "pseudo_labels": str(round_dir / "pseudo.json"),
        }
        promoted = True
        if config.data.test is not None:
            with _timer(minutes, "evaluate_student"):
                student_metrics = _cached_metrics(round_dir / "metrics.json", student_dir, config, device)
            assert teacher_metrics is not None
            t_value = primary_metric(teacher_metrics, config.evaluation.primary)
            s_value = primary_metric(student_metrics, config.evaluation.primary)
            promoted = s_value > t_value
            record["metrics"] = {"teacher": teacher_metrics, "student": student_metrics}
            record["primary"] = {"metric": config.evaluation.primary, "teacher": t_value, "student": s_value}
            echo(f"round {k}: teacher vs student on {config.data.test} (AP in points)")
            echo(format_table({"teacher": teacher_metrics, "student": student_metrics}))
            verdict = "promoted" if promoted else "not promoted (the teacher stays)"
            metric = config.evaluation.primary
            echo(f"{metric}: teacher {100 * t_value:.1f}, student {100 * s_value:.1f} -> {verdict}")
        record["promoted"] = promoted
        record["minutes"] = {key: round(v, 2) for key, v in minutes.items()}
        rounds.append(record)
        if not promoted:  # the next round would repeat this one with the same teacher and seed
            if k < config.rounds:
                echo(f"stopping after round {k}: the student did not beat the teacher")
            break
        teacher_dir = student_dir
        teacher_metrics = record.get("metrics", {}).get("student")
    summary = {
        "run": str(out),
        "rounds": rounds,
        "final_model": str(teacher_dir),
        "seed": config.seed,
    }
    write_json_atomic(out / "summary.json", summary, indent=2)
    write_text_atomic(out / "report.md", render_report(summary))
    return summary


# settings that change how fast a run goes, not what it makes: a resumed run may change them
RUNTIME_ONLY = {("inference", "feature_cache_mb")}


def _check_same_config(config: PipelineConfig, saved: Path) -> None:
    """Resuming must not mix artifacts of two configs: only ``rounds`` (and the :data:`RUNTIME_ONLY`
    settings) may change in an existing run. A field the saved config predates counts as its default."""
    if not saved.exists():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = config.model_dump(mode="json")
    changed: list[str] = []
    for section in sorted(set(before) | set(now)):
        old, new = (
            _resolve_paths(config, section, _with_defaults(config, section, before.get(section))),
            _resolve_paths(config, section, now.get(section)),
        )
        if section == "rounds" or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [
                f"{section}.{k}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and (section, k) not in RUNTIME_ONLY
            ]
        else:
            changed.append(section)
    if changed:
        raise InputError(
            f"{saved.parent}: this run directory was made with another pipeline config (differs in "
            f"{', '.join(changed)}); use a new --out, or delete the directory to start over"
        )


def _with_defaults(config: PipelineConfig, section: str, values: Any) -> Any:
    """A saved config section with the fields added to the config since then set to their defaults."""
    model = getattr(config, section, None)
    if not isinstance(values, dict) or not isinstance(model, BaseModel):
        return values
    fields = type(model).model_fields
    added = [k for k in fields.keys() - values.keys() if not fields[k].is_required()]
    return {**values, **{k: json.loads(json.dumps(fields[k].default)) for k in added}}


def _resolve_paths(config: PipelineConfig, section: str, values: Any) -> Any:
    """``values`` (one dumped config section) with its path fields made absolute, so that the same file named
    relatively or absolutely compares equal."""
    model = getattr(config, section, None)
    if not isinstance(values, dict) or model is None:
        return values
    return {
        key: str(Path(value).resolve())
        if isinstance(value, str) and isinstance(getattr(model, key, None), Path)
        else value
        for key, value in values.items()
    }


def _check_inputs(config: PipelineConfig) -> None:
    data = config.data
    for name in ("labeled", "labeled_images", "unlabeled", "test", "test_images", "unlabeled_images"):
        value = getattr(data, name)
        if value is not None and not Path(value).exists():
            raise InputError(f"data.{name}: {value} does not exist")
    if config.teacher.model is not None and not config.teacher.model.is_dir():
        raise InputError(f"teacher.model: {config.teacher.model} is not a model directory")


class _timer:
    def __init__(self, minutes: dict[str, float], key: str) -> None:
        self.minutes, self.key = minutes, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.minutes[self.key] = (time.perf_counter() - self.start) / 60


def _finished(model_dir: Path, iterations: int) -> bool:
    meta = read_meta(model_dir)
    return (model_dir / "weights.pt").exists() and meta.get("training", {}).get("iterations") == iterations


def _teacher_iterations(config: PipelineConfig) -> int:
    from distill.recipes import load_recipe
    from distill.train.loop import TrainConfig

    if config.teacher.iterations is not None:
        return config.teacher.iterations
    if config.teacher.model is not None:  # a given teacher: its own schedule when its meta.json has it
        trained = read_meta(config.teacher.model).get("training", {}).get("iterations")
        if trained:
            return int(trained)
    return TrainConfig.model_validate(load_recipe(config.teacher.recipe)["train"]).iterations


def _train_teacher(config, teacher_dir: Path, device, echo, progress) -> None:
    from distill.workflow import train_model

    iterations = _teacher_iterations(config)
    if _finished(teacher_dir, iterations):
        echo(f"teacher: {teacher_dir} is complete")
        return
    echo(f"training the teacher on {config.data.labeled} ({iterations} iterations)")
    train_model(
        config.data.labeled,
        config.data.labeled_images,
        teacher_dir,
        recipe=config.teacher.recipe,
        init=config.teacher.init,
        device=device,
        train_overrides={"iterations": iterations, "seed": config.seed},
        progress=progress,
    )


def _infer(config, teacher_dir: Path, out: Path, device, echo) -> tuple[Path, dict]:
    from distill.data.images import iter_image_refs
    from distill.models.store import load_model
    from distill.tta.engine import FusionConfig, MultiViewEngine
    from distill.tta.stream import run_to_jsonl
    from distill.tta.views import parse_views

    spec = config.inference
    detector = load_model(teacher_dir, device=device)
    views = parse_views(spec.views, test_size=detector.config.test_size, max_size=detector.config.max_size)
    fusion = FusionConfig(
        method=spec.fusion,
        max_detections=spec.max_detections,
        score_floor=spec.score_floor,
        view_score_thresh=spec.view_score_thresh,
        feature_cache_mb=spec.feature_cache_mb,
    )
    refs = iter_image_refs(config.data.unlabeled, images_dir=config.data.unlabeled_images)
    if not out.exists():
        echo(f"multi-view inference: {len(refs)} unlabeled images x {len(views)} views ({spec.views})")
    result = run_to_jsonl(MultiViewEngine(detector, views, fusion), refs, out, batch_size=spec.batch_size)
    for path, reason in result.skipped:
        echo(f"skipped {path}: {reason}")
    return out, {**views.to_dict(), "fusion": spec.model_dump(mode="json")}


def _pseudo_labels(config, teacher_dir: Path, predictions: Path, views: dict, round_dir: Path, echo) -> dict:
    from distill.workflow import file_sha256, make_pseudo_labels

    out = round_dir / "pseudo.json"
    report = out.with_name("pseudo.calibration.json")
    if out.exists() and report.exists():
        return json.loads(report.read_text())
    spec = config.calibration
    calibration = make_pseudo_labels(
        predictions,
        unlabeled=config.data.unlabeled,
        unlabeled_images_dir=config.data.unlabeled_images,
        labeled_json=config.data.labeled,
        out=out,
        per_class=spec.per_class,
        threshold=spec.threshold,
        min_agreement=spec.min_agreement,
        strict=spec.strict,
        provenance={
            "teacher": str(teacher_dir),
            "teacher_sha256": file_sha256(teacher_dir / "weights.pt"),
            "views": views,
        },
    )
    echo(describe_calibration(calibration))
    return calibration.to_dict()


def describe_calibration(calibration) -> str:
    """One or a few lines: threshold(s), kept per image vs the labeled mean, warnings."""
    if calibration.threshold is not None:
        thr = f"threshold {calibration.threshold:.4f}"
    else:
        thr = "thresholds " + ", ".join(f"{c}: {t:.4f}" for c, t in calibration.class_thresholds.items())
    lines = [
        f"calibration ({calibration.mode}): {thr}; {calibration.kept_per_image:.3f} pseudo-instances per "
        f"unlabeled image (labeled: {calibration.labeled_instances_per_image:.3f}), "
        f"{calibration.kept_instances} in all"
    ]
    if calibration.keypoint_thresholds:
        lines.append(
            "keypoint score thresholds: "
            + ", ".join(f"category {c}: {t:.3f}" for c, t in calibration.keypoint_thresholds.items())
        )
    lines.extend(f"warning: {w}" for w in calibration.warnings)
    return "\n".join(lines)


def _train_student(
    config, teacher_dir: Path, round_dir: Path, student_dir: Path, device, echo, progress
) -> int:
    from distill.workflow import train_student

    spec = config.student
    iterations = spec.iterations or max(1, round(spec.schedule_factor * _teacher_iterations(config)))
    if _finished(student_dir, iterations):
        echo(f"student: {student_dir} is complete")
        return iterations
    init = str(teacher_dir) if spec.init == "teacher" else spec.init
    mix = f"{spec.ratio[0]:g}:{spec.ratio[1]:g}"
    echo(f"training the student ({iterations} iterations, labeled:pseudo = {mix})")
    if read_meta(teacher_dir).get("backend") == "detectron2":
        # the student is the teacher's detectron2 architecture, re-initialised, trained by detectron2
        from distill.train.detectron2 import read_cfg_of_model, train_detectron2

        train_detectron2(
            read_cfg_of_model(teacher_dir),
            config.data.labeled,
            config.data.labeled_images,
            student_dir,
            pseudo_json=round_dir / "pseudo.json",
            pseudo_images=config.data.unlabeled_images or _images_root(config.data.unlabeled),
            ratio=spec.ratio,
            init=init,
            iterations=iterations,
            seed=config.seed,
            device=device,
            progress=progress,
        )
        return iterations
    train_student(
        config.data.labeled,
        config.data.labeled_images,
        round_dir / "pseudo.json",
        config.data.unlabeled_images or _images_root(config.data.unlabeled),
        student_dir,
        recipe=spec.recipe if spec.recipe is not None else config.teacher.recipe,
        init=init,
        ratio=spec.ratio,
        device=device,
        train_overrides={"iterations": iterations, "seed": config.seed},
        progress=progress,
    )
    return iterations


def _images_root(unlabeled: Path) -> Path:
    return unlabeled if unlabeled.is_dir() else unlabeled.parent


def _cached_metrics(path: Path, model_dir: Path, config: PipelineConfig, device: str) -> dict:
    from distill.workflow import evaluate_model

    if path.exists():
        return json.loads(path.read_text())
    metrics = evaluate_model(model_dir, config.data.test, config.data.test_images, device=device)
    write_json_atomic(path, metrics, indent=2)
    return metrics


def render_report(summary: dict[str, Any]) -> str:
    """The run's Markdown report: per round the AP table, the calibration plot and the decision."""
    lines = [
        "# distill run",
        "",
        f"Run directory: `{summary['run']}`; final model: `{summary['final_model']}`",
        "",
    ]
    for r in summary["rounds"]:
        k = r["round"]
        lines += [f"## Round {k}", ""]
        cal = r["calibration"]
        lines.append(
            f"- calibration: {cal['mode']}, {cal['kept_per_image']:.3f} pseudo-instances per unlabeled image "
            f"(labeled: {cal['labeled_per_image']:.3f})"
        )
        for w in cal["warnings"]:
            lines.append(f"- **warning**: {w}")
        lines.append(f"- student: {r['student_iterations']} iterations")
        if "metrics" in r:
            lines += ["", "```", format_table(r["metrics"]), "```", ""]
            p = r["primary"]
            lines.append(
                f"{p['metric']}: teacher {100 * p['teacher']:.1f}, student {100 * p['student']:.1f} -> "
                + ("**promoted**" if r["promoted"] else "not promoted")
            )
        lines += ["", f"![calibration](round_{k}/pseudo.calibration.png)", ""]
    return "\n".join(lines) + "\n"
