"""The dashboard's catalogue pages: datasets (statistics, images with their ground truth drawn), models
(versions, lineage, metrics history, promote / roll back after a confirmation) and schedules (a form that
validates the cron and shows the next runs, pause / resume, the history of runs and decisions).

Like :mod:`service.ui.jobs`, they read and act through the ``/v1`` route functions, in process."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select

from distill.errors import InputError
from service import schedules as schedule_core
from service.api import datasets as datasets_api
from service.api import models as models_api
from service.api import schedules as schedules_api
from service.api.deps import RuntimeDep
from service.db import reading, transaction
from service.models import Dataset, Model
from service.ui import plots
from service.ui.deps import ViewerDep, check_form, render
from service.ui.jobs import _choices, _known, _messages, _png, image_png
from service.ui.labels import PAGE_SIZE, SORTS, LabelSet, label_set, read_json

router = APIRouter(prefix="/ui", include_in_schema=False)
SAMPLES = 8  # images on a dataset's page


# --- datasets ---------------------------------------------------------------------------------------------


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        found = datasets_api.list_datasets(session, name=None, kind=None, offset=0, limit=500)
    return render(request, "datasets.html", viewer, datasets=found.data, count=found.count)


def _dataset_labels(runtime, dataset_id: int) -> tuple[Any, LabelSet]:
    """A dataset and its images with their ground truth (none for an unlabeled dataset)."""
    with reading(runtime.sessions) as session:
        public = datasets_api.get_dataset(dataset_id, session)
        row = session.get(Dataset, dataset_id)
        annotations_key = row.annotations_key
        images = [{"id": im.id, "file_name": im.name, "width": im.width, "height": im.height}
                  for im in row.images]  # fmt: skip
    images_dir = f"datasets/{dataset_id}/images"
    coco = read_json(runtime.storage, annotations_key) if annotations_key else None
    if coco is None:
        return public, label_set({"images": images}, images_dir)
    return public, label_set(coco, images_dir)


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    dataset_id: int,
    request: Request,
    viewer: ViewerDep,
    runtime: RuntimeDep,
    sort: str = "name",
    category: int | None = None,
    page: int = Query(1, ge=1, le=1_000_000),
) -> HTMLResponse:
    dataset, labels = _dataset_labels(runtime, dataset_id)
    _known(sort, SORTS, "sort")
    images, pages = labels.page(sort=sort, category=category, number=page)
    return render(
        request, "dataset.html", viewer, dataset=dataset, labels=labels, images=images, pages=pages,
        page=page, sort=sort, sorts=SORTS, category=category, base=f"/ui/datasets/{dataset_id}/images",
        hidden={}, size=PAGE_SIZE, samples=SAMPLES,
    )  # fmt: skip


@router.get("/datasets/{dataset_id}/images/{image_id}.png")
def dataset_image(
    dataset_id: int, image_id: int, viewer: ViewerDep, runtime: RuntimeDep,
    max: int = Query(1024, ge=16, le=4096),
) -> Response:  # fmt: skip
    _, labels = _dataset_labels(runtime, dataset_id)
    return image_png(labels, image_id, runtime, max)


@router.get("/datasets/{dataset_id}/images/{image_id}", response_class=HTMLResponse)
def dataset_one(
    dataset_id: int, image_id: int, request: Request, viewer: ViewerDep, runtime: RuntimeDep
) -> HTMLResponse:
    dataset, labels = _dataset_labels(runtime, dataset_id)
    image = labels.image(image_id)
    if image is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} has no image {image_id}")
    return render(
        request, "image.html", viewer, image=image, labels=labels,
        src=f"/ui/datasets/{dataset_id}/images/{image_id}.png",
        back=(f"/ui/datasets/{dataset_id}", f"dataset {dataset.name}"),
        annotations=labels.by_image.get(image_id, []),
    )  # fmt: skip


# --- models -----------------------------------------------------------------------------------------------


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"bbox/AP": 0.31, ...}`` of a model's metrics on its most recent eval dataset."""
    if not metrics:
        return {}
    latest = metrics[sorted(metrics)[-1]]
    out = {}
    for iou_type, values in (latest or {}).items():
        if isinstance(values, dict) and isinstance(values.get("AP"), int | float):
            out[f"{iou_type}/AP"] = float(values["AP"])
    return out


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        rows = session.scalars(select(Model).order_by(Model.name, Model.version.desc())).all()
        groups: dict[str, dict[str, Any]] = {}
        for row in rows:
            public = models_api._public(session, row)
            group = groups.setdefault(row.name, {"versions": [], "promoted": None})
            group["versions"].append({"model": public, "headline": _headline(public.metrics)})
            if public.promoted:
                group["promoted"] = public.version
        for name, group in groups.items():
            history = models_api.list_promotions(name, session).history
            group["history"] = history
            group["can_roll_back"] = any(h.action == "promote" and not h.undone for h in history)
    return render(request, "models.html", viewer, groups=groups)


