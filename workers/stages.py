"""What one unit of a job's stage runs: the step spec it builds from the job's pipeline config, and the step.

Every job keeps a :class:`~distill.pipeline.PipelineConfig` whose data fields are storage keys (the job's
snapshots of its datasets) under ``spec["config"]``; its artifacts live under ``jobs/ID/`` in the layout of
a ``distill run`` directory (:class:`~distill.layout.RunLayout`). Stage names are the step's kind, with
``@K`` for round K > 1 (``infer@2``)::

    teacher  evaluate_teacher  infer (one unit per shard)  pseudo_label  student  evaluate_student  decide

A handler returns an :class:`Outcome`; the task records it in the ledger in the transaction that completes
the unit, so a unit's warnings, metrics and models are recorded once, by the worker that owned it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distill import steps
from distill.errors import DistillError
from distill.health import round_problems
from distill.hooks import StepContext
from distill.io import write_json_atomic, write_text_atomic
from distill.layout import RunLayout
from distill.models.files import read_meta
from distill.pipeline import (
    PipelineConfig,
    decide_promotion,
    evaluate_spec,
    infer_spec,
    pseudo_label_spec,
    student_train_spec,
    teacher_train_spec,
    views_record,
)
from distill.report import render_report
from distill.specs import EvaluateSpec, TrainSpec
from distill.storage import Storage

GPU, CPU = "gpu", "cpu"
QUEUES = {
    "teacher": GPU,
    "train": GPU,
    "evaluate_teacher": GPU,
    "evaluate": GPU,
    "infer": GPU,
    "pseudo_label": CPU,
    "student": GPU,
    "evaluate_student": GPU,
    "decide": CPU,
}


def stage_name(kind: str, round_number: int = 1) -> str:
    return kind if round_number == 1 else f"{kind}@{round_number}"


def parse_stage(stage: str) -> tuple[str, int]:
    kind, _, number = stage.partition("@")
    return kind, int(number or 1)


class EmptyPseudoLabels(DistillError):
    """The teacher's predictions left no pseudo-instance at all: the job fails with the calibration's
    reason instead of succeeding with nothing."""


@dataclass
class UnitRun:
    """One unit to run: its job, stage and index, the number of units of each stage of the job, and where
    things are."""

    job_id: int
    stage: str
    index: int
    spec: dict[str, Any]
    unit_counts: dict[str, int]
    storage: Storage
    device: str = "cpu"
    cache: str | None = None  # storage key prefix of the inference cache (None: off)

    @property
    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate(self.spec["config"])

    @property
    def layout(self) -> RunLayout:
        return RunLayout(f"jobs/{self.job_id}")

    @property
    def round(self) -> int:
        return parse_stage(self.stage)[1]


@dataclass
class Outcome:
    """What a unit made: its output key, warnings, skipped images (name + reason), metrics to record under
    the stage's name, models to register (``role`` -> fields), and ``stop``: end the job now, succeeded
    (a round whose student lost: the next round would repeat it)."""

    output_key: str
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    scored_model: str | None = None  # an evaluation: the model (key) whose metrics these are
    stop: bool = False


def teacher_of(run: UnitRun, round_number: int) -> str:
    """The storage key of round ``round_number``'s teacher: the given model or the one the job trains in
    round 1, the previous round's student after that."""
    if round_number > 1:
        return run.layout.round(round_number - 1).student
    config = run.config
    return str(config.teacher.model) if config.teacher.model is not None else run.layout.round(1).teacher


def _train(run: UnitRun, spec: TrainSpec, context: StepContext, role: str) -> Outcome:
    result = steps.train(spec, run.storage, context)
    info = {
        "iterations": result.info.get("iterations"),
        "resumed_from": result.info.get("resumed_from"),  # the checkpoint's iteration when a retry resumed
        "backend": spec.backend,
    }
    meta = read_meta(run.storage.local(spec.out, members=steps.MODEL_FILES))
    model = {"role": role, "key": spec.out, "backend": meta.get("backend", spec.backend), "info": info}
    return Outcome(spec.out, metrics={**result.metrics, **info}, models=[model])


def run_teacher(run: UnitRun, context: StepContext) -> Outcome:
    spec = teacher_train_spec(run.config, run.layout.round(1).teacher, device=run.device, storage=run.storage)
    return _train(run, spec, context, "teacher")


def run_train(run: UnitRun, context: StepContext) -> Outcome:
    spec = TrainSpec.model_validate({**run.spec["train"], "device": run.device})
    return _train(run, spec, context, "trained")


def run_student(run: UnitRun, context: StepContext) -> Outcome:
    k = run.round
    layout = run.layout.round(k)
    spec = student_train_spec(
        run.config, teacher_of(run, k), layout.pseudo, layout.student, device=run.device, storage=run.storage
    )
    return _train(run, spec, context, "student")


def run_evaluate_teacher(run: UnitRun, context: StepContext) -> Outcome:
    out = run.layout.round(1).teacher_metrics
    spec = evaluate_spec(run.config, teacher_of(run, 1), out, device=run.device)
    metrics = steps.evaluate(spec, run.storage, context).metrics
    return Outcome(out, metrics=metrics, scored_model=spec.model)


