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
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from distill import steps
from distill.backends import get_backend, model_backend
from distill.errors import InputError
from distill.evaluate import BOX_METRICS, KEYPOINT_METRICS, format_table
from distill.health import round_problems
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_json_atomic, write_text_atomic
from distill.layout import RoundLayout, RunLayout
from distill.models.config import load_model_config
from distill.models.files import CONFIG_FILE, WEIGHTS_FILE, file_sha256, is_complete, read_meta
from distill.recipes import RECIPES, load_recipe
from distill.report import describe_calibration, render_report
from distill.specs import (
    CalibrationSpec,
    EvaluateSpec,
    InferenceSpec,
    InferSpec,
    PseudoLabelSpec,
    TrainSpec,
    _Strict,
)
from distill.storage import Storage
from distill.train.loop import TrainConfig
from distill.tta.views import parse_views

logger = logging.getLogger(__name__)


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


class StudentSpec(_Strict):
    recipe: str | None = None  # default: the teacher's recipe
    init: str = "scratch"  # scratch | imagenet | teacher | PATH
    iterations: int | None = Field(None, ge=1)  # default: schedule_factor x the teacher's iterations
    schedule_factor: float = Field(1.5, gt=0)
    ratio: tuple[float, float] = (6.0, 4.0)  # labeled : pseudo per minibatch


class EvaluationSpec(_Strict):
    primary: str = "bbox/AP"  # IOU_TYPE/METRIC deciding promotion, e.g. keypoints/AP
    min_gain: float = Field(0.0, ge=0)  # the student is promoted when primary > the teacher's + min_gain

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


def decide_promotion(
    config: PipelineConfig, teacher: dict[str, dict[str, float]], student: dict[str, dict[str, float]]
) -> tuple[bool, float, float]:
    """(promoted, teacher value, student value) of the primary metric: the student must beat the teacher by
    more than ``evaluation.min_gain``."""
    t_value = primary_metric(teacher, config.evaluation.primary)
    s_value = primary_metric(student, config.evaluation.primary)
    return s_value > t_value + config.evaluation.min_gain, t_value, s_value


# -- the specs of a round's steps (what a worker runs; run_pipeline runs the same ones) ---------------------
def teacher_iterations(config: PipelineConfig, storage: Storage = steps.LOCAL) -> int:
    """The teacher's schedule length: ``teacher.iterations``, else the given teacher model's own (its
    training record, or a detectron2 config's ``SOLVER.MAX_ITER``), else the teacher recipe's."""
    if config.teacher.iterations is not None:
        return config.teacher.iterations
    if config.teacher.model is not None:
        model = _model_dir(storage, str(config.teacher.model))
        backend = get_backend(model_backend(model), require_available=False)
        trained = backend.default_iterations(model)
        if trained:
            return trained
    return TrainConfig.model_validate(load_recipe(config.teacher.recipe)["train"]).iterations


def student_iterations(config: PipelineConfig, storage: Storage = steps.LOCAL) -> int:
    spec = config.student
    return spec.iterations or max(1, round(spec.schedule_factor * teacher_iterations(config, storage)))


def _model_dir(storage: Storage, key: str) -> Path:
    """The local copy of a model directory's loading files (the directory itself on local storage)."""
    return storage.local(key, members=steps.MODEL_FILES)


def teacher_train_spec(
    config: PipelineConfig, out: str, *, device: str = "cpu", storage: Storage = steps.LOCAL
) -> TrainSpec:
    """Train the round's teacher from the labeled split (when the config gives no teacher model)."""
    data = config.data
    return TrainSpec(
        out=out,
        labeled=str(data.labeled),
        labeled_images=str(data.labeled_images),
        config=config.teacher.recipe,
        init=config.teacher.init,
        iterations=teacher_iterations(config, storage),
        seed=config.seed,
        device=device,
    )


def infer_spec(
    config: PipelineConfig,
    teacher: str,
    out: str,
    *,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    cache: str | None = None,
) -> InferSpec:
    """Shard ``shard`` of the teacher's multi-view inference on the unlabeled set (``cache``: the
    :attr:`InferSpec.cache` prefix its per-image predictions are kept under; None: none)."""
    data = config.data
    return InferSpec(
        model=teacher,
        images=str(data.unlabeled),
        images_dir=None if data.unlabeled_images is None else str(data.unlabeled_images),
        out=out,
        shard=shard,
        inference=config.inference,
        device=device,
        cache=cache,
    )


def pseudo_label_spec(
    config: PipelineConfig, teacher: str, predictions: list[str], out: str, *, storage: Storage = steps.LOCAL
) -> PseudoLabelSpec:
    """Calibrate on every shard's predictions and write the pseudo-label file ``out``."""
    data = config.data
    return PseudoLabelSpec(
        predictions=predictions,
        unlabeled=str(data.unlabeled),
        unlabeled_images=None if data.unlabeled_images is None else str(data.unlabeled_images),
        labeled=str(data.labeled),
        out=out,
        calibration=config.calibration,
        provenance={
            "teacher": teacher,
            "teacher_sha256": file_sha256(_model_dir(storage, teacher) / WEIGHTS_FILE),
            "views": views_record(config, teacher, storage),
        },
    )


