"""From a validated job request to a queued job: resolve dataset and model ids, snapshot the datasets
under ``jobs/ID/inputs/`` (a running job never sees later uploads), build the job's spec and plan
(:mod:`service.jobs`). Every problem a client can cause is an :class:`~distill.errors.InputError` naming
the field, raised before anything is committed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from distill.errors import InputError
from distill.pipeline import PipelineConfig
from service import jobs
from service.api.deps import Runtime
from service.datasets import snapshot_inputs
from service.models import Dataset, Image, Model

# the dataset kinds each role takes (an eval split may be any annotated set)
ROLE_KINDS = {"labeled": ("labeled",), "unlabeled": ("unlabeled",), "eval": ("eval", "labeled")}


def _dataset(session: Session, field: str, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise InputError(f"{field}: dataset {dataset_id} does not exist")
    kinds = ROLE_KINDS.get(field, ("labeled", "eval"))
    if dataset.kind not in kinds:
        raise InputError(
            f"{field}: dataset {dataset_id} ({dataset.name!r}) is {dataset.kind}; {field} needs "
            + " or ".join(kinds)
        )
    return dataset


def _model(session: Session, field: str, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise InputError(f"{field}: model {model_id} does not exist")
    return model


def _image_count(session: Session, dataset: Dataset) -> int:
    return int(session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0)


def _inputs(session: Session, runtime: Runtime, job_id: int, roles: dict[str, int]) -> dict[str, Any]:
    """Snapshot each role's dataset; the pipeline config's ``data`` section over the snapshots."""
    data: dict[str, Any] = {}
    names = {"labeled": "labeled", "unlabeled": "unlabeled", "eval": "test"}
    for role, dataset_id in roles.items():
        try:
            json_key, images_key = snapshot_inputs(
                session, runtime.storage, dataset_id, f"jobs/{job_id}/inputs/{role}.json"
            )
        except InputError as exc:
            raise InputError(f"{role}: {exc}") from None
        data[names[role]], data[f"{names[role]}_images"] = json_key, images_key
    return data


def submit_job(runtime: Runtime, body: Any, *, created_by: int | None = None) -> int:
    """Queue the job ``body`` asks for (a ``JobCreate`` of :mod:`service.api.routes`); returns its id."""
    settings = runtime.settings
    shard_size = getattr(body, "shard_size", None) or settings.shard_size
    with runtime.sessions() as session:  # validation only: ids, kinds, sizes (no lock held)
        roles = {r: getattr(body, r) for r in ("labeled", "unlabeled", "eval") if getattr(body, r, None)}
        datasets = {role: _dataset(session, role, i) for role, i in roles.items()}
        count = _image_count(session, datasets["unlabeled"]) if "unlabeled" in datasets else 0
        if "unlabeled" in datasets and count == 0:
            raise InputError(f"unlabeled: dataset {roles['unlabeled']} has no images yet")
        teacher = None
        if body.type == "pipeline" and body.teacher.model is not None:
            teacher = _model(session, "teacher.model", body.teacher.model)
        elif body.type == "distill":
            teacher = _model(session, "teacher", body.teacher)
        model = _model(session, "model", body.model) if body.type == "evaluate" else None
        teacher_key, model_key = (None if m is None else m.key for m in (teacher, model))
        teacher_id = None if teacher is None else teacher.id
    sizes = jobs.shard_sizes(count, shard_size)

    def make_spec(session: Session, job_id: int) -> dict[str, Any]:
        data = _inputs(session, runtime, job_id, roles)
        spec: dict[str, Any] = {"datasets": roles, "model_name": getattr(body, "model_name", None)}
        if teacher_id is not None:
            spec["parent_model_id"] = teacher_id
        if body.type in ("pipeline", "distill"):
            spec["config"] = _pipeline_config(body, data, teacher_key).model_dump(mode="json")
        elif body.type == "train":
            spec["train"] = {
                "out": f"jobs/{job_id}/model", "labeled": data["labeled"],
                "labeled_images": data["labeled_images"], "config": body.recipe, "init": body.init,
                "iterations": body.iterations, "seed": body.seed,
            }  # fmt: skip
        else:
            spec["evaluate"] = {
                "model": model_key, "truth": data["test"], "images": data["test_images"],
                "out": f"jobs/{job_id}/metrics.json",
            }  # fmt: skip
        return spec

    if body.type == "pipeline":
        probe = _pipeline_config(body, _placeholder_data(roles), teacher_key)
        units = jobs.pipeline_units(probe, sizes)
    elif body.type == "distill":
        units = jobs.distill_units(sizes)
    else:
        units = jobs.single_unit(body.type)
    return jobs.submit(
        runtime.sessions, type=body.type, units=units, make_spec=make_spec, enqueue=runtime.enqueue,
        created_by=created_by,
    )  # fmt: skip


def _placeholder_data(roles: dict[str, int]) -> dict[str, Any]:
    """A ``data`` section with the roles present (the plan only asks which there are)."""
    data = {"labeled": "l", "labeled_images": "l", "unlabeled": "u", "unlabeled_images": "u"}
    if "eval" in roles:
        data |= {"test": "t", "test_images": "t"}
    return data


def _pipeline_config(body: Any, data: dict[str, Any], teacher_key: str | None) -> PipelineConfig:
    if body.type == "distill":
        sections = {"teacher": {"model": teacher_key}}
    else:
        teacher = body.teacher.model_dump(exclude={"model"}) | {"model": teacher_key}
        sections = {
            "teacher": teacher,
            "student": body.student.model_dump(mode="json"),
            "evaluation": body.evaluation.model_dump(mode="json"),
            "rounds": body.rounds,
            "seed": body.seed,
        }
    return PipelineConfig.model_validate(
        {
            "data": data,
            "inference": body.inference.model_dump(mode="json"),
            "calibration": body.calibration.model_dump(mode="json"),
            **sections,
        }
    )
