"""The storage seam: where steps read their inputs and write their artifacts.

A :class:`Storage` is an fsspec filesystem plus a root. Keys are ``/``-separated paths under the root (a
local storage also takes absolute paths, so the CLI's file arguments work unchanged). Torch and detectron2
code keep reading and writing local files: a step asks for a local copy of each input (:meth:`Storage.local`)
and a local place for each output (:meth:`Storage.output`), and publishes the output when it is complete
(:meth:`Storage.commit`). On a local folder all three are the path itself and nothing is copied; on any
other fsspec URL (``s3://bucket/distill``, ``memory://``, ...) inputs are downloaded into a cache folder and
outputs uploaded, the files that mark an artifact complete (:data:`COMMIT_LAST`) last, so that a reader never
sees a complete-looking artifact with files missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec

from distill.errors import InputError

__all__ = ["COMMIT_LAST", "Storage"]

logger = logging.getLogger(__name__)

# written last when a directory is uploaded: their presence says the artifact is complete
COMMIT_LAST = ("meta.json", "test.json")


class Storage:
    """Inputs and artifacts under ``url`` (a local folder or any fsspec URL); ``None``: local paths as given.

    ``cache_dir`` holds local copies of remote inputs and staged outputs (default: a folder under the system
    temp directory, one per URL). ``options``: keyword arguments of the fsspec filesystem (an S3
    ``endpoint_url``, an SFTP ``key_filename``, …); they may hold secrets and are never shown.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | Path | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        self.url = None if url is None else str(url)
        if self.url is None or "://" not in self.url or self.url.startswith("file://"):
            self.fs = fsspec.filesystem("file")
            root = "" if self.url is None else self.url.removeprefix("file://")
            self.root = str(Path(root).resolve()) if root else ""
        else:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **dict(options or {}))
            self.root = self.root.rstrip("/")
        tag = hashlib.sha256((self.url or "").encode()).hexdigest()[:12]
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "distill-storage" / tag)

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, key: str | os.PathLike[str]) -> str:
        """The full path of ``key`` in the filesystem."""
        key = str(key)
        if self.is_local and (os.path.isabs(key) or not self.root):
            return key
        if ".." in Path(key).parts:
            raise InputError(f"{key}: storage keys may not contain '..'")
        if not self.is_local and key.startswith("/"):
            raise InputError(
                f"{key}: an absolute path is not a key of {self.url}; give keys relative to the storage root"
            )
        return f"{self.root}/{key}" if self.root else key

    def describe(self, key: str | os.PathLike[str]) -> str:
        """``key`` as a URL, for messages."""
        return self.path(key) if self.is_local else self.fs.unstrip_protocol(self.path(key))

    def exists(self, key: str | os.PathLike[str]) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def local(self, key: str | os.PathLike[str], *, members: list[str] | None = None) -> Path:
        """A local path holding ``key`` (a file or a folder); remote files are downloaded into the cache, and
        downloaded again only when the remote file changed (its fsspec checksum: size, mtime or ETag).

        ``members``: for a folder, only these relative file names are fetched (a shard's images); names the
        folder lacks are left out (decoding then reports them missing, as it does for local files).
        """
        if self.is_local:
            return Path(self.path(key))
        remote = self.path(key)
        target = self._cache_path(key)
        if not self.fs.exists(remote):
            raise InputError(f"{self.describe(key)}: not found in storage")
        if self.fs.isdir(remote):
            target.mkdir(parents=True, exist_ok=True)
            names = members if members is not None else _relative_files(self.fs, remote)
            for name in names:
                if members is None or self.fs.exists(f"{remote}/{name}"):
                    self._fetch(f"{remote}/{name}", target / name)
                else:
                    logger.warning("%s/%s: not in storage", self.describe(key), name)
        else:
            self._fetch(remote, target)
        return target

    def output(self, key: str | os.PathLike[str]) -> Path:
        """A clean local path a step writes ``key`` to before :meth:`commit` (local storage: the path itself,
        as it is; remote: an empty place in the cache, so that nothing stale is published or resumed)."""
        if self.is_local:
            return Path(self.path(key))
        path = self._cache_path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
            _source_file(path).unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, key: str | os.PathLike[str]) -> None:
        """Publish what the step wrote at :meth:`output` (a no-op on local storage); a folder's
        :data:`COMMIT_LAST` files go last."""
        if self.is_local:
            return
        local = self._cache_path(key)
        remote = self.path(key)
        if local.is_dir():
            files = sorted(
                (p for p in local.rglob("*") if p.is_file() and not _is_source_file(p)),
                key=lambda p: (p.name in COMMIT_LAST, str(p)),
            )
            for file in files:
                self._upload(file, f"{remote}/{file.relative_to(local).as_posix()}")
        elif local.is_file():
            self._upload(local, remote)
        else:
            raise FileNotFoundError(f"{local}: nothing to commit for {key}")

    def _cache_path(self, key: str | os.PathLike[str]) -> Path:
        return self.cache_dir / str(key).lstrip("/")

    def _fetch(self, remote: str, local: Path) -> None:
        token = str(self.fs.checksum(remote))
        source = _source_file(local)
        if local.is_file() and source.is_file() and source.read_text() == token:
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".download")
        os.close(fd)
        try:
            self.fs.get_file(remote, temp)
            os.replace(temp, local)
        finally:
            Path(temp).unlink(missing_ok=True)
        source.write_text(token)
        logger.debug("fetched %s", remote)

    def _upload(self, local: Path, remote: str) -> None:
        parent = remote.rsplit("/", 1)[0]
        if parent and parent != remote:
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(local), remote)
        _source_file(local).write_text(str(self.fs.checksum(remote)))  # the cached copy is current


def _source_file(local: Path) -> Path:
    """Beside a cached file: the checksum of the remote file it is a copy of."""
    return local.with_name(f".{local.name}.source")


def _is_source_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".source")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _relative_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    root = root.rstrip("/")
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    return sorted(str(p)[len(prefix) :] for p in fs.find(root) if str(p).startswith(prefix))
