"""Datasets: image ingestion, annotations and the job snapshots of them (no HTTP here: the router over
these functions is ``service.api.datasets``).

Storage layout of dataset ``{id}`` (keys under the service's :class:`~distill.storage.Storage`)::

    datasets/{id}/images/{name}        one file per Image row; ``name`` is the file name the COCO json uses
    datasets/{id}/annotations.json     the validated COCO json (labeled / eval datasets)
    datasets/{id}/.staging/            uploads being written (a crash may leave files here; never read)

A file is published atomically (written to a temporary file in the same filesystem, fsync'ed, renamed; on a
remote store uploaded to a temporary key and moved) and only after it validated; its Image row is inserted
after the file is in place, so no row is without its file (a crash may leave a file without a row: the
retry overwrites it).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from distill.data.coco import CocoDataset, coco_statistics, validate_coco
from distill.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, image_size, load_image
from distill.errors import CocoFormatError, ImageDecodeError, InputError
from distill.storage import Storage
from service.db import transaction
from service.models import Dataset, Image, Job, Schedule

KINDS = ("labeled", "unlabeled", "eval")
NAME_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
"""Dataset names (unique)."""

# ---- limits (module constants; the README's Datasets paragraph lists them) ----
MAX_IMAGE_BYTES = 256 * 2**20
"""One image file (a part or an archive member), in bytes."""
MAX_ARCHIVE_MEMBERS = 100_000
"""Entries of one archive (directories included)."""
MAX_ARCHIVE_BYTES = 16 * 2**30
"""Uncompressed bytes of the members read from one archive."""
MAX_ZIP_DIRECTORY_BYTES = 32 * 2**20
"""A zip's central directory (read whole, before any member: it bounds what listing the members costs)."""
MAX_COMPRESSION_RATIO = 100
"""Uncompressed : compressed bytes of a zip member, or of a compressed tar so far (zip / gzip bombs) ..."""
RATIO_MIN_BYTES = 2**20
"""... checked once that member (tar: the archive) has more than this many uncompressed bytes."""
MAX_NAME_CHARS = 400
"""An image name (its storage key and the row's 512-character columns must hold it)."""
MAX_ANNOTATIONS_BYTES = 512 * 2**20
"""The COCO json of a dataset (parsed in memory)."""
MAX_PIXELS = DEFAULT_MAX_PIXELS
"""Decompression-bomb limit of one image: distill's (Pillow's default)."""
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF"})
"""Pillow formats an image's content may have (its extension must be one of ``IMAGE_EXTENSIONS``)."""
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
NESTED_ARCHIVE_SUFFIXES = (*ARCHIVE_SUFFIXES, ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tbz2", ".txz")

CHUNK = 2**20
COMMIT_BATCH = 64
ACTIVE_JOB_STATES = ("queued", "running")


def images_dir(dataset_id: int) -> str:
    return f"datasets/{dataset_id}/images"


def annotations_key(dataset_id: int) -> str:
    return f"datasets/{dataset_id}/annotations.json"


def _staging_dir(dataset_id: int) -> str:
    return f"datasets/{dataset_id}/.staging"


# --------------------------------------------------------------------------------------------------
# Atomic publication
# --------------------------------------------------------------------------------------------------


def _temp_file(storage: Storage, folder: str) -> Path:
    """A new empty local file to stage a write in: inside ``folder`` of a local storage (so the rename that
    publishes it stays on one filesystem), in the cache folder of a remote one."""
    directory = Path(storage.path(folder)) if storage.is_local else storage.cache_dir / "staging"
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    os.close(fd)
    return Path(temp)


def _publish(storage: Storage, temp: Path, key: str) -> None:
    """Move the complete local file ``temp`` to ``key`` atomically (``temp`` is gone afterwards)."""
    target = storage.path(key)
    try:
        if storage.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
            return
        parent = target.rsplit("/", 1)[0]
        storage.fs.makedirs(parent, exist_ok=True)
        remote_temp = f"{target}.{secrets.token_hex(6)}.part"
        storage.fs.put_file(str(temp), remote_temp)
        storage.fs.mv(remote_temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(storage: Storage, key: str, data: Any) -> None:
    folder = key.rsplit("/", 1)[0] if "/" in key else ""
    temp = _temp_file(storage, folder)
    try:
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _publish(storage, temp, key)


# --------------------------------------------------------------------------------------------------
# Job inputs
# --------------------------------------------------------------------------------------------------


def snapshot_inputs(session: Session, storage: Storage, dataset_id: int, dest: str) -> tuple[str, str]:
    """Write the COCO json a job reads for dataset ``dataset_id`` at storage key ``dest`` (atomically) and
    return ``(json_key, images_dir_key)``: ``dest`` and ``datasets/{id}/images``.

    A labeled or eval dataset gives a copy of its annotations; an unlabeled one a json of its images only
    (ids 1..N in upload order, ``file_name``, ``width``, ``height``; no annotations or categories).
    The dataset row is locked (shared) until ``session`` commits: call this in the transaction that creates
    the job row, so that a concurrent ``DELETE`` of the dataset waits for the job and then refuses (409).
    Raises :class:`~distill.errors.InputError` for a missing dataset, one without images, or a labeled /
    eval dataset without annotations.
    """
    dataset = session.execute(
        select(Dataset).where(Dataset.id == dataset_id).with_for_update(read=True)
    ).scalar_one_or_none()
    if dataset is None:
        raise InputError(f"dataset {dataset_id} does not exist")
    label = f"dataset {dataset_id} ({dataset.name!r}, {dataset.kind})"
    rows = session.execute(
        select(Image.name, Image.width, Image.height).where(Image.dataset_id == dataset_id).order_by(Image.id)
    ).all()
    if not rows:
        raise InputError(f"{label} has no images: upload some first (POST /v1/datasets/{dataset_id}/images)")
    if dataset.kind == "unlabeled":
        data: dict[str, Any] = {
            "images": [
                {"id": i, "file_name": name, "width": width, "height": height}
                for i, (name, width, height) in enumerate(rows, start=1)
            ],
            "annotations": [],
            "categories": [],
        }
        validate_coco(data, dest)
        _write_json(storage, dest, data)
    else:
        if not dataset.annotations_key or not storage.exists(dataset.annotations_key):
            raise InputError(
                f"{label} has no annotations yet: PUT /v1/datasets/{dataset_id}/annotations first"
            )
        source = storage.local(dataset.annotations_key)
        temp = _temp_file(storage, dest.rsplit("/", 1)[0] if "/" in dest else "")
        try:
            shutil.copyfile(source, temp)
            _fsync(temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _publish(storage, temp, dest)
    return dest, images_dir(dataset_id)


# --------------------------------------------------------------------------------------------------
# Errors the router maps to statuses (any other InputError: 422)
# --------------------------------------------------------------------------------------------------


class NotFound(InputError):
    """The dataset (or image) does not exist: 404."""


class Conflict(InputError):
    """The name is taken, or an active job uses the dataset: 409."""


class TooLarge(InputError):
    """An upload above a limit: 413."""


def _dataset_label(dataset: Dataset) -> str:
    return f"dataset {dataset.id} ({dataset.name!r})"


# --------------------------------------------------------------------------------------------------
# Create, delete
# --------------------------------------------------------------------------------------------------


def create_dataset(session: Session, storage: Storage, *, name: str, kind: str) -> Dataset:
    """A new empty dataset (flushed: it has its id); :class:`Conflict` when ``name`` is taken."""
    from sqlalchemy.exc import IntegrityError

    if kind not in KINDS:
        raise InputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
        raise Conflict(f"name: a dataset named {name!r} exists")
    dataset = Dataset(name=name, kind=kind, stats={"images": 0, "bytes": 0})
    session.add(dataset)
    try:
        session.flush()
    except IntegrityError:  # created concurrently
        raise Conflict(f"name: a dataset named {name!r} exists") from None
    # SQLite may reuse the id of a deleted last row: whatever a crash left of that one is not this one's
    folder = storage.path(f"datasets/{dataset.id}")
    if storage.fs.exists(folder):
        storage.fs.rm(folder, recursive=True)
    return dataset


def _job_datasets(spec: Any) -> set[int]:
    """The dataset ids a job's spec names: ``spec["datasets"] = {role: id}``."""
    named = spec.get("datasets") if isinstance(spec, dict) else None
    ids: set[int] = set()
    if isinstance(named, dict):
        for value in named.values():
            with contextlib.suppress(TypeError, ValueError):
                ids.add(int(value))
    return ids


def delete_dataset(sessions: sessionmaker[Session], storage: Storage, dataset_id: int) -> None:
    """Remove the dataset's rows, then its storage folder; :class:`Conflict` while a queued or running job
    names it in ``spec["datasets"]``, or a schedule names it."""
    with transaction(sessions) as session:
        dataset = session.execute(
            select(Dataset).where(Dataset.id == dataset_id).with_for_update()
        ).scalar_one_or_none()
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist")
        active = session.execute(select(Job.id, Job.spec).where(Job.state.in_(ACTIVE_JOB_STATES))).all()
        users = sorted(job_id for job_id, spec in active if dataset_id in _job_datasets(spec))
        if users:
            raise Conflict(
                f"{_dataset_label(dataset)} is used by active job(s) {_listing([str(u) for u in users])}: "
                "cancel them or wait until they end"
            )
        roles = (Schedule.labeled, Schedule.unlabeled, Schedule.eval)
        named = session.scalars(select(Schedule.name).where(or_(*(r == dataset_id for r in roles)))).all()
        if named:
            raise Conflict(
                f"{_dataset_label(dataset)} is used by schedule(s) {_listing(sorted(named))}: edit or delete "
                "them first"
            )
        session.execute(Image.__table__.delete().where(Image.dataset_id == dataset_id))
        session.delete(dataset)
    folder = storage.path(f"datasets/{dataset_id}")
    if storage.fs.exists(folder):
        storage.fs.rm(folder, recursive=True)


# --------------------------------------------------------------------------------------------------
# Image validation
# --------------------------------------------------------------------------------------------------


def check_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Validate an image file as training will read it and return its ``(width, height)`` after the EXIF
    orientation; raises :class:`~distill.errors.ImageDecodeError` (its ``reason`` says why).

    Pillow's ``verify()`` (structure, checksums), the format among :data:`ACCEPTED_FORMATS`, then a real
    decode by distill's :func:`~distill.data.images.load_image` (pixel limit from the header first).
    """
    name = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            with PILImage.open(path) as image:
                kind = image.format
                image.verify()
        except PILImage.DecompressionBombError as error:
            raise ImageDecodeError(name, f"image too large: {error}") from None
        except UnidentifiedImageError:
            raise ImageDecodeError(name, "not a recognised image (corrupt or not an image file)") from None
        except Exception as error:  # Pillow's plugins raise assorted errors on bad data
            raise ImageDecodeError(name, f"corrupt image data: {error}") from None
    if kind not in ACCEPTED_FORMATS:
        accepted = ", ".join(sorted(ACCEPTED_FORMATS - {"MPO"}))
        raise ImageDecodeError(name, f"a {kind} image: not accepted (accepted formats: {accepted})")
    load_image(path, max_pixels=MAX_PIXELS, apply_exif_orientation=True)
    return image_size(path, apply_exif_orientation=True)


# --------------------------------------------------------------------------------------------------
# Ingestion
# --------------------------------------------------------------------------------------------------


def _suffix_in(name: str, suffixes: Iterable[str]) -> bool:
    lower = name.lower()
    return any(lower.endswith(suffix) for suffix in suffixes)


def _image_name(raw: str) -> tuple[str, str | None]:
    """``(normalised name, None)``, or ``(raw, reason)`` when ``raw`` cannot name an image: ``\\`` becomes
    ``/``, ``.`` and empty segments go; absolute paths, ``..``, control characters and long names are
    refused."""
    name = raw.replace("\\", "/")
    if not name.strip():
        return raw, "no file name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return raw, "absolute path: names must be relative"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return raw, "path with '..': names may not leave the dataset's folder"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return raw, "control characters in the name"
    if any("\ud800" <= c <= "\udfff" for c in name):  # undecodable bytes (a tar's surrogateescape)
        return raw, "the name is not valid UTF-8"
    name = "/".join(parts)
    if not name:
        return raw, "no file name"
    if len(name) > MAX_NAME_CHARS:
        return raw, f"name longer than {MAX_NAME_CHARS} characters"
    return name, None


def _extension_problem(name: str, *, nested: bool) -> str | None:
    """Why a file called ``name`` (``nested``: an archive member) is not taken as an image (``None``: its
    extension is one)."""
    if nested and _suffix_in(name, NESTED_ARCHIVE_SUFFIXES):
        return "nested archive: archives inside archives are not expanded"
    extension = Path(name).suffix.lower()
    if extension not in IMAGE_EXTENSIONS:
        shown = f"'{extension}'" if extension else "no extension"
        return (
            f"unsupported extension ({shown}); images: {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"archives: {', '.join(ARCHIVE_SUFFIXES)}"
        )
    return None


_ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError)


def _bomb(uncompressed: int, compressed: int) -> bool:
    """Past :data:`RATIO_MIN_BYTES`, more than :data:`MAX_COMPRESSION_RATIO` times the compressed size."""
    return uncompressed > RATIO_MIN_BYTES and uncompressed > MAX_COMPRESSION_RATIO * max(compressed, 1)


class _MemberRejected(Exception):
    """One file or member is refused (the reason); the rest of its part goes on."""


class _ArchiveRejected(Exception):
    """The whole archive is refused (the reason): nothing of it is stored."""


@dataclass
class _Staged:
    name: str
    part: str
    temp: Path
    sha256: str
    size: int
    width: int = 0
    height: int = 0


@dataclass
class UploadReport:
    """What one upload accepted (``duplicate``: that content was there already, under ``name``) and
    rejected, each with the uploaded file (``part``) it came from."""

    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


class OverLimit(Exception):
    """:func:`copy_hashed` read more than its limit."""


def copy_hashed(
    source: IO[bytes], out: IO[bytes], *, limit: int, on_chunk: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """Copy ``source`` into the open file ``out`` in :data:`CHUNK` pieces (never whole in memory), hashing
    them, then fsync it: ``(sha256, size)``. :class:`OverLimit` as soon as more than ``limit`` bytes came."""
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise OverLimit
        if on_chunk is not None:
            on_chunk(len(chunk))
        digest.update(chunk)
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest(), size


def _fmt_bytes(value: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.0f} {unit}"
    return f"{value} bytes"


class _Ingest:
    """One ``POST /v1/datasets/{id}/images``: each part staged (copied in chunks while hashed), validated,
    then published and recorded in batches; see :func:`ingest`."""

    def __init__(self, sessions: sessionmaker[Session], storage: Storage, dataset: Dataset) -> None:
        self.sessions = sessions
        self.storage = storage
        self.dataset_id = dataset.id
        self.dataset_name = dataset.name
        self.report = UploadReport()

    # ---- outcome ----
    def reject(self, name: str, reason: str, part: str) -> None:
        name = name.encode("utf-8", "replace").decode()  # undecodable bytes of a tar name: "?" in the report
        self.report.rejected.append({"name": name, "reason": reason, "part": part})

    def accept(self, item: _Staged, name: str, duplicate: bool) -> dict[str, Any]:
        return {
            "name": name, "sha256": item.sha256, "duplicate": duplicate, "uploaded_as": item.name,
            "part": item.part,
        }  # fmt: skip

    # ---- staging ----
    def stage(self, name: str, part: str, source: IO[bytes], on_chunk: Callable[[int], None] | None = None):
        """Copy ``source`` into a staging file while hashing it; :class:`_MemberRejected` past the size
        limit or for an empty file."""
        temp = _temp_file(self.storage, _staging_dir(self.dataset_id))
        try:
            with temp.open("wb") as out:
                sha256, size = copy_hashed(source, out, limit=MAX_IMAGE_BYTES, on_chunk=on_chunk)
            if size == 0:
                raise _MemberRejected("empty file (0 bytes)")
        except OverLimit:
            temp.unlink(missing_ok=True)
            raise _MemberRejected(f"larger than the limit of {_fmt_bytes(MAX_IMAGE_BYTES)}") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return _Staged(name, part, temp, sha256, size)

    def part(self, filename: str | None, source: IO[bytes]) -> None:
        """One multipart ``files`` part: an image or an archive of images."""
        raw = filename or ""
        name, problem = _image_name(raw)
        if problem is not None:
            self.reject(raw, problem, raw)
            return
        staged: list[_Staged] = []
        rejected_before = len(self.report.rejected)
        try:
            source.seek(0)
            if name.lower().endswith(".zip") or _suffix_in(name, (".tar", ".tar.gz", ".tgz")):
                (self.zip if name.lower().endswith(".zip") else self.tar)(name, source, staged)
                if not staged and len(self.report.rejected) == rejected_before:
                    self.reject(name, "the archive holds no files", name)
                staged = self.without_repeated_names(staged)
            else:
                problem = _extension_problem(name, nested=False)
                if problem is not None:
                    self.reject(name, problem, name)
                    return
                try:
                    staged.append(self.stage(name, name, source))
                except _MemberRejected as error:
                    self.reject(name, str(error), name)
        except _ArchiveRejected as error:
            _discard(staged)
            self.reject(name, f"{error}; nothing of this archive was stored", name)
            return
        except BaseException:
            _discard(staged)
            raise
        self.settle(staged)

    def without_repeated_names(self, staged: list[_Staged]) -> list[_Staged]:
        """An archive naming two members alike is ambiguous (which one is meant?): none of them is kept."""
        counts = collections.Counter(item.name for item in staged)
        for item in staged:
            if counts[item.name] > 1:
                reason = f"{counts[item.name]} members of the archive have this name: none stored"
                self.reject(item.name, reason, item.part)
                item.temp.unlink(missing_ok=True)
        return [item for item in staged if counts[item.name] == 1]

    def member(self, raw: str, part: str) -> str | None:
        """The image name of an archive member, or ``None`` after rejecting it (path, extension)."""
        name, problem = _image_name(raw)
        if problem is None:
            problem = _extension_problem(name, nested=True)
        if problem is not None:
            self.reject(raw, problem, part)
            return None
        return name

    def zip(self, part: str, source: IO[bytes], staged: list[_Staged]) -> None:
        _check_zip_directory(source)
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
            raise _ArchiveRejected(f"not a readable zip archive: {error}") from None
        with archive:
            infos = archive.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise _ArchiveRejected(f"{len(infos)} members, above the limit of {MAX_ARCHIVE_MEMBERS}")
            chosen = [(info, name) for info in infos if (name := self.zip_member(info, part)) is not None]
            total = sum(info.file_size for info, _ in chosen)
            if total > MAX_ARCHIVE_BYTES:
                raise _ArchiveRejected(
                    f"{_fmt_bytes(total)} uncompressed, above the limit of {_fmt_bytes(MAX_ARCHIVE_BYTES)}"
                )
            for info, name in chosen:
                try:
                    with archive.open(info) as member:
                        staged.append(self.stage(name, part, member))
                except _MemberRejected as error:
                    self.reject(info.filename, str(error), part)
                except _ZIP_READ_ERRORS as error:
                    self.reject(info.filename, f"cannot read this member: {error}", part)

    def zip_member(self, info: zipfile.ZipInfo, part: str) -> str | None:
        if info.is_dir():
            return None
        mode = info.external_attr >> 16
        kind = mode & 0o170000
        if kind == 0o120000:
            self.reject(info.filename, "symbolic link: not stored", part)
            return None
        if kind not in (0, 0o100000):
            self.reject(info.filename, "not a regular file", part)
            return None
        name = self.member(info.filename, part)
        if name is None:
            return None
        problem = None
        if info.flag_bits & 0x1:
            problem = "encrypted member: not supported"
        elif info.file_size > MAX_IMAGE_BYTES:
            problem = f"larger than the limit of {_fmt_bytes(MAX_IMAGE_BYTES)}"
        elif info.file_size == 0:
            problem = "empty file (0 bytes)"
        elif _bomb(info.file_size, info.compress_size):
            ratio = info.file_size / max(info.compress_size, 1)
            problem = (
                f"compression ratio {ratio:.0f}:1, above the limit of {MAX_COMPRESSION_RATIO}:1 (a zip bomb?)"
            )
        if problem is not None:
            self.reject(info.filename, problem, part)
            return None
        return name

    def tar(self, part: str, source: IO[bytes], staged: list[_Staged]) -> None:
        start = source.tell()
        seen = {"members": 0, "bytes": 0}

        def count(n: int) -> None:
            seen["bytes"] += n
            compressed = max(source.tell() - start, 1)
            if _bomb(seen["bytes"], compressed):
                raise _ArchiveRejected(
                    f"compression ratio above the limit of {MAX_COMPRESSION_RATIO}:1 (a decompression bomb?)"
                )

        try:
            with tarfile.open(fileobj=source, mode="r|*") as archive:
                declared = 0
                while (info := archive.next()) is not None:
                    archive.members.clear()  # a TarFile keeps every header it read: not needed here
                    seen["members"] += 1
                    if seen["members"] > MAX_ARCHIVE_MEMBERS:
                        raise _ArchiveRejected(f"more than the limit of {MAX_ARCHIVE_MEMBERS} members")
                    declared += info.size if info.isreg() else 0
                    if declared > MAX_ARCHIVE_BYTES:
                        raise _ArchiveRejected(
                            f"more than the limit of {_fmt_bytes(MAX_ARCHIVE_BYTES)} uncompressed"
                        )
                    self.tar_member(archive, info, part, staged, count)
        except _ArchiveRejected:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            raise _ArchiveRejected(
                f"not a readable tar archive, or truncated / corrupt after {seen['members']} members: {error}"
            ) from None
        except Exception as error:  # zlib.error, lzma.LZMAError, ... from a corrupt compressed stream
            raise _ArchiveRejected(f"corrupt data after {seen['members']} members: {error}") from None

    def tar_member(self, archive: tarfile.TarFile, info: tarfile.TarInfo, part: str, staged, count) -> None:
        if info.isdir():
            return
        problem = None
        if info.issym():
            problem = "symbolic link: not stored"
        elif info.islnk():
            problem = "hard link: not stored"
        elif info.ischr() or info.isblk() or info.isfifo():
            problem = "device or FIFO: not stored"
        elif not info.isreg():
            problem = "not a regular file"
        if problem is not None:
            self.reject(info.name, problem, part)
            return
        source = archive.extractfile(info)
        name = self.member(info.name, part)
        if name is None or source is None:
            _drain(source, count)  # read through the ratio check: a bomb under a rejected name stops early
            return
        if info.size > MAX_IMAGE_BYTES:
            self.reject(info.name, f"larger than the limit of {_fmt_bytes(MAX_IMAGE_BYTES)}", part)
            _drain(source, count)
            return
        try:
            staged.append(self.stage(name, part, source, on_chunk=count))
        except _MemberRejected as error:
            self.reject(info.name, str(error), part)

    # ---- validation and commit ----
    def settle(self, staged: list[_Staged]) -> None:
        """Validate and record the staged files of one part, :data:`COMMIT_BATCH` at a time."""
        try:
            for start in range(0, len(staged), COMMIT_BATCH):
                self.settle_batch(staged[start : start + COMMIT_BATCH])
        finally:
            _discard(staged)

    def settle_batch(self, batch: list[_Staged]) -> None:
        by_sha, by_name = self.lookup(batch)
        ready: list[_Staged] = []
        for item in batch:
            if item.sha256 in by_sha:  # known content: no need to decode it again
                self.report.accepted.append(self.accept(item, by_sha[item.sha256], duplicate=True))
            elif item.name in by_name:
                self.reject(item.name, "name exists with different content", item.part)
            else:
                try:
                    item.width, item.height = check_image(item.temp)
                except ImageDecodeError as error:
                    self.reject(item.name, error.reason, item.part)
                else:
                    ready.append(item)
            if item not in ready:
                item.temp.unlink(missing_ok=True)
        if ready:
            self.commit(ready)

    def lookup(self, batch: list[_Staged]) -> tuple[dict[str, str], dict[str, str]]:
        """Images of the dataset with a batch item's content (sha256 -> name) or name (name -> sha256)."""
        shas = {item.sha256 for item in batch}
        names = {item.name for item in batch}
        with self.sessions() as session:
            rows = session.execute(
                select(Image.sha256, Image.name).where(
                    Image.dataset_id == self.dataset_id, Image.sha256.in_(shas) | Image.name.in_(names)
                )
            ).all()
        return {sha: name for sha, name in rows if sha in shas}, {name: sha for sha, name in rows}

    def commit(self, ready: list[_Staged]) -> None:
        """Under the dataset's row lock: check each item again, publish its file, insert its row; then the
        dataset's image count."""
        accepted: list[dict[str, Any]] = []
        rejected: list[tuple[str, str, str]] = []
        with transaction(self.sessions) as session:
            dataset = session.execute(
                select(Dataset).where(Dataset.id == self.dataset_id).with_for_update()
            ).scalar_one_or_none()
            if dataset is None or dataset.name != self.dataset_name:
                for item in ready:
                    self.reject(item.name, "the dataset was deleted during the upload", item.part)
                return
            for item in ready:
                rows = session.execute(
                    select(Image.sha256, Image.name).where(
                        Image.dataset_id == self.dataset_id,
                        (Image.sha256 == item.sha256) | (Image.name == item.name),
                    )
                ).all()
                same = next((name for sha, name in rows if sha == item.sha256), None)
                if same is not None:
                    accepted.append(self.accept(item, same, duplicate=True))
                    continue
                if rows:
                    rejected.append((item.name, "name exists with different content", item.part))
                    continue
                key = f"{images_dir(self.dataset_id)}/{item.name}"
                try:
                    _publish(self.storage, item.temp, key)
                except OSError as error:  # e.g. a name that is a folder of another image
                    rejected.append((item.name, f"cannot be stored under this name: {error}", item.part))
                    continue
                session.add(
                    Image(
                        dataset_id=self.dataset_id, name=item.name, sha256=item.sha256, size=item.size,
                        width=item.width, height=item.height, key=key,
                    )
                )  # fmt: skip
                session.flush()
                accepted.append(self.accept(item, item.name, duplicate=False))
            _refresh_image_stats(session, dataset)
        self.report.accepted.extend(accepted)
        for name, reason, part in rejected:
            self.reject(name, reason, part)


def _refresh_image_stats(session: Session, dataset: Dataset) -> None:
    count, total = session.execute(
        select(func.count(Image.id), func.coalesce(func.sum(Image.size), 0)).where(
            Image.dataset_id == dataset.id
        )
    ).one()
    dataset.stats = {**(dataset.stats or {}), "images": int(count), "bytes": int(total)}


def _check_zip_directory(source: IO[bytes]) -> None:
    """Refuse a zip whose end record announces more members or a larger central directory than the limits,
    before :class:`zipfile.ZipFile` reads that directory into memory."""
    try:
        end = zipfile._EndRecData(source)  # the end-of-central-directory record (zip64 aware)
    except (OSError, ValueError, EOFError, struct.error):
        end = None
    source.seek(0)
    if end is None:
        raise _ArchiveRejected("not a readable zip archive: no end-of-central-directory record")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > MAX_ARCHIVE_MEMBERS:
        raise _ArchiveRejected(f"{entries} members, above the limit of {MAX_ARCHIVE_MEMBERS}")
    if size > MAX_ZIP_DIRECTORY_BYTES:
        raise _ArchiveRejected(
            f"a central directory of {_fmt_bytes(size)}, above the limit of "
            f"{_fmt_bytes(MAX_ZIP_DIRECTORY_BYTES)}"
        )


def _drain(source: IO[bytes] | None, count: Callable[[int], None]) -> None:
    if source is None:
        return
    while chunk := source.read(CHUNK):
        count(len(chunk))


def _discard(staged: list[_Staged]) -> None:
    for item in staged:
        item.temp.unlink(missing_ok=True)


def ingest(
    sessions: sessionmaker[Session],
    storage: Storage,
    dataset_id: int,
    parts: Iterable[tuple[str | None, IO[bytes]]],
) -> UploadReport:
    """Store the images of ``parts`` (``(file name, readable seekable file)``: an image or a ``.zip`` /
    ``.tar`` / ``.tar.gz`` / ``.tgz`` archive of images) in dataset ``dataset_id``.

    Nothing is read whole into memory: every file is copied in :data:`CHUNK` pieces into a staging file
    while hashed, zip members are read one at a time from the central directory, tar members in one
    streaming pass. A file or member that fails a check is rejected alone (with the reason); an archive
    beyond a limit, or unreadable, is rejected whole. Content already in the dataset (same sha256) is
    accepted as ``duplicate`` under its existing name and not stored again; a known name with different
    content is rejected. Repeating an upload gives the same names and hashes. No database transaction is
    open while a file streams or decodes (SQLite's writers would wait on it).
    """
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist")
        session.expunge(dataset)
    run = _Ingest(sessions, storage, dataset)
    for filename, source in parts:
        run.part(filename, source)
    return run.report


# --------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def put_annotations(
    sessions: sessionmaker[Session],
    storage: Storage,
    dataset_id: int,
    filename: str | None,
    source: IO[bytes],
) -> Dataset:
    """Validate a COCO json against the dataset's images and store it at ``datasets/{id}/annotations.json``
    (atomically), with its statistics in the dataset's ``stats``; returns the updated dataset.

    Every ``file_name`` must be an uploaded image of the dataset; missing ``width`` / ``height`` are filled
    from the images, given ones must match them (the size after the EXIF orientation: what training sees);
    a labeled or eval dataset needs categories. Problems raise :class:`~distill.errors.InputError` naming
    the files (the first 10 and how many), the field or the dataset.
    """
    label = filename or "annotations.json"
    with sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist")
        kind = dataset.kind
        dataset_label = _dataset_label(dataset)
        sizes = {
            name: (width, height)
            for name, width, height in session.execute(
                select(Image.name, Image.width, Image.height).where(Image.dataset_id == dataset_id)
            )
        }
    data = _read_json_upload(label, source)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list):
        _match_images(label, dataset_label, dataset_id, images, sizes)
    validate_coco(data, label)
    coco = CocoDataset(data, label)
    if kind != "unlabeled" and not coco.categories:
        raise InputError(f"{label}: categories: a {kind} dataset's annotations need at least one category")
    stats = _annotation_stats(coco)
    key = annotations_key(dataset_id)
    _write_json(storage, key, data)
    with transaction(sessions) as session:
        dataset = session.execute(
            select(Dataset).where(Dataset.id == dataset_id).with_for_update()
        ).scalar_one_or_none()
        if dataset is None:
            raise NotFound(f"dataset {dataset_id} does not exist (deleted meanwhile)")
        dataset.annotations_key = key
        dataset.stats = {**(dataset.stats or {}), **stats}
    return dataset


def _read_json_upload(label: str, source: IO[bytes]) -> Any:
    source.seek(0, os.SEEK_END)
    size = source.tell()
    source.seek(0)
    if size > MAX_ANNOTATIONS_BYTES:
        raise TooLarge(
            f"{label}: {_fmt_bytes(size)}, above the COCO json limit of {_fmt_bytes(MAX_ANNOTATIONS_BYTES)}"
        )
    raw = source.read(MAX_ANNOTATIONS_BYTES + 1)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise CocoFormatError(
            label, "", f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise CocoFormatError(label, "", f"not UTF-8 text: {error}") from None


def _match_images(
    label: str, dataset_label: str, dataset_id: int, images: list[Any], sizes: dict[str, tuple[int, int]]
) -> None:
    """Every ``file_name`` an uploaded image, once; sizes filled in where missing, checked where given."""
    entries = [
        image for image in images if isinstance(image, dict) and isinstance(image.get("file_name"), str)
    ]
    unknown = list(dict.fromkeys(image["file_name"] for image in entries if image["file_name"] not in sizes))
    if unknown:
        raise InputError(
            f"{label}: {len(unknown)} file_name(s) are not images of {dataset_label}: {_listing(unknown)}; "
            f"upload them first (POST /v1/datasets/{dataset_id}/images)"
        )
    seen: set[str] = set()
    repeated = []
    for image in entries:
        name = image["file_name"]
        if name in seen:
            repeated.append(name)
        seen.add(name)
    if repeated:
        raise InputError(f"{label}: {len(repeated)} file_name(s) appear more than once: {_listing(repeated)}")
    wrong = []
    for image in entries:
        width, height = sizes[image["file_name"]]
        image.setdefault("width", width)
        image.setdefault("height", height)
        if (image["width"], image["height"]) != (width, height):
            given = f"{image['width']}x{image['height']}"
            wrong.append(f"{image['file_name']} ({given}, the image is {width}x{height})")
    if wrong:
        raise InputError(
            f"{label}: {len(wrong)} image(s) with a width x height other than the uploaded file's (after its "
            f"EXIF orientation, as training reads it): {_listing(wrong)}; fix the sizes or leave them out"
        )


def _annotation_stats(coco: CocoDataset) -> dict[str, Any]:
    base = coco_statistics(coco)
    names: dict[int, str] = {}
    taken: set[str] = set()
    for category in coco.categories:
        name = str(category.get("name"))
        names[category["id"]] = name if name not in taken else f"{name} (id {category['id']})"
        taken.add(name)
    per_class = dict.fromkeys(names.values(), 0)
    annotated: set[int] = set()
    for annotation in coco.annotations:
        if annotation.get("iscrowd", 0) == 1:
            continue
        per_class[names[annotation["category_id"]]] += 1
        annotated.add(annotation["image_id"])
    return {
        "annotation_images": base.num_images,
        "annotated_images": len(annotated),
        "instances": base.num_instances,
        "instances_per_image": round(base.instances_per_image, 4),
        "crowd": base.num_crowd,
        "categories": len(coco.categories),
        "per_class": per_class,
    }
