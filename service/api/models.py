"""``/v1/models``: register a model (an archive of a distill model directory, or a detectron2 config +
weights), list and read the registry with each model's lineage, download a model's files. The work is
:mod:`service.model_upload`'s; this module maps it to HTTP.

Routes are plain ``def``: FastAPI runs them in its thread pool, so unpacking, hashing and loading an upload
never blocks the event loop. Upload parts are Starlette ``UploadFile`` s (spooled to a temporary file past
1 MiB) and are read in chunks, never whole; no database transaction is open while they are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, UploadFile, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.background import BackgroundTask

from service import model_upload
from service.api.deps import (
    Read,
    RuntimeDep,
    SessionDep,
    Write,
    WriteToken,
    get_or_404,
    http_errors,
    page,
)
from service.datasets import NAME_PATTERN
from service.models import Model, Promotion, aware
from service.registry import lineage, promote, promoted_model, promotions, rollback

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelUpload(BaseModel):
    """``name`` and either ``archive``, or ``config`` + ``weights`` (+ ``categories``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="letters, digits, '.', '_', '-'; an existing name gets its next version",
    )
    archive: UploadFile | None = Field(
        None,
        description="a .zip / .tar / .tar.gz / .tgz of a distill model directory: config.yaml, weights.pt, "
        "meta.json (+ detectron2.yaml), at the top or inside one folder",
    )
    config: UploadFile | None = Field(None, description="a detectron2 .yaml config (with weights)")
    weights: UploadFile | None = Field(None, description="detectron2 weights: model_final.pth or a .pkl")
    categories: UploadFile | None = Field(
        None, description="a COCO json whose categories are the label space (default: the config's dataset)"
    )


class LineageEntry(BaseModel):
    id: int
    name: str
    version: int
    role: str


class ModelPublic(BaseModel):
    id: int
    name: str
    version: int
    key: str = Field(description="storage key of the model directory")
    backend: str
    source: str = Field(description="upload | job")
    role: str = Field(description="imported | teacher | student | trained")
    job_id: int | None
    parent_id: int | None
    datasets: dict[str, Any]
    metrics: dict[str, Any]
    info: dict[str, Any]
    created_at: str
    lineage: list[LineageEntry] = Field(description="the chain of parents, the parent first, up to the root")
    promoted: bool = Field(description="the promoted version of its name (what jobs naming it use)")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


def _public(session, model: Model) -> ModelPublic:
    chain = [
        LineageEntry(id=m.id, name=m.name, version=m.version, role=m.role) for m in lineage(session, model)
    ]
    return ModelPublic(
        id=model.id, name=model.name, version=model.version, key=model.key, backend=model.backend,
        source=model.source, role=model.role, job_id=model.job_id, parent_id=model.parent_id,
        datasets=dict(model.datasets or {}), metrics=dict(model.metrics or {}), info=dict(model.info or {}),
        created_at=aware(model.created_at).isoformat(), lineage=chain,
        promoted=getattr(promoted_model(session, model.name), "id", None) == model.id,
    )  # fmt: skip


def _model(session, model_id: int) -> Model:
    return get_or_404(session, Model, model_id, "model")


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


@router.post("", status_code=status.HTTP_201_CREATED, operation_id="create_model", dependencies=[Write])
def create_model(form: Annotated[ModelUpload, Form()], runtime: RuntimeDep) -> ModelPublic:
    """Register a model as the next version of ``name``: unpacked into staging, checked to load on the CPU
    (weights read with ``weights_only``: a pickle that would run code is refused), then published. 422
    naming the member, field or file that fails; nothing is stored then."""
    detectron2 = {"config": form.config, "weights": form.weights, "categories": form.categories}
    given = [field for field, part in detectron2.items() if part is not None]
    if form.archive is not None and given:
        raise _unprocessable(
            f"{', '.join(given)}: give either archive (a distill model directory) or config + weights "
            "(detectron2), not both"
        )
    if form.archive is None and (form.config is None or form.weights is None):
        missing = " and ".join(f for f in ("config", "weights") if f not in given) if given else "archive"
        raise _unprocessable(
            f"{missing}: give an archive of a distill model directory, or a detectron2 config + weights"
        )

    def upload() -> Model:
        sessions, storage = runtime.sessions, runtime.storage
        if form.archive is not None:
            archive = form.archive
            return model_upload.upload_archive(
                sessions, storage, name=form.name, filename=archive.filename, source=archive.file
            )
        config, weights, categories = form.config, form.weights, form.categories
        assert config is not None and weights is not None
        return model_upload.upload_detectron2(
            sessions, storage, name=form.name, config=(config.filename, config.file),
            weights=(weights.filename, weights.file),
            categories=None if categories is None else (categories.filename, categories.file),
        )  # fmt: skip

    model = http_errors(upload)
    with runtime.sessions() as session:
        return _public(session, _model(session, model.id))


