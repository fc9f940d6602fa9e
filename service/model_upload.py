"""Model uploads: an archive of a distill model directory, or a detectron2 config + weights, checked to load
and registered (no HTTP here: the router over these functions is ``service.api.models``).

Storage layout::

    models/{uuid hex}/                 a registered model directory: config.yaml, weights.pt, meta.json
                                       (+ detectron2.yaml); its Model row's ``key``
    models/.staging/{random}/          an upload being unpacked and checked (a crash may leave one)

An upload is copied in :data:`~service.datasets.CHUNK` pieces into a staging folder (on a remote storage: a
local folder in the storage's cache), never whole in memory. It is published only after it passed every
check, and only then registered:

1. the archive's members: only the model files (:data:`MODEL_FILES`), regular files, at the top of the
   archive or inside one folder; no ``..``, absolute paths, links, devices, duplicates; each within its size
   limit, zip / gzip bombs refused;
2. ``meta.json`` is a JSON object, ``config.yaml`` a valid model config of a backend this server has;
3. ``weights.pt`` is read by :func:`distill.models.files.read_state_dict`: ``torch.load(weights_only=True)``,
   so a pickle that names anything but tensors and plain containers is refused before any of it runs; its
   sha256 must equal ``meta.json``'s ``weights_sha256`` when that is given;
4. the model is built on the ``meta`` device first (the weights must fit the config tensor by tensor before
   any memory is spent on it, so a config cannot ask for more than its weights hold), then loaded on the CPU
   with :func:`distill.backends.load_model`.

Publishing is a rename of the staging folder to ``models/{uuid hex}`` (same filesystem; a remote storage
gets the files uploaded with ``meta.json`` last). The row comes after the folder, so no row is without its
files; a failure in between removes the folder again. Whatever fails, the staging folder is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
import tarfile
import tempfile
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from distill.backends import list_backends, load_model
from distill.errors import InputError
from distill.models.config import load_model_config
from distill.models.files import CONFIG_FILE, META_FILE, WEIGHTS_FILE, read_state_dict
from distill.steps import MODEL_FILES
from distill.storage import Storage
from service.datasets import (
    _ZIP_READ_ERRORS,
    MAX_COMPRESSION_RATIO,
    Conflict,
    NotFound,
    OverLimit,
    _bomb,
    _fmt_bytes,
    copy_hashed,
)
from service.db import transaction
from service.models import Model
from service.registry import register_model

STAGING = "models/.staging"
DETECTRON2_CONFIG = "detectron2.yaml"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)
"""What every model archive holds (a detectron2 model also ``detectron2.yaml``)."""

# ---- limits (module constants; the README's Models paragraph lists them) ----
MAX_WEIGHTS_BYTES = 8 * 2**30
"""``weights.pt`` of an archive, or the weights of a detectron2 upload."""
MAX_TEXT_BYTES = 16 * 2**20
"""``config.yaml``, ``meta.json``, ``detectron2.yaml``, a detectron2 config, a categories json."""
MAX_ARCHIVE_ENTRIES = 64
"""Entries of one archive, folders included (a model directory has at most four files)."""

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DETECTRON2_CONFIG_SUFFIXES = (".yaml", ".yml")
DETECTRON2_WEIGHTS_SUFFIXES = (".pth", ".pkl")


def _files_listing() -> str:
    return f"{', '.join(REQUIRED_FILES)} and, for a detectron2 model, {DETECTRON2_CONFIG}"


def _limit(base: str) -> int:
    return MAX_WEIGHTS_BYTES if base == WEIGHTS_FILE else MAX_TEXT_BYTES


# --------------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(storage: Storage) -> Iterator[Path]:
    """A new empty local folder to unpack an upload in, removed at the end (after a publish it is gone)."""
    token = secrets.token_hex(8)
    base = Path(storage.path(STAGING)) if storage.is_local else storage.cache_dir / STAGING
    folder = base / token
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy(
    source: IO[bytes], dest: Path, *, limit: int, label: str, on_chunk: Callable[[int], None] | None = None
) -> str:
    """Copy ``source`` to the new file ``dest`` in chunks (fsync'ed); its sha256. :class:`InputError` past
    ``limit`` bytes or for an empty file."""
    try:
        with dest.open("xb") as out:
            sha256, size = copy_hashed(source, out, limit=limit, on_chunk=on_chunk)
    except OverLimit:
        raise InputError(f"{label}: larger than the limit of {_fmt_bytes(limit)}") from None
    if size == 0:
        raise InputError(f"{label}: empty file (0 bytes)")
    return sha256


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------


class _Unpack:
    """The members of one model archive, checked and copied into ``folder`` under their base names."""

    def __init__(self, folder: Path, archive_name: str) -> None:
        self.folder = folder
        self.archive_name = archive_name
        self.top: str | None = None  # "" (files at the top) or the one folder they are in
        self.entries = 0
        self.names: set[str] = set()
        self.sha256: dict[str, str] = {}

    def refuse(self, raw: str, reason: str) -> InputError:
        return InputError(f"archive member {raw!r}: {reason}")

    def name(self, raw: str, *, is_dir: bool) -> str | None:
        """The model file a member is (``None`` for a folder entry), after the path checks."""
        self.entries += 1
        if self.entries > MAX_ARCHIVE_ENTRIES:
            raise InputError(
                f"archive: more than {MAX_ARCHIVE_ENTRIES} entries; a model archive holds {_files_listing()}"
            )
        name = raw.replace("\\", "/")
        if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
            raise self.refuse(raw, "absolute path: members must be relative")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise self.refuse(raw, "control characters in the name")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.refuse(raw, "path with '..': members may not leave the archive")
        if not parts:
            if is_dir:
                return None
            raise self.refuse(raw, "no file name")
        if len(parts) > (1 if is_dir else 2):
            raise self.refuse(
                raw, "nested folders: the model files go at the top of the archive or inside one folder"
            )
        top = parts[0] if is_dir or len(parts) == 2 else ""
        if self.top is None:
            self.top = top
        elif top != self.top:
            where = f"in folder {self.top!r}" if self.top else "at the top of the archive"
            raise self.refuse(raw, f"the other model files are {where}: all of them must be in one place")
        if is_dir:
            return None
        base = parts[-1]
        if base not in MODEL_FILES:
            raise self.refuse(raw, f"not a model file; a model archive holds only {_files_listing()}")
        if base in self.names:
            raise self.refuse(raw, f"a second {base}")
        self.names.add(base)
        return base

    def extract(self, raw: str, base: str, source: IO[bytes], on_chunk=None) -> None:
        label = f"archive member {raw!r}"
        self.sha256[base] = _copy(
            source, self.folder / base, limit=_limit(base), label=label, on_chunk=on_chunk
        )

    def finish(self) -> dict[str, str]:
        missing = [name for name in REQUIRED_FILES if name not in self.sha256]
        if missing:
            raise InputError(
                f"archive {self.archive_name!r}: no {', '.join(missing)}; a model archive holds "
                f"{_files_listing()} (at the top or inside one folder)"
            )
        return self.sha256

    # ---- zip ----
    def zip(self, source: IO[bytes]) -> None:
        try:
            archive = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
            raise InputError(f"archive {self.archive_name!r}: not a readable zip archive: {error}") from None
        with archive:
            chosen = []
            for info in archive.infolist():  # every member checked before anything is copied
                base = self.zip_member(info)
                if base is not None:
                    chosen.append((info, base))
            for info, base in chosen:
                try:
                    with archive.open(info) as member:
                        self.extract(info.filename, base, member)
                except _ZIP_READ_ERRORS as error:
                    raise self.refuse(info.filename, f"cannot read this member: {error}") from None
                except zlib.error as error:
                    raise self.refuse(info.filename, f"corrupt compressed data: {error}") from None

    def zip_member(self, info: zipfile.ZipInfo) -> str | None:
        kind = (info.external_attr >> 16) & 0o170000
        if kind == 0o120000:
            raise self.refuse(info.filename, "symbolic link: model archives hold regular files only")
        if info.is_dir():
            return self.name(info.filename, is_dir=True)
        if kind not in (0, 0o100000):
            raise self.refuse(info.filename, "not a regular file")
        base = self.name(info.filename, is_dir=False)
        if info.flag_bits & 0x1:
            raise self.refuse(info.filename, "encrypted member: not supported")
        limit = _limit(base)
        if info.file_size > limit:
            raise self.refuse(info.filename, f"larger than the limit of {_fmt_bytes(limit)}")
        if _bomb(info.file_size, info.compress_size):
            ratio = info.file_size / max(info.compress_size, 1)
            limit_text = f"above the limit of {MAX_COMPRESSION_RATIO}:1 (a zip bomb?)"
            raise self.refuse(info.filename, f"compression ratio {ratio:.0f}:1, {limit_text}")
        return base

    # ---- tar ----
    def tar(self, source: IO[bytes]) -> None:
        start = source.tell()
        seen = {"bytes": 0}

        def count(n: int) -> None:
            seen["bytes"] += n
            if _bomb(seen["bytes"], max(source.tell() - start, 1)):
                raise InputError(
                    f"archive {self.archive_name!r}: compression ratio above the limit of "
                    f"{MAX_COMPRESSION_RATIO}:1 (a decompression bomb?)"
                )

        try:
            with tarfile.open(fileobj=source, mode="r|*") as archive:
                for info in archive:
                    self.tar_member(archive, info, count)
        except InputError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as error:
            raise InputError(
                f"archive {self.archive_name!r}: not a readable tar archive, or truncated / corrupt: {error}"
            ) from None
        except Exception as error:  # lzma.LZMAError, ... from a corrupt compressed stream
            raise InputError(f"archive {self.archive_name!r}: corrupt data: {error}") from None

    def tar_member(self, archive: tarfile.TarFile, info: tarfile.TarInfo, count) -> None:
        if info.issym() or info.islnk():
            kind = "symbolic" if info.issym() else "hard"
            raise self.refuse(info.name, f"{kind} link: model archives hold regular files only")
        if info.isdir():
            self.name(info.name, is_dir=True)
            return
        if not info.isreg():
            raise self.refuse(info.name, "not a regular file (a device or FIFO?)")
        base = self.name(info.name, is_dir=False)
        limit = _limit(base)
        if info.size > limit:
            raise self.refuse(info.name, f"larger than the limit of {_fmt_bytes(limit)}")
        member = archive.extractfile(info)
        if member is None:
            raise self.refuse(info.name, "cannot read this member")
        self.extract(info.name, base, member, on_chunk=count)


def unpack_archive(filename: str | None, source: IO[bytes], folder: Path) -> dict[str, str]:
    """Check and copy the members of a model archive (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) into
    ``folder``; file name -> sha256. :class:`InputError` naming the member or the archive."""
    name = filename or ""
    lower = name.lower()
    unpack = _Unpack(folder, name)
    source.seek(0)
    if lower.endswith(".zip"):
        unpack.zip(source)
    elif lower.endswith((".tar", ".tar.gz", ".tgz")):
        unpack.tar(source)
    else:
        raise InputError(
            f"archive: {name!r} is not a {', '.join(ARCHIVE_SUFFIXES)} archive of a distill model directory"
        )
    return unpack.finish()


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _relabel(message: str, folder: Path) -> str:
    """An error message with the staging folder's paths shortened to the file names."""
    return message.replace(f"{folder}{os.sep}", "").replace(str(folder), "the upload")


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _weights_error(message: str, label: str) -> str:
    """``read_state_dict``'s message, rewritten where ``weights_only`` refused the file: torch's own text
    suggests ``weights_only=False``, which is no advice for a server's clients."""
    if "Weights only load failed" not in message:
        return message
    found = _UNSAFE_GLOBAL.search(message)
    if found is not None:
        return (
            f"{label}: refused: its pickle names a Python object other than tensors and plain containers "
            f"({found.group(1)}); weights are read with torch.load(weights_only=True): nothing in it ran"
        )
    detail = _UNPICKLER_ERROR.search(message)
    reason = f" ({detail.group(1).strip()})" if detail else ""
    return f"{label}: cannot read weights: not a file torch.save wrote, or corrupt{reason}"


def check_model_dir(folder: Path, sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """Check that the model directory ``folder`` loads (see the module's docstring); returns what the
    registry keeps as the model's ``info``. :class:`InputError` naming the file that fails."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{META_FILE}: not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{META_FILE}: expected a JSON object, got {type(meta).__name__}")
    try:
        config = load_model_config(folder / CONFIG_FILE)
    except InputError as error:
        raise InputError(_relabel(str(error), folder)) from None
    reason = list_backends().get(config.backend)
    if reason is not None:
        raise InputError(
            f"{CONFIG_FILE}: a {config.backend} model, and {config.backend} is not installed on this server"
        )
    extra = getattr(config, "detectron2_config", None)
    if extra is not None and not (folder / extra).is_file():
        raise InputError(f"{CONFIG_FILE}: a detectron2 model needs its {extra}, which is not in the upload")
    try:
        state = read_state_dict(folder / WEIGHTS_FILE)
    except InputError as error:
        raise InputError(_weights_error(_relabel(str(error), folder), WEIGHTS_FILE)) from None
    tensors = len(state)
    parameters = sum(int(t.numel()) for t in state.values())
    del state
    weights_sha = (sha256 or {}).get(WEIGHTS_FILE)
    expected = meta.get("weights_sha256")
    if weights_sha is not None and expected is not None and expected != weights_sha:
        raise InputError(
            f"{WEIGHTS_FILE}: sha256 {weights_sha} differs from {META_FILE}'s weights_sha256 {expected} "
            "(truncated, or altered after it was saved?)"
        )
    _load_on_meta(folder)
    try:
        detector = load_model(folder, device="cpu")
    except InputError as error:
        raise InputError(_relabel(str(error), folder)) from None
    except Exception as error:  # anything the backend raises building the model: the upload's fault
        raise InputError(
            f"the model does not load: {type(error).__name__}: {_relabel(str(error), folder)}"
        ) from None
    c = detector.config
    info = {
        "class_names": list(c.class_names),
        "category_ids": list(c.category_ids),
        "num_classes": len(c.class_names),
        "masks": bool(c.masks),
        "keypoints": list(c.keypoint_names),
        "test_size": int(c.test_size),
        "max_size": int(c.max_size),
        "tensors": tensors,
        "parameters": parameters,
        "weights_sha256": weights_sha or expected,
        "iterations": (meta.get("training") or {}).get("iterations"),
    }
    if getattr(c, "backbone", None) is not None:
        info["backbone"] = c.backbone
    del detector
    return info


def _load_on_meta(folder: Path) -> None:
    """Build the model on the ``meta`` device (no memory) and match the weights to it, so that a config
    asking for more than its weights hold fails here. Only the loader's own verdicts count: anything else
    a backend cannot do on ``meta`` is left to the CPU load that follows."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # copying into meta tensors is a no-op, and torch says so
            load_model(folder, device="meta")
    except InputError as error:
        raise InputError(_relabel(str(error), folder)) from None
    except Exception:
        return  # the CPU load that follows is the authority


# --------------------------------------------------------------------------------------------------
# detectron2 uploads
# --------------------------------------------------------------------------------------------------

_PICKLE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }
)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles containers, numbers, strings and numpy arrays; any other global is refused unresolved."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_detectron2_weights(path: Path, label: str) -> None:
    """Refuse detectron2 weights whose unpickling could run code, before detectron2's checkpointer (which
    unpickles a ``.pkl`` unrestricted) sees them: a ``.pth`` must load with ``torch.load(weights_only=True)``,
    a Detectron ``.pkl`` with only numpy arrays in its containers."""
    if path.suffix.lower() == ".pkl":
        try:
            with path.open("rb") as handle:
                _ArraysOnly(handle, encoding="latin1").load()
        except pickle.UnpicklingError as error:
            raise InputError(
                f"{label}: refused: its pickle names a Python object other than numpy arrays and plain "
                f"containers ({error}); nothing in the file was run"
            ) from None
        except Exception as error:
            raise InputError(f"{label}: not a readable pickle ({type(error).__name__}: {error})") from None
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = f"{label}: cannot read weights ({type(error).__name__}: {error})"
        raise InputError(_weights_error(message, label)) from None