@router.get("/models/{name}/history.png")
def model_history(name: str, viewer: ViewerDep, runtime: RuntimeDep) -> Response:
    """AP of each version of ``name`` (its latest eval), oldest first."""
    with reading(runtime.sessions) as session:
        rows = session.scalars(select(Model).where(Model.name == name).order_by(Model.version)).all()
        points = [(f"v{m.version}", _headline(m.metrics or {})) for m in rows]
    names = sorted({metric for _, values in points for metric in values})
    return _png(plots.metrics_history(points, names))


def _confirm(request, viewer, *, title: str, message: str, action: str, fields: dict[str, Any], back: str):
    return render(request, "confirm.html", viewer, title=title, message=message, action=action, fields=fields,
                  back=back)  # fmt: skip


@router.get("/models/{name}/promote", response_class=HTMLResponse)
def promote_page(name: str, request: Request, viewer: ViewerDep, runtime: RuntimeDep,
                 version: int = Query(ge=1, le=2**31 - 1)) -> HTMLResponse:  # fmt: skip
    with reading(runtime.sessions) as session:
        current = models_api.list_promotions(name, session).promoted
    now = f"v{current.version}" if current else "none"
    return _confirm(
        request, viewer, title=f"Promote {name} v{version}?", action=f"/ui/models/{name}/promote",
        message=f"Jobs and schedules that name {name} will use v{version} from now on (promoted now: {now}).",
        fields={"version": version}, back="/ui/models",
    )  # fmt: skip