@router.get("", operation_id="list_models", dependencies=[Read])
def list_models(
    session: SessionDep,
    name: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> ModelsPublic:
    """Registered models, the newest first; ``name``: only that name's versions."""
    query = select(Model)
    if name is not None:
        query = query.where(Model.name == name)
    rows, count = page(session, query, Model.id.desc(), offset, limit)
    return ModelsPublic(data=[_public(session, m) for m in rows], count=count)


@router.get("/{model_id}", operation_id="get_model", dependencies=[Read])
def get_model(model_id: int, session: SessionDep) -> ModelPublic:
    return _public(session, _model(session, model_id))


@router.get("/{model_id}/download", operation_id="download_model", dependencies=[Read])
def download_model(model_id: int, session: SessionDep, runtime: RuntimeDep) -> FileResponse:
    """A ``.tar.gz`` of the model's loading files in one folder ``{name}-v{version}`` (what
    ``POST /v1/models`` takes as ``archive``)."""
    model = _model(session, model_id)
    path = http_errors(lambda: model_upload.write_model_archive(runtime.storage, model))
    return FileResponse(
        path, media_type="application/gzip", filename=f"{model.name}-v{model.version}.tar.gz",
        background=BackgroundTask(Path(path).unlink, missing_ok=True),
    )  # fmt: skip


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1, description="the version of the name to promote")
    reason: str = Field("", max_length=2000, description="why (kept in the history)")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)


class PromotionPublic(BaseModel):
    id: int
    name: str
    action: str = Field(description="promote | rollback")
    model: LineageEntry = Field(description="the version promoted by this action")
    previous: LineageEntry | None = Field(description="the version promoted before it")
    reason: str
    created_by: int | None = Field(description="the id of the API token that did it (None: a schedule)")
    job_id: int | None = Field(description="the job whose promotion gate did it")
    undone: bool = Field(description="a later rollback undid this promotion")
    created_at: str


class PromotionsPublic(BaseModel):
    name: str
    promoted: ModelPublic | None
    history: list[PromotionPublic] = Field(description="the newest first")


def _entry(session, model_id: int | None) -> LineageEntry | None:
    model = None if model_id is None else session.get(Model, model_id)
    if model is None:
        return None
    return LineageEntry(id=model.id, name=model.name, version=model.version, role=model.role)


def _promotion_public(session, row: Promotion) -> PromotionPublic:
    model = _entry(session, row.model_id)
    assert model is not None
    return PromotionPublic(
        id=row.id, name=row.name, action=row.action, model=model, previous=_entry(session, row.previous_id),
        reason=row.reason, created_by=row.created_by, job_id=row.job_id, undone=row.undone,
        created_at=aware(row.created_at).isoformat(),
    )  # fmt: skip


def _name_exists(session, name: str) -> None:
    if session.scalar(select(Model.id).where(Model.name == name).limit(1)) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model is registered as {name!r}")


@router.get("/{name}/promotions", operation_id="list_promotions", dependencies=[Read])
def list_promotions(name: str, session: SessionDep) -> PromotionsPublic:
    """The promoted version of ``name`` and every promotion and rollback, with who and why."""
    _name_exists(session, name)
    current = promoted_model(session, name)
    return PromotionsPublic(
        name=name,
        promoted=None if current is None else _public(session, current),
        history=[_promotion_public(session, row) for row in promotions(session, name)],
    )


@router.post("/{name}/promote", operation_id="promote_model")
def promote_model(name: str, body: PromoteIn, session: SessionDep, token: WriteToken) -> PromotionPublic:
    """Make ``version`` the promoted version of ``name``: jobs and schedules naming the model use it from
    now on. 409 when it already is."""
    _name_exists(session, name)
    model = session.scalar(select(Model).where(Model.name == name, Model.version == body.version))
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{name} has no version {body.version}")
    row = http_errors(lambda: promote(session, model, reason=body.reason, created_by=token.id))
    return _promotion_public(session, row)


@router.post("/{name}/rollback", operation_id="rollback_model")
def rollback_model(name: str, body: RollbackIn, session: SessionDep, token: WriteToken) -> PromotionPublic:
    """Promote again the version that was promoted before the current one (undoing the latest promotion);
    rolling back twice goes two promotions back. 409 when there is none."""
    _name_exists(session, name)
    row = http_errors(lambda: rollback(session, name, reason=body.reason, created_by=token.id))
    return _promotion_public(session, row)
