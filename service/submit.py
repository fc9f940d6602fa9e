"""From a validated job request to a queued job: resolve dataset and model ids, snapshot the datasets
under ``jobs/ID/inputs/`` (a running job never sees later uploads), build the job's spec and plan
(:mod:`service.jobs`). Every problem a client can cause is an :class:`~distill.errors.InputError` naming
the field, raised before anything is committed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from distill.errors import InputError
from distill.pipeline import PipelineConfig
from service import jobs
from service.datasets import snapshot_inputs
from service.models import Dataset, Image
from service.registry import resolve_model
from service.runtime import Runtime

# the dataset kinds each role takes (an eval split may be any annotated set)
ROLE_KINDS = {"labeled": ("labeled",), "unlabeled": ("unlabeled",), "eval": ("eval", "labeled")}


def check_dataset(session: Session, field: str, dataset_id: int) -> Dataset:
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


def _image_count(session: Session, dataset: Dataset) -> int:
    return int(session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0)


def content_digest(session: Session, dataset_id: int) -> dict[str, Any]:
    """What a dataset holds now: its image count and one sha256 over its images' sha256 in upload order (the
    content a job snapshots; equal digests, equal images)."""
    hashes = session.scalars(select(Image.sha256).where(Image.dataset_id == dataset_id).order_by(Image.id))
    digest, count = hashlib.sha256(), 0
    for sha in hashes:
        digest.update(sha.encode())
        count += 1
    return {"id": dataset_id, "images": count, "sha256": digest.hexdigest()}


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


def submit_job(
    runtime: Runtime,
    body: Any,
    *,
    created_by: int | None = None,
    on_create: Callable[[Session, int, dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """Queue the job ``body`` asks for (a ``JobCreate`` of :mod:`service.job_requests`); returns its id.

    A model named by name is its promoted version now; ``spec["models"]`` records what each model field
    resolved to. ``on_create(session, job_id, models)`` runs first in the transaction that creates the job (a
    schedule's run row: its unique slot then decides whether the job exists at all); what it returns is
    merged into the job's spec."""
    settings = runtime.settings
    shard_size = getattr(body, "shard_size", None) or settings.shard_size
    with runtime.sessions() as session:  # validation only: ids, kinds, sizes (no lock held)
        roles = {r: getattr(body, r) for r in ("labeled", "unlabeled", "eval") if getattr(body, r, None)}
        datasets = {role: check_dataset(session, role, i) for role, i in roles.items()}
        count = _image_count(session, datasets["unlabeled"]) if "unlabeled" in datasets else 0
        if "unlabeled" in datasets and count == 0:
            raise InputError(f"unlabeled: dataset {roles['unlabeled']} has no images yet")
        refs = {"teacher.model": getattr(body.teacher, "model", None)} if body.type == "pipeline" else {}
        refs |= {"teacher": body.teacher} if body.type == "distill" else {}
        refs |= {"model": body.model} if body.type == "evaluate" else {}
        resolved = {f: resolve_model(session, f, ref) for f, ref in refs.items() if ref is not None}
        teacher = next((m for f, (m, _) in resolved.items() if f.startswith("teacher")), None)
        model = resolved["model"][0] if "model" in resolved else None
        teacher_key, model_key = (None if m is None else m.key for m in (teacher, model))
        teacher_id = None if teacher is None else teacher.id
        models = {f.partition(".")[0]: how for f, (_, how) in resolved.items()}
    sizes = jobs.shard_sizes(count, shard_size)

    def make_spec(session: Session, job_id: int) -> dict[str, Any]:
        extra = {} if on_create is None else on_create(session, job_id, models)
        data = _inputs(session, runtime, job_id, roles)
        spec: dict[str, Any] = {"datasets": roles, "model_name": getattr(body, "model_name", None)}
        spec |= {"models": models, **extra}
        spec["inputs"] = {role: content_digest(session, i) for role, i in roles.items()}
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