def run_evaluate_student(run: UnitRun, context: StepContext) -> Outcome:
    layout = run.layout.round(run.round)
    spec = evaluate_spec(run.config, layout.student, layout.student_metrics, device=run.device)
    metrics = steps.evaluate(spec, run.storage, context).metrics
    return Outcome(layout.student_metrics, metrics=metrics, scored_model=spec.model)


def run_evaluate(run: UnitRun, context: StepContext) -> Outcome:
    spec = EvaluateSpec.model_validate({**run.spec["evaluate"], "device": run.device})
    result = steps.evaluate(spec, run.storage, context)
    return Outcome(spec.out or "", metrics=result.metrics, scored_model=spec.model)


def run_infer(run: UnitRun, context: StepContext) -> Outcome:
    k = run.round
    count = run.unit_counts[run.stage]
    out = run.layout.round(k).shard(run.index, count)
    spec = infer_spec(
        run.config, teacher_of(run, k), out, shard=(run.index, count), device=run.device, cache=run.cache
    )
    result = steps.infer(spec, run.storage, context)
    skipped = list(result.info.get("skipped_images", []))
    counts = {key: result.info[key] for key in ("images", "cached", "inferred") if key in result.info}
    return Outcome(out, warnings=result.warnings, skipped=skipped, metrics=counts)


def run_pseudo_label(run: UnitRun, context: StepContext) -> Outcome:
    k = run.round
    layout = run.layout.round(k)
    shards = layout.shards(run.unit_counts[stage_name("infer", k)])
    spec = pseudo_label_spec(run.config, teacher_of(run, k), shards, layout.pseudo, storage=run.storage)
    result = steps.pseudo_label(spec, run.storage, context)
    if not result.metrics["kept_instances"]:
        # a job must not "succeed" with nothing: every unlabeled image would become a negative
        raise EmptyPseudoLabels("; ".join(result.warnings) or "no pseudo-instances survive calibration")
    return Outcome(layout.pseudo, warnings=result.warnings, metrics=result.metrics)


def _read_json(storage: Storage, key: str) -> dict[str, Any]:
    return json.loads(storage.local(key).read_text())


def run_decide(run: UnitRun, context: StepContext) -> Outcome:
    """Compare the round's student with its teacher on the eval split (when there is one), record the
    decision, and write the job's ``summary.json`` and ``report.md`` so far."""
    k, config, storage = run.round, run.config, run.storage
    layout = run.layout.round(k)
    teacher = teacher_of(run, k)
    calibration = _read_json(storage, layout.calibration)
    training = read_meta(storage.local(layout.student, members=steps.MODEL_FILES)).get("training", {})
    record: dict[str, Any] = {
        "round": k,
        "teacher": teacher,
        "student": layout.student,
        "student_iterations": training.get("iterations"),
        "views": views_record(config, teacher, storage),
        "calibration": {
            "mode": calibration["mode"],
            "threshold": calibration["threshold"],
            "kept_per_image": calibration["kept_per_image"],
            "labeled_per_image": calibration["labeled_instances_per_image"],
            "warnings": calibration["warnings"],
        },
        "pseudo_labels": layout.pseudo,
        "promoted": True,
    }
    if config.data.test is not None:
        before = run.layout.round(k - 1).student_metrics if k > 1 else layout.teacher_metrics
        metrics = {
            "teacher": _read_json(storage, before),
            "student": _read_json(storage, layout.student_metrics),
        }
        promoted, t_value, s_value = decide_promotion(config, metrics["teacher"], metrics["student"])
        record |= {
            "metrics": metrics,
            "primary": {"metric": config.evaluation.primary, "teacher": t_value, "student": s_value},
            "promoted": promoted,
        }
    record["health"] = round_problems(record["calibration"], training)
    record["promoted"] = record["promoted"] and not record["health"]
    summary = _summary(run, record)
    write_json_atomic(storage.output(run.layout.summary), summary, indent=2)
    storage.commit(run.layout.summary)
    write_text_atomic(storage.output(run.layout.report), render_report(summary))
    storage.commit(run.layout.report)
    decision = {key: record[key] for key in ("promoted", "teacher", "student", "health") if key in record}
    decision |= {"primary": record.get("primary"), "metrics": record.get("metrics")}
    return Outcome(run.layout.summary, metrics=decision, stop=not record["promoted"])


def _summary(run: UnitRun, record: dict[str, Any]) -> dict[str, Any]:
    """The job's summary in ``distill run``'s format: earlier rounds' records, then this one's."""
    storage = run.storage
    rounds = []
    if record["round"] > 1 and storage.exists(run.layout.summary):
        earlier = _read_json(storage, run.layout.summary)["rounds"]
        rounds = [r for r in earlier if r["round"] < record["round"]]
    rounds.append(record)
    final = record["student"] if record["promoted"] else record["teacher"]
    return {"run": run.layout.root, "rounds": rounds, "final_model": final, "seed": run.config.seed}


HANDLERS: dict[str, Callable[[UnitRun, StepContext], Outcome]] = {
    "teacher": run_teacher,
    "train": run_train,
    "evaluate_teacher": run_evaluate_teacher,
    "evaluate": run_evaluate,
    "infer": run_infer,
    "pseudo_label": run_pseudo_label,
    "student": run_student,
    "evaluate_student": run_evaluate_student,
    "decide": run_decide,
}


def run_unit(run: UnitRun, context: StepContext) -> Outcome:
    kind, _ = parse_stage(run.stage)
    return HANDLERS[kind](run, context)
