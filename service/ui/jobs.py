"""The dashboard's job pages: the live jobs table, a new pipeline job form, a job's detail (stages, progress,
activity, warnings, calibration and quality plots, the teacher-vs-student table and decision, artifacts,
cancel / retry) and its pseudo-label browser.

Pages read through the same functions as ``/v1/jobs`` (called in process), so what the dashboard shows is
what the API answers; state changes go through them too, after the form's checks."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select

from service.api import routes as jobs_api
from service.api.deps import RuntimeDep
from service.db import reading, transaction
from service.job_requests import JobCreate, merge_patch
from service.models import ApiToken, Dataset, Job, Model
from service.ui import draw, plots
from service.ui.deps import ViewerDep, check_form, render
from service.ui.labels import PAGE_SIZE, SORTS, LabelSet, pseudo_labels, read_json

router = APIRouter(prefix="/ui/jobs", include_in_schema=False)
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TYPES = ("pipeline", "distill", "train", "evaluate")
ACTIVITY = 12  # recent unit events on a job's page
_job_request = TypeAdapter(JobCreate)


def _token_names(session, ids: set[int]) -> dict[int, str]:
    rows = (
        session.execute(select(ApiToken.id, ApiToken.name).where(ApiToken.id.in_(ids))).all() if ids else []
    )
    return {i: (name or f"token {i}") for i, name in rows}


def _overall(job: jobs_api.JobPublic) -> float:
    """The job's progress over all its stages, 0..100 (a succeeded job is 100)."""
    if job.state == "succeeded":
        return 100.0
    stages = job.stages
    if not stages:
        return 0.0
    done = sum(s.state == "done" for s in stages)
    current = next((s for s in stages if s.state != "done"), None)
    part = 0.0
    if current is not None and current.progress["total"]:
        part = current.progress["done"] / current.progress["total"]
    return round(100.0 * (done + part) / len(stages), 1)


def _duration(job: jobs_api.JobPublic) -> float | None:
    """Seconds since the job started (until it finished); None before it starts."""
    if not job.started_at:
        return None
    end = _moment(job.finished_at) if job.finished_at else datetime.now(UTC)
    return (end - _moment(job.started_at)).total_seconds()


def _moment(iso: str) -> datetime:
    moment = datetime.fromisoformat(iso)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite keeps no zone


def _rows(session, state: str | None, type_: str | None, limit: int = 100) -> dict[str, Any]:
    jobs = jobs_api.list_jobs(session, state=state or None, type=type_ or None, offset=0, limit=limit)
    rows = session.scalars(select(Job).where(Job.id.in_([j.id for j in jobs.data]))).all()
    created_by = {row.id: row.created_by for row in rows}
    names = _token_names(session, {t for t in created_by.values() if t is not None})
    out = []
    for job in jobs.data:
        who = f"schedule {job.schedule.get('name', job.schedule.get('id', ''))}" if job.schedule else None
        token = created_by.get(job.id)
        out.append({"job": job, "overall": _overall(job), "by": who or names.get(token, "—"),
                    "duration": _duration(job)})  # fmt: skip
    return {"rows": out, "count": jobs.count}


@router.get("", response_class=HTMLResponse)
def jobs_page(
    request: Request, viewer: ViewerDep, runtime: RuntimeDep, state: str = "", type: str = ""
) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        table = _rows(session, _known(state, STATES, "state"), _known(type, TYPES, "type"))
    return render(request, "jobs.html", viewer, state=state, type=type, states=STATES, types=TYPES, **table)


@router.get("/rows", response_class=HTMLResponse)
def jobs_rows(
    request: Request, viewer: ViewerDep, runtime: RuntimeDep, state: str = "", type: str = ""
) -> HTMLResponse:
    """The table's body alone: what the jobs page polls."""
    with reading(runtime.sessions) as session:
        table = _rows(session, _known(state, STATES, "state"), _known(type, TYPES, "type"))
    return render(request, "_job_rows.html", viewer, **table)


def _known(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value and value not in allowed:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{what}: {value!r} is not one of "
                            f"{', '.join(allowed)}")  # fmt: skip
    return value


def _choices(session) -> dict[str, Any]:
    datasets = session.scalars(select(Dataset).order_by(Dataset.id)).all()
    models = session.scalars(select(Model).order_by(Model.name, Model.version)).all()
    return {
        "datasets": {
            kind: [d for d in datasets if d.kind == kind] for kind in ("labeled", "unlabeled", "eval")
        },
        "model_names": sorted({m.name for m in models}),
        "models": models,
    }


