"""Atomic file writes.

Every writer here produces the complete new file or leaves the old one untouched: the data goes to a
temporary file in the destination's directory, is flushed and fsync'ed, and then replaces the destination
with :func:`os.replace` (atomic on POSIX and on Windows for files on the same volume). On any failure the
temporary file is removed. Missing parent directories are created.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

_TEMP_SUFFIX = ".tmp"


def _open_temp(directory: Path, name: str) -> tuple[int, Path]:
    """Create a fresh temporary file next to ``name`` (mode 0o666 minus the umask, like a plain open)."""
    for _ in range(100):
        temp = directory / f".{name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return fd, temp
    raise FileExistsError(f"could not create a unique temporary file in {directory}")


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    An existing file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    target = Path(path)
    if target.name in ("", ".", ".."):
        raise ValueError(f"not a file path: {str(path)!r}")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write a file over the directory {target}")
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        existing_mode: int | None = target.stat().st_mode & 0o7777
    except OSError:
        existing_mode = None
    fd, temp = _open_temp(directory, target.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if existing_mode is not None:
            os.chmod(temp, existing_mode)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_directory(directory)
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (encoded with ``encoding``, no newline translation)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> Path:
    """Serialise ``obj`` as strict JSON (UTF-8, key order kept, trailing newline) and write it atomically.

    The object is serialised completely before anything is written, so a value JSON cannot represent
    (``TypeError``) or a NaN/Infinity float (``ValueError``: strict JSON has no such numbers) leaves the
    previous file untouched.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")
