"""``/v1/datasets``: create a dataset, upload its images (files or archives, streamed), put its COCO
annotations, list and read it, delete it. The work is :mod:`service.datasets`'; this module maps it to HTTP.

Routes are plain ``def``: FastAPI runs them in its thread pool, so streaming, hashing and decoding an upload
never blocks the event loop. Upload parts are Starlette ``UploadFile`` s (spooled to a temporary file past
1 MiB) and are read in chunks, never whole.
"""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, HTTPException, Query, Response, UploadFile, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from service import datasets
from service.api.deps import Read, RuntimeDep, SessionDep, Write, get_or_404, http_errors, page
from service.models import Dataset, Image, aware

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DatasetKind = Literal["labeled", "unlabeled", "eval"]


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=datasets.NAME_PATTERN, description="unique; letters, digits, '.', '_', '-'")
    kind: DatasetKind


class DatasetPublic(BaseModel):
    id: int
    name: str
    kind: str
    annotations: bool = Field(description="whether a COCO json was put")
    stats: dict[str, Any]
    created_at: str


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class ImagePublic(BaseModel):
    id: int
    name: str
    sha256: str
    width: int
    height: int
    size: int


class ImagesPublic(BaseModel):
    data: list[ImagePublic]
    count: int


class AcceptedImage(BaseModel):
    name: str = Field(description="the stored image's name (for a duplicate: the name it has already)")
    sha256: str
    duplicate: bool = Field(description="the content was in the dataset already: not stored again")
    uploaded_as: str = Field(description="the name it came under")
    part: str = Field(description="the uploaded file (image or archive) it came from")


class RejectedFile(BaseModel):
    name: str = Field(description="the file or archive member, as uploaded")
    reason: str
    part: str = Field(description="the uploaded file (image or archive) it came from")


class UploadPublic(BaseModel):
    accepted: list[AcceptedImage]
    rejected: list[RejectedFile]


def _public(dataset: Dataset) -> DatasetPublic:
    created = aware(dataset.created_at)
    return DatasetPublic(
        id=dataset.id, name=dataset.name, kind=dataset.kind, annotations=dataset.annotations_key is not None,
        stats=dict(dataset.stats or {}), created_at=created.isoformat(),
    )  # fmt: skip


def _dataset(session, dataset_id: int) -> Dataset:
    return get_or_404(session, Dataset, dataset_id, "dataset")


@router.post("", status_code=status.HTTP_201_CREATED, operation_id="create_dataset", dependencies=[Write])
def create_dataset(body: DatasetCreate, session: SessionDep, runtime: RuntimeDep) -> DatasetPublic:
    dataset = http_errors(
        lambda: datasets.create_dataset(session, runtime.storage, name=body.name, kind=body.kind)
    )
    return _public(dataset)


@router.get("", operation_id="list_datasets", dependencies=[Read])
def list_datasets(
    session: SessionDep,
    name: str | None = None,
    kind: DatasetKind | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> DatasetsPublic:
    """Datasets, the oldest first; ``name`` / ``kind`` filter."""
    query = select(Dataset)
    if name is not None:
        query = query.where(Dataset.name == name)
    if kind is not None:
        query = query.where(Dataset.kind == kind)
    rows, count = page(session, query, Dataset.id, offset, limit)
    return DatasetsPublic(data=[_public(d) for d in rows], count=count)


@router.get("/{dataset_id}", operation_id="get_dataset", dependencies=[Read])
def get_dataset(dataset_id: int, session: SessionDep) -> DatasetPublic:
    return _public(_dataset(session, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_dataset",
    dependencies=[Write],
)
def delete_dataset(dataset_id: int, runtime: RuntimeDep) -> Response:
    http_errors(lambda: datasets.delete_dataset(runtime.sessions, runtime.storage, dataset_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{dataset_id}/images",
    operation_id="upload_images",
    dependencies=[Write],
    response_model=UploadPublic,
    responses={422: {"description": "every file was rejected: the report, and `detail` naming why"}},
)
def upload_images(
    dataset_id: int,
    files: Annotated[
        list[UploadFile],
        File(description="images (.jpg .jpeg .png .bmp .webp .tif .tiff), or .zip .tar .tar.gz .tgz of them"),
    ],
    runtime: RuntimeDep,
) -> UploadPublic | JSONResponse:
    """200 with what was accepted and rejected (one bad file or member rejects only itself); 422 when every
    file was rejected — the same report, with ``detail`` naming each file and why."""
    parts = [(upload.filename, upload.file) for upload in files]
    report = http_errors(lambda: datasets.ingest(runtime.sessions, runtime.storage, dataset_id, parts))
    public = UploadPublic.model_validate({"accepted": report.accepted, "rejected": report.rejected})
    if report.rejected and not report.accepted:
        content = {"detail": _nothing_accepted(report.rejected), **public.model_dump(mode="json")}
        return JSONResponse(content, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
    return public


def _nothing_accepted(rejected: list[dict[str, Any]], shown: int = 10) -> str:
    reasons = "; ".join(f"{r['name']}: {r['reason']}" for r in rejected[:shown])
    more = f"; and {len(rejected) - shown} more" if len(rejected) > shown else ""
    return f"no file of this upload was accepted — {reasons}{more}"


@router.put("/{dataset_id}/annotations", operation_id="put_annotations", dependencies=[Write])
def put_annotations(
    dataset_id: int,
    file: Annotated[UploadFile, File(description="a COCO json naming uploaded images")],
    runtime: RuntimeDep,
) -> DatasetPublic:
    dataset = http_errors(
        lambda: datasets.put_annotations(
            runtime.sessions, runtime.storage, dataset_id, file.filename, file.file
        )
    )
    return _public(dataset)


@router.get("/{dataset_id}/images", operation_id="list_images", dependencies=[Read])
def list_images(
    dataset_id: int,
    session: SessionDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> ImagesPublic:
    _dataset(session, dataset_id)
    where = Image.dataset_id == dataset_id
    count = session.scalar(select(func.count(Image.id)).where(where)) or 0
    rows = session.scalars(select(Image).where(where).order_by(Image.id).offset(offset).limit(limit)).all()
    data = [
        ImagePublic(id=i.id, name=i.name, sha256=i.sha256, width=i.width, height=i.height, size=i.size)
        for i in rows
    ]
    return ImagesPublic(data=data, count=count)


@router.get("/{dataset_id}/images/{image_id}/file", operation_id="get_image_file", dependencies=[Read])
def get_image_file(dataset_id: int, image_id: int, session: SessionDep, runtime: RuntimeDep) -> FileResponse:
    image = session.get(Image, image_id)
    if image is None or image.dataset_id != dataset_id or not runtime.storage.exists(image.key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} has no image {image_id}")
    kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    return FileResponse(
        runtime.storage.local(image.key), media_type=kind, filename=image.name.rsplit("/", 1)[-1],
        content_disposition_type="inline",
    )  # fmt: skip