@router.get("/new", response_class=HTMLResponse)
def new_job_page(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    with reading(runtime.sessions) as session:
        choices = _choices(session)
    return render(request, "job_new.html", viewer, form={}, errors=[], **choices)


def _pipeline_body(form: dict[str, str]) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body a new-job form asks for (ValueError naming the field otherwise)."""

    def number(field: str) -> int | None:
        text = form.get(field, "").strip()
        if not text:
            return None
        if not re.fullmatch(r"\d{1,12}", text):
            raise ValueError(f"{field}: {text!r} is not a whole number")
        return int(text)

    body: dict[str, Any] = {
        "type": "pipeline",
        "labeled": number("labeled"),
        "unlabeled": number("unlabeled"),
    }
    if number("eval") is not None:
        body["eval"] = number("eval")
    teacher = form.get("teacher", "").strip()
    body["teacher"] = {"model": int(teacher) if teacher.isdigit() else teacher} if teacher else {}
    if number("teacher_iterations") is not None:
        body["teacher"]["iterations"] = number("teacher_iterations")
    if form.get("views", "").strip():
        body["inference"] = {"views": form["views"].strip()}
    if number("student_iterations") is not None:
        body["student"] = {"iterations": number("student_iterations")}
    if number("rounds") is not None:
        body["rounds"] = number("rounds")
    if form.get("model_name", "").strip():
        body["model_name"] = form["model_name"].strip()
    extra = form.get("settings", "").strip()
    if extra:
        try:
            settings = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"more settings: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        if not isinstance(settings, dict):
            raise ValueError(
                'more settings: a JSON object is expected, e.g. {"inference": {"batch_size": 4}}'
            )
        body = merge_patch(body, settings)
    for field in ("labeled", "unlabeled"):
        if body.get(field) is None:
            raise ValueError(f"{field}: choose a dataset")
    return body


@router.post("/new", response_class=HTMLResponse)
async def create_job(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> Response:
    form = {k: str(v) for k, v in (await request.form()).items()}
    token = check_form(viewer, form.get("csrf"))
    errors: list[str] = []
    try:
        body = _job_request.validate_python(_pipeline_body(form))
        answer = jobs_api.create_job(body, runtime, token)
    except ValueError as exc:  # a field the form could not read, or one the request model refuses
        errors = _messages(exc)
    except HTTPException as exc:
        errors = [str(exc.detail)]
    if errors:
        with transaction(runtime.sessions) as session:
            choices = _choices(session)
        return render(request, "job_new.html", viewer, 422, form=form, errors=errors, **choices)
    return RedirectResponse(f"/ui/jobs/{answer['id']}", status.HTTP_303_SEE_OTHER)


def _messages(exc: ValueError) -> list[str]:
    if isinstance(exc, ValidationError):
        return [f"{'.'.join(str(p) for p in e['loc'] if not str(p).startswith('function'))}: {e['msg']}"
                for e in exc.errors()]  # fmt: skip
    return [str(exc)]


def _activity(job: Job) -> list[dict[str, Any]]:
    """The job's latest unit events (claimed, finished, failed), the newest first."""
    events = []
    for unit in job.shards:
        name = (
            unit.stage
            if len([u for u in job.shards if u.stage == unit.stage]) == 1
            else f"{unit.stage} #{unit.index}"
        )
        if unit.claimed_at is not None:
            events.append({"at": unit.claimed_at, "unit": name, "what": f"started (attempt {unit.attempts})"})
        if unit.finished_at is not None:
            what = "failed: " + (unit.error or "") if unit.state == "failed" else f"{unit.state}"
            events.append({"at": unit.finished_at, "unit": name, "what": what})
        elif unit.error:
            events.append({"at": unit.heartbeat_at or unit.claimed_at or 0, "unit": name,
                           "what": f"attempt failed, retrying: {unit.error}"})  # fmt: skip
    return sorted(events, key=lambda e: -e["at"])[:ACTIVITY]


def _rounds(runtime, job: jobs_api.JobPublic, artifacts: set[str]) -> list[dict[str, Any]]:
    """Each round whose pseudo-labels or decision exist: its calibration summary and its decision."""
    out = []
    rounds = max([int(s.name.partition("@")[2] or 1) for s in job.stages] or [1])
    for k in range(1, rounds + 1):
        suffix = "" if k == 1 else f"@{k}"
        calibration = read_json(runtime.storage, f"jobs/{job.id}/round_{k}/pseudo.calibration.json")
        decision = job.metrics.get(f"decide{suffix}")
        if calibration is None and decision is None:
            continue
        out.append({
            "number": k, "calibration": calibration, "decision": decision,
            "plot": f"round_{k}/pseudo.calibration.png" in artifacts,
            "pseudo": f"round_{k}/pseudo.json" in artifacts,
            "table": _metric_table(decision), "verdict": _verdict(decision),
        })  # fmt: skip
    return out


def _metric_table(decision: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``[{metric, teacher, student, gain}]`` for every AP-like metric both were scored on."""
    metrics = (decision or {}).get("metrics") or {}
    teacher, student = metrics.get("teacher") or {}, metrics.get("student") or {}
    rows = []
    for iou_type in sorted(set(teacher) & set(student)):
        t, s = teacher[iou_type], student[iou_type]
        if not isinstance(t, dict) or not isinstance(s, dict):
            continue
        for name in ("AP", "AP50", "AP75"):
            if isinstance(t.get(name), int | float) and isinstance(s.get(name), int | float):
                rows.append({"metric": f"{iou_type}/{name}", "teacher": t[name], "student": s[name],
                             "gain": s[name] - t[name]})  # fmt: skip
    return rows


def _verdict(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """Whether the round's student was promoted, and why (the gate's reason, the health checks, or the
    primary metric)."""
    if decision is None:
        return None
    promotion = decision.get("promotion") or {}
    promoted = bool(promotion.get("promoted", decision.get("promoted")))
    if promotion.get("reason"):
        reason = promotion["reason"]
    elif decision.get("health"):
        reason = "failed the health checks: " + "; ".join(map(str, decision["health"]))
    elif decision.get("primary"):
        p = decision["primary"]
        word = "beat" if decision.get("promoted") else "did not beat"
        scores = f"{_ap(p.get('student'))} vs {_ap(p.get('teacher'))}"
        reason = f"the student {word} the teacher on {p.get('metric')}: {scores}"
    else:
        reason = "no eval dataset: the student is kept without a comparison"
    return {"promoted": promoted, "reason": reason}


def _ap(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _detail(runtime, job_id: int) -> dict[str, Any]:
    with reading(runtime.sessions) as session:
        job = jobs_api.get_job(job_id, session)
        row = session.get(Job, job_id)
        activity = _activity(row)
        artifacts = jobs_api.list_artifacts(job_id, session, runtime)
        names = _token_names(session, {row.created_by} if row.created_by is not None else set())
        by = f"schedule {job.schedule.get('name', '')}" if job.schedule else names.get(row.created_by, "—")
    health = [h for s, m in job.metrics.items() if s.startswith("decide") for h in (m.get("health") or [])]
    return {
        "job": job, "overall": _overall(job), "activity": activity, "artifacts": artifacts, "by": by,
        "duration": _duration(job), "health": health, "finished": job.state in STATES[2:],
        "rounds": _rounds(runtime, job, {a["name"] for a in artifacts}),
    }  # fmt: skip


@router.get("/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    return render(request, "job.html", viewer, **_detail(runtime, job_id))


@router.get("/{job_id}/live", response_class=HTMLResponse)
def job_live(job_id: int, request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> HTMLResponse:
    """The changing part of a job's page: what it polls until the job has ended."""
    return render(request, "_job_live.html", viewer, **_detail(runtime, job_id))


@router.post("/{job_id}/cancel")
def cancel(
    job_id: int, viewer: ViewerDep, runtime: RuntimeDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    check_form(viewer, csrf)
    with transaction(runtime.sessions) as session:
        jobs_api.cancel_job(job_id, session)
    return RedirectResponse(f"/ui/jobs/{job_id}", status.HTTP_303_SEE_OTHER)


@router.post("/{job_id}/retry")
def retry(job_id: int, viewer: ViewerDep, runtime: RuntimeDep, csrf: Annotated[str, Form()] = "") -> Response:
    check_form(viewer, csrf)
    jobs_api.retry_job(job_id, runtime)
    return RedirectResponse(f"/ui/jobs/{job_id}", status.HTTP_303_SEE_OTHER)


@router.get("/{job_id}/files/{name:path}")
def artifact(job_id: int, name: str, viewer: ViewerDep, runtime: RuntimeDep) -> FileResponse:
    """A job's artifact (inline, so plots show in the page)."""
    with reading(runtime.sessions) as session:
        found = jobs_api.get_artifact(job_id, name, session, runtime)
    found.headers["content-disposition"] = found.headers["content-disposition"].replace(
        "attachment", "inline"
    )
    return found


def _png(content: bytes) -> Response:
    return Response(content, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def _category_names(labels: LabelSet | None) -> dict[int, str]:
    return {} if labels is None else {i: str(c.get("name", i)) for i, c in labels.categories.items()}


@router.get("/{job_id}/plots/{round_number}/{kind}.png")
def round_plot(job_id: int, round_number: int, kind: str, viewer: ViewerDep, runtime: RuntimeDep) -> Response:
    """A round's score histogram (``scores``), labeled-vs-pseudo class counts (``classes``) or view
    agreement of its pseudo-labels (``agreement``); an empty chart until the round has them."""
    if kind not in ("scores", "classes", "agreement"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no plot {kind!r}: scores, classes or agreement")
    with reading(runtime.sessions) as session:
        job = jobs_api.get_job(job_id, session)
        spec = dict(session.get(Job, job_id).spec or {})
    calibration = (
        read_json(runtime.storage, f"jobs/{job.id}/round_{round_number}/pseudo.calibration.json") or {}
    )
    labels = pseudo_labels(runtime.storage, job_id, spec, round_number)
    names = _category_names(labels)
    if kind == "scores":
        return _png(plots.score_histogram(calibration, names=names))
    if kind == "classes":
        return _png(plots.class_counts(calibration, names))
    agreements = [] if labels is None else [
        float(a["agreement"]) for anns in labels.by_image.values() for a in anns if "agreement" in a
    ]  # fmt: skip
    return _png(plots.agreement_histogram(agreements))


def _round_labels(runtime, job_id: int, round_number: int) -> tuple[jobs_api.JobPublic, LabelSet]:
    with reading(runtime.sessions) as session:
        job = jobs_api.get_job(job_id, session)
        spec = dict(session.get(Job, job_id).spec or {})
    labels = pseudo_labels(runtime.storage, job_id, spec, round_number)
    if labels is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"job {job_id} has no pseudo-labels for round {round_number} (yet)")  # fmt: skip
    return job, labels


@router.get("/{job_id}/pseudo", response_class=HTMLResponse)
def pseudo_browser(
    job_id: int,
    request: Request,
    viewer: ViewerDep,
    runtime: RuntimeDep,
    round: int = Query(1, ge=1, le=20),
    sort: str = "agreement",
    category: int | None = None,
    page: int = Query(1, ge=1, le=1_000_000),
) -> HTMLResponse:
    job, labels = _round_labels(runtime, job_id, round)
    _known(sort, SORTS, "sort")
    images, pages = labels.page(sort=sort, category=category, number=page)
    base = f"/ui/jobs/{job_id}/pseudo/{round}"
    return render(
        request, "browser.html", viewer, title=f"Job {job_id}: pseudo-labels of round {round}",
        back=(f"/ui/jobs/{job_id}", f"job {job_id}"), labels=labels, images=images, pages=pages, page=page,
        sort=sort, sorts=SORTS, category=category, base=base, hidden={"round": round},
        size=PAGE_SIZE, job=job,
    )  # fmt: skip


def image_png(labels: LabelSet, image_id: int, runtime, max_side: int) -> Response:
    """An image of ``labels`` with its labels drawn, at most ``max_side`` pixels on its longer side."""
    image = labels.image(image_id)
    key = None if image is None else labels.image_key(image)
    if image is None or key is None or not runtime.storage.exists(key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"image {image_id} is not stored (any more)")
    picture = draw.load_image(runtime.storage.local(key))
    return _png(draw.render_labels(picture, labels.by_image.get(image_id, []), labels.categories,
                                   max_side=max_side))  # fmt: skip


@router.get("/{job_id}/pseudo/{round_number}/{image_id}.png")
def pseudo_image(
    job_id: int, round_number: int, image_id: int, viewer: ViewerDep, runtime: RuntimeDep,
    max: int = Query(1024, ge=16, le=4096),
) -> Response:  # fmt: skip
    _, labels = _round_labels(runtime, job_id, round_number)
    return image_png(labels, image_id, runtime, max)


@router.get("/{job_id}/pseudo/{round_number}/{image_id}", response_class=HTMLResponse)
def pseudo_one(
    job_id: int, round_number: int, image_id: int, request: Request, viewer: ViewerDep, runtime: RuntimeDep
) -> HTMLResponse:
    _, labels = _round_labels(runtime, job_id, round_number)
    image = labels.image(image_id)
    if image is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"round {round_number} of job {job_id} has no image {image_id}"
        )
    base = f"/ui/jobs/{job_id}/pseudo/{round_number}"
    return render(
        request, "image.html", viewer, image=image, labels=labels, src=f"{base}/{image_id}.png",
        back=(f"/ui/jobs/{job_id}/pseudo?round={round_number}", "the pseudo-label browser"),
        annotations=labels.by_image.get(image_id, []),
    )  # fmt: skip