def detectron2_unavailable() -> str | None:
    """Why this server cannot import detectron2 models (``None``: it can)."""
    if list_backends().get("detectron2") is not None:
        return "detectron2 is not installed on this server"
    return None


def _suffix(filename: str | None, suffixes: tuple[str, ...], field: str, what: str) -> str:
    name = filename or ""
    suffix = next((s for s in suffixes if name.lower().endswith(s)), None)
    if suffix is None:
        raise InputError(f"{field}: {name!r} is not {what} ({', '.join(suffixes)})")
    return suffix


# --------------------------------------------------------------------------------------------------
# Publish and register
# --------------------------------------------------------------------------------------------------


def new_model_key() -> str:
    return f"models/{uuid.uuid4().hex}"


def _publish(storage: Storage, folder: Path, key: str) -> None:
    """Move the checked model directory ``folder`` to ``key`` (a rename on local storage)."""
    if storage.is_local:
        target = Path(storage.path(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, target)
        return
    out = storage.output(key)
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(folder, out)
    try:
        storage.commit(key)  # meta.json last
    except BaseException:
        _unpublish(storage, key)
        raise
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _unpublish(storage: Storage, key: str) -> None:
    with contextlib.suppress(OSError, FileNotFoundError):
        if storage.is_local:
            shutil.rmtree(storage.path(key))
        else:
            storage.fs.rm(storage.path(key), recursive=True)


def _register(
    sessions: sessionmaker[Session], storage: Storage, folder: Path, name: str, info: dict[str, Any]
) -> Model:
    backend = load_model_config(folder / CONFIG_FILE).backend
    key = new_model_key()
    _publish(storage, folder, key)
    attempts = 3
    try:
        for attempt in range(1, attempts + 1):
            try:
                with transaction(sessions) as session:
                    return register_model(
                        session, name=name, key=key, backend=backend, source="upload", role="imported",
                        info=info,
                    )  # fmt: skip
            except IntegrityError:  # a concurrent upload took this version number: try the next one
                if attempt == attempts:
                    raise Conflict(f"name: {name!r}: too many concurrent uploads; try again") from None
        raise AssertionError("unreachable")
    except BaseException:
        _unpublish(storage, key)
        raise


def upload_archive(
    sessions: sessionmaker[Session], storage: Storage, *, name: str, filename: str | None, source: IO[bytes]
) -> Model:
    """Register the model directory in the archive ``source`` as the next version of ``name``."""
    with _staging(storage) as staging:
        folder = staging / "model"
        folder.mkdir()
        sha256 = unpack_archive(filename, source, folder)
        info = check_model_dir(folder, sha256)
        info["uploaded"] = {"archive": filename}
        return _register(sessions, storage, folder, name, info)


def upload_detectron2(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    name: str,
    config: tuple[str | None, IO[bytes]],
    weights: tuple[str | None, IO[bytes]],
    categories: tuple[str | None, IO[bytes]] | None = None,
) -> Model:
    """Import a detectron2 config + weights (+ a COCO json whose ``categories`` are the label space) with
    :func:`distill.models.detectron2.import_detectron2_model` and register it as the next version of
    ``name``. The config must be self-contained (a ``_BASE_`` may only name a model-zoo config)."""
    config_suffix = _suffix(config[0], DETECTRON2_CONFIG_SUFFIXES, "config", "a detectron2 config")
    weights_suffix = _suffix(weights[0], DETECTRON2_WEIGHTS_SUFFIXES, "weights", "detectron2 weights")
    if categories is not None:
        _suffix(categories[0], (".json",), "categories", "a COCO json")
    reason = detectron2_unavailable()
    if reason is not None:
        raise InputError(f"{reason}: upload an archive of a distill model directory instead")
    from distill.models.detectron2 import import_detectron2_model

    with _staging(storage) as staging:
        inputs = staging / "inputs"
        inputs.mkdir()
        config_path = inputs / f"config{config_suffix}"
        weights_path = inputs / f"model_final{weights_suffix}"
        _copy(config[1], config_path, limit=MAX_TEXT_BYTES, label="config")
        _copy(weights[1], weights_path, limit=MAX_WEIGHTS_BYTES, label="weights")
        categories_path = None
        if categories is not None:
            categories_path = inputs / "categories.json"
            _copy(categories[1], categories_path, limit=MAX_TEXT_BYTES, label="categories")
        check_detectron2_weights(weights_path, "weights")
        labels = {config_path: "config", weights_path: "weights", categories_path: "categories"}
        folder = staging / "model"

        def relabel(message: str) -> str:
            for path, label in labels.items():
                if path is not None:
                    message = message.replace(str(path), label)
            return _relabel(message, staging)

        try:
            import_detectron2_model(config_path, weights_path, folder, categories_file=categories_path)
        except InputError as error:
            raise InputError(relabel(str(error))) from None
        except Exception as error:  # detectron2's own errors on a config or checkpoint it cannot use
            raise InputError(f"config: detectron2 cannot import it: {relabel(str(error))}") from None
        uploaded = {"config": config[0], "weights": weights[0], "categories": categories and categories[0]}
        meta = json.loads((folder / META_FILE).read_text())
        meta["imported_from"] = uploaded  # the uploaded names, not the staging paths
        _write_json(folder / META_FILE, meta)
        shutil.rmtree(inputs)
        info = check_model_dir(folder)
        info["uploaded"] = uploaded
        return _register(sessions, storage, folder, name, info)


def _write_json(path: Path, data: Any) -> None:
    temp = path.with_name(f".{path.name}.part")
    with temp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def write_model_archive(storage: Storage, model: Model) -> Path:
    """A new temporary ``.tar.gz`` of the model's loading files (:data:`MODEL_FILES` it has) inside one
    folder ``{name}-v{version}``, as ``POST /v1/models`` takes it back; the caller removes it."""
    if not storage.exists(model.key):
        raise NotFound(f"model {model.id}: its files are not in storage ({model.key})")
    folder = storage.local(model.key, members=list(MODEL_FILES))
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise NotFound(f"model {model.id}: {', '.join(missing)} not in storage ({model.key})")
    top = f"{model.name}-v{model.version}"
    fd, temp = tempfile.mkstemp(prefix="distill-model-", suffix=".tar.gz")
    os.close(fd)
    try:
        with tarfile.open(temp, "w:gz") as archive:
            for name in MODEL_FILES:
                if (folder / name).is_file():
                    archive.add(folder / name, arcname=f"{top}/{name}", recursive=False, filter=_anonymous)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)