def student_train_spec(
    config: PipelineConfig,
    teacher: str,
    pseudo: str,
    out: str,
    *,
    device: str = "cpu",
    storage: Storage = steps.LOCAL,
) -> TrainSpec:
    """The student: the teacher's backend, labeled + pseudo-labels at ``student.ratio``, re-initialised."""
    data, spec = config.data, config.student
    common = {
        "out": out,
        "labeled": str(data.labeled),
        "labeled_images": str(data.labeled_images),
        "pseudo": pseudo,
        "pseudo_images": str(data.unlabeled_images or _images_root(data.unlabeled)),
        "ratio": spec.ratio,
        "init": teacher if spec.init == "teacher" else spec.init,
        "iterations": student_iterations(config, storage),
        "seed": config.seed,
        "device": device,
    }
    # a detectron2 teacher: its architecture, re-initialised
    if model_backend(_model_dir(storage, teacher)) == "detectron2":
        return TrainSpec(backend="detectron2", architecture_from=teacher, **common)
    recipe = spec.recipe if spec.recipe is not None else config.teacher.recipe
    return TrainSpec(backend="torchvision", config=recipe, **common)


def evaluate_spec(config: PipelineConfig, model: str, out: str, *, device: str = "cpu") -> EvaluateSpec:
    assert config.data.test is not None
    images = config.data.test_images
    return EvaluateSpec(
        model=model, truth=str(config.data.test), images=None if images is None else str(images), out=out,
        device=device,
    )  # fmt: skip


def _images_root(unlabeled: Path) -> Path:
    return unlabeled if unlabeled.is_dir() else unlabeled.parent