@router.get("/models/{name}/rollback", response_class=HTMLResponse)
def rollback_page(name: str, request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        current = models_api.list_promotions(name, session).promoted
    now = f"v{current.version}" if current else "none"
    return _confirm(
        request, viewer, title=f"Roll back {name}?", action=f"/ui/models/{name}/rollback",
        message=f"This undoes the promotion of {now}: the version promoted before it is promoted again.",
        fields={}, back="/ui/models",
    )  # fmt: skip


@router.post("/models/{name}/promote")
def promote(
    name: str, viewer: ViewerDep, runtime: RuntimeDep, version: Annotated[int, Form(ge=1, le=2**31 - 1)],
    csrf: Annotated[str, Form()] = "", reason: Annotated[str, Form(max_length=2000)] = "",
) -> Response:  # fmt: skip
    token = check_form(viewer, csrf)
    body = models_api.PromoteIn(version=version, reason=reason or "promoted from the dashboard")
    with transaction(runtime.sessions) as session:
        models_api.promote_model(name, body, session, token)
    return RedirectResponse("/ui/models", status.HTTP_303_SEE_OTHER)


@router.post("/models/{name}/rollback")
def roll_back(
    name: str, viewer: ViewerDep, runtime: RuntimeDep, csrf: Annotated[str, Form()] = "",
    reason: Annotated[str, Form(max_length=2000)] = "",
) -> Response:  # fmt: skip
    token = check_form(viewer, csrf)
    body = models_api.RollbackIn(reason=reason or "rolled back from the dashboard")
    with transaction(runtime.sessions) as session:
        models_api.rollback_model(name, body, session, token)
    return RedirectResponse("/ui/models", status.HTTP_303_SEE_OTHER)


# --- schedules --------------------------------------------------------------------------------------------


def _schedule_form(session, viewer, form: dict[str, str], errors: list[str]) -> dict[str, Any]:
    return {"form": form, "errors": errors, **_choices(session)}


@router.get("/schedules", response_class=HTMLResponse)
def schedules_page(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        found = schedules_api.list_schedules(session, offset=0, limit=500)
        form = _schedule_form(session, viewer, {"timezone": "UTC", "min_gain": "0"}, [])
    return render(request, "schedules.html", viewer, schedules=found.data, **form)


def _schedule_body(form: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {key: form.get(key, "").strip() for key in ("name", "cron", "timezone", "model")}
    for key in ("labeled", "unlabeled", "eval", "min_new_images"):
        text = form.get(key, "").strip()
        if text:
            if not text.isdigit():
                raise ValueError(f"{key}: {text!r} is not a whole number")
            body[key] = int(text)
    promotion: dict[str, Any] = {"metric": form.get("metric", "").strip() or "bbox/AP"}
    if form.get("min_gain", "").strip():
        try:
            promotion["min_gain"] = float(form["min_gain"])
        except ValueError:
            raise ValueError(f"min_gain: {form['min_gain']!r} is not a number") from None
    body["promotion"] = promotion
    if form.get("student_iterations", "").strip():
        body["pipeline"] = {"student": {"iterations": form["student_iterations"].strip()}}
    if form.get("views", "").strip():
        body.setdefault("pipeline", {})["inference"] = {"views": form["views"].strip()}
    return body


@router.post("/schedules", response_class=HTMLResponse)
async def create_schedule(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> Response:
    form = {k: str(v) for k, v in (await request.form()).items()}
    token = check_form(viewer, form.get("csrf"))
    errors: list[str] = []
    try:  # a refused schedule rolls back with the exception
        with transaction(runtime.sessions) as session:
            body = schedules_api.ScheduleCreate.model_validate(_schedule_body(form))
            created = schedules_api.create_schedule(body, session, token)
    except ValueError as exc:  # ValidationError included
        errors = _messages(exc)
    except HTTPException as exc:
        errors = [str(exc.detail)]
    if errors:
        with transaction(runtime.sessions) as session:
            found = schedules_api.list_schedules(session, offset=0, limit=500)
            context = _schedule_form(session, viewer, form, errors)
        return render(request, "schedules.html", viewer, 422, schedules=found.data, **context)
    return RedirectResponse(f"/ui/schedules/{created.id}", status.HTTP_303_SEE_OTHER)


@router.get("/schedules/preview", response_class=HTMLResponse)
def schedule_preview(
    request: Request, viewer: ViewerDep, cron: str = "", timezone: str = "UTC"
) -> HTMLResponse:
    """The next run times of a cron in a zone, or why it is not valid: what the form shows as you type."""
    runs: list[dt.datetime] = []
    error = None
    try:
        runs = schedule_core.next_runs(cron.strip(), timezone.strip() or "UTC", dt.datetime.now(dt.UTC))
    except (InputError, ValidationError, ValueError) as exc:
        error = str(exc)
    return render(request, "_next_runs.html", viewer, runs=[r.isoformat() for r in runs], error=error)


@router.get("/schedules/{schedule_id}", response_class=HTMLResponse)
def schedule_page(schedule_id: int, request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        schedule = schedules_api.get_schedule(schedule_id, session)
        runs = schedules_api.list_schedule_runs(schedule_id, session, offset=0, limit=100)
    return render(request, "schedule.html", viewer, schedule=schedule, runs=runs.data, count=runs.count)


@router.post("/schedules/{schedule_id}/pause")
def pause(schedule_id: int, viewer: ViewerDep, runtime: RuntimeDep, csrf: Annotated[str, Form()] = "",
          paused: Annotated[bool, Form()] = True) -> Response:  # fmt: skip
    token = check_form(viewer, csrf)
    with transaction(runtime.sessions) as session:
        schedules_api.update_schedule(
            schedule_id, schedules_api.ScheduleUpdate(paused=paused), session, token
        )
    return RedirectResponse(f"/ui/schedules/{schedule_id}", status.HTTP_303_SEE_OTHER)
