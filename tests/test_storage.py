"""The storage seam on a real non-local fsspec filesystem (``memory://``) and on local paths."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from distill.errors import InputError
from distill.storage import Storage


@pytest.fixture
def remote(tmp_path: Path) -> tuple[Storage, fsspec.AbstractFileSystem, str]:
    root = f"distill-test-{uuid.uuid4().hex[:8]}"
    storage = Storage(f"memory://{root}", cache_dir=tmp_path / "cache")
    return storage, fsspec.filesystem("memory"), f"/{root}"


def test_local_storage_is_the_paths_themselves(tmp_path: Path) -> None:
    storage = Storage()
    target = tmp_path / "a" / "b.json"
    assert storage.is_local and storage.local(target) == target and storage.output(target) == target
    rooted = Storage(tmp_path)
    assert rooted.local("a/b.json") == tmp_path / "a" / "b.json"
    with pytest.raises(InputError, match=r"may not contain '\.\.'"):
        rooted.path("../etc/passwd")


def test_a_changed_remote_file_of_the_same_size_is_fetched_again(remote) -> None:
    storage, fs, root = remote
    fs.pipe_file(f"{root}/models/m/weights.pt", b"AAAA")
    assert storage.local("models/m/weights.pt").read_bytes() == b"AAAA"
    fs.pipe_file(f"{root}/models/m/weights.pt", b"BBBB")  # another run wrote the key again
    again = Storage(storage.url, cache_dir=storage.cache_dir)  # another process, the same cache
    assert again.local("models/m/weights.pt").read_bytes() == b"BBBB"


def test_outputs_are_staged_clean_and_published_with_the_marker_last(remote) -> None:
    storage, fs, root = remote
    stale = storage.output("run/model")
    (stale / "checkpoint.pt").parent.mkdir(parents=True)
    (stale / "checkpoint.pt").write_bytes(b"old run")
    out = storage.output("run/model")  # a new attempt starts from nothing stale
    assert not out.exists()
    out.mkdir(parents=True)
    for name in ("meta.json", "weights.pt", "config.yaml"):
        (out / name).write_text(name)
    order: list[str] = []
    put = storage.fs.put_file
    storage.fs.put_file = lambda local, remote_path, **kw: (
        order.append(remote_path) or put(local, remote_path)
    )
    try:
        storage.commit("run/model")
    finally:
        storage.fs.put_file = put
    assert order[-1].endswith("/meta.json") and len(order) == 3  # no checksum side files uploaded
    assert fs.cat_file(f"{root}/run/model/weights.pt") == b"weights.pt"


def test_remote_keys_are_relative_and_missing_members_are_left_out(remote) -> None:
    storage, fs, root = remote
    with pytest.raises(InputError, match=r"an absolute path is not a key of memory://"):
        storage.local("/home/user/data/labeled.json")
    with pytest.raises(InputError, match=r"memory://.*/nope\.json: not found in storage"):
        storage.local("nope.json")
    fs.pipe_file(f"{root}/data/images/a.png", b"png")
    folder = storage.local("data/images", members=["a.png", "gone.png"])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["a.png"]
    assert storage.local("data/images", members=[]).is_dir()  # an empty shard still gets its folder