# -- in-process composition ---------------------------------------------------------------------------------
def run_pipeline(
    config: PipelineConfig,
    out: str | Path,
    *,
    device: str = "cpu",
    context: StepContext = NULL_CONTEXT,
) -> dict[str, Any]:
    """Run ``config.rounds`` distillation rounds under ``out``; returns (and writes) the summary.

    Each round is the steps of :mod:`distill.steps` in order, with one inference shard; a cancel raises
    :class:`~distill.errors.Cancelled` from the running step, and running again resumes.
    """
    layout = RunLayout(str(Path(out)))
    _check_same_config(config, Path(layout.pipeline_config))
    _check_inputs(config)
    inputs = inputs_record(config)
    _check_same_inputs(inputs, Path(layout.inputs))
    Path(layout.root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.inputs, inputs, indent=2)
    write_text_atomic(layout.pipeline_config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    rounds: list[dict[str, Any]] = []
    teacher = None if config.teacher.model is None else str(config.teacher.model)
    teacher_metrics: dict[str, dict[str, float]] | None = None
    for k in range(1, config.rounds + 1):
        record, teacher_metrics = _run_round(
            config, layout.round(k), teacher, teacher_metrics, device, context
        )
        teacher = record["teacher"]
        rounds.append(record)
        if not record["promoted"]:  # the next round would repeat this one with the same teacher and seed
            if k < config.rounds:
                logger.info("stopping after round %d: the student did not beat the teacher", k)
            break
        teacher = record["student"]
        teacher_metrics = record.get("metrics", {}).get("student")
    summary = {"run": layout.root, "rounds": rounds, "final_model": teacher, "seed": config.seed}
    write_json_atomic(layout.summary, summary, indent=2)
    write_text_atomic(layout.report, render_report(summary))
    return summary


def _run_round(
    config: PipelineConfig,
    layout: RoundLayout,
    teacher: str | None,
    teacher_metrics: dict[str, dict[str, float]] | None,
    device: str,
    context: StepContext,
) -> tuple[dict[str, Any], dict[str, dict[str, float]] | None]:
    """One round; returns its summary record and the teacher's test metrics."""
    k = layout.number
    minutes: dict[str, float] = {}
    if teacher is None:
        teacher = layout.teacher
        with _timer(minutes, "teacher"):
            spec = teacher_train_spec(config, teacher, device=device)
            if not is_complete(teacher, spec.iterations):
                logger.info(
                    "training the teacher on %s (%d iterations)", config.data.labeled, spec.iterations
                )
            if steps.train(spec, context=context).reused:
                logger.info("teacher: %s is complete", teacher)
    if config.data.test is not None and teacher_metrics is None:
        with _timer(minutes, "evaluate_teacher"):
            teacher_metrics = steps.evaluate(
                evaluate_spec(config, teacher, layout.teacher_metrics, device=device), context=context
            ).metrics
        primary_metric(teacher_metrics, config.evaluation.primary)  # fails now, not after the student
    with _timer(minutes, "inference"):
        inferred = steps.infer(
            infer_spec(config, teacher, layout.predictions, device=device), context=context
        )
        for warning in inferred.warnings:
            logger.warning("%s", warning)
    with _timer(minutes, "calibrate"):
        spec = pseudo_label_spec(config, teacher, [layout.predictions], layout.pseudo)
        labeled = steps.pseudo_label(spec, context=context)
        if not labeled.reused:
            logger.info("%s", describe_calibration(labeled.metrics, labeled.warnings))
    with _timer(minutes, "student"):
        spec = student_train_spec(config, teacher, layout.pseudo, layout.student, device=device)
        if not is_complete(layout.student, spec.iterations):
            mix = f"{spec.ratio[0]:g}:{spec.ratio[1]:g}"
            logger.info("training the student (%d iterations, labeled:pseudo = %s)", spec.iterations, mix)
        if steps.train(spec, context=context).reused:
            logger.info("student: %s is complete", layout.student)
    record: dict[str, Any] = {
        "round": k,
        "teacher": teacher,
        "student": layout.student,
        "student_iterations": spec.iterations,
        "views": views_record(config, teacher),
        "calibration": {
            key: labeled.metrics[key]
            for key in ("mode", "threshold", "class_thresholds", "keypoint_thresholds", "kept_per_image")
        }
        | {"labeled_per_image": labeled.metrics["labeled_per_image"], "warnings": labeled.warnings},
        "pseudo_labels": layout.pseudo,
        "promoted": True,
    }
    if config.data.test is not None:
        assert teacher_metrics is not None
        with _timer(minutes, "evaluate_student"):
            record.update(_promotion(config, layout, teacher_metrics, device, context))
    training = read_meta(Path(layout.student)).get("training", {})
    record["health"] = round_problems(record["calibration"], training)
    if record["health"]:
        logger.warning("round %d is not promoted: %s", k, "; ".join(record["health"]))
        record["promoted"] = False
    record["minutes"] = {key: round(v, 2) for key, v in minutes.items()}
    return record, teacher_metrics


def _promotion(
    config: PipelineConfig,
    layout: RoundLayout,
    teacher_metrics: dict[str, dict[str, float]],
    device: str,
    context: StepContext,
) -> dict[str, Any]:
    """Evaluate the round's student on the test split and decide: ``metrics``, ``primary``, ``promoted``."""
    student_metrics = steps.evaluate(
        evaluate_spec(config, layout.student, layout.student_metrics, device=device), context=context
    ).metrics
    promoted, t_value, s_value = decide_promotion(config, teacher_metrics, student_metrics)
    metrics = {"teacher": teacher_metrics, "student": student_metrics}
    logger.info("round %d: teacher vs student on %s (AP in points)", layout.number, config.data.test)
    logger.info("%s", format_table(metrics))
    verdict = "promoted" if promoted else "not promoted (the teacher stays)"
    primary = config.evaluation.primary
    logger.info("%s: teacher %.1f, student %.1f -> %s", primary, 100 * t_value, 100 * s_value, verdict)
    return {
        "metrics": metrics,
        "primary": {"metric": primary, "teacher": t_value, "student": s_value},
        "promoted": promoted,
    }


def views_record(config: PipelineConfig, teacher: str, storage: Storage = steps.LOCAL) -> dict[str, Any]:
    """The view set the teacher runs (its sizes resolved against its test view) and the fusion settings."""
    model = load_model_config(_model_dir(storage, teacher) / CONFIG_FILE)
    views = parse_views(config.inference.views, test_size=model.test_size, max_size=model.max_size)
    return {**views.to_dict(), "fusion": config.inference.model_dump(mode="json")}


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


def inputs_record(config: PipelineConfig) -> dict[str, Any]:
    """What the config's names point at, so that a resumed run can tell they changed under the same names:
    the sha256 of each annotation file and what each recipe holds (a built-in recipe's settings, a recipe
    file's sha256). An image folder is not hashed (a growing pile is what it is for)."""
    record: dict[str, Any] = {}
    for name in ("labeled", "unlabeled", "test"):
        path = getattr(config.data, name)
        if path is not None and Path(path).is_file():
            record[f"data.{name}"] = file_sha256(path)
    for section in ("teacher", "student"):
        recipe = getattr(config, section).recipe
        if recipe in RECIPES:
            record[f"{section}.recipe"] = json.loads(json.dumps(RECIPES[recipe]))
        elif recipe is not None and Path(recipe).is_file():
            record[f"{section}.recipe"] = file_sha256(recipe)
    return record


def _check_same_inputs(inputs: dict[str, Any], saved: Path) -> None:
    """Refuse to resume a run whose data files or recipes changed under the same names (e.g. an upgraded
    distill whose built-in recipe or benchmark preset changed): its finished steps were made from the old
    ones. A run made before this record existed has no file to compare with."""
    if not saved.exists():
        return
    before = json.loads(saved.read_text())
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    if changed:
        raise InputError(
            f"{saved.parent}: this run directory was made from other inputs (changed since: "
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
