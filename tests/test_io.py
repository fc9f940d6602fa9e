"""Atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from distill import io as distill_io
from distill.io import write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writes_create_parents_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    assert write_bytes_atomic(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    write_bytes_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    text_file = tmp_path / "t.txt"
    write_text_atomic(text_file, "héllo\nwörld\r\n")
    assert text_file.read_bytes() == "héllo\nwörld\r\n".encode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_json_round_trip_keeps_order_and_unicode(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    obj = {"z": 1, "a": [1.5, None, True], "ñ": "日本"}
    write_json_atomic(target, obj)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert list(json.loads(text)) == ["z", "a", "ñ"]
    assert "日本" in text and text.endswith("\n")
    write_json_atomic(target, obj, indent=2)
    assert target.read_text(encoding="utf-8").startswith('{\n  "z": 1')


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"ok": 1, "bad": object()}, TypeError),
        ({"loss": float("nan")}, ValueError),
        ({(1, 2): "x"}, TypeError),
    ],
    ids=["object", "nan", "tuple-key"],
)
def test_failed_serialisation_keeps_previous_file(
    tmp_path: Path, bad: object, error: type[Exception]
) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(error):
        write_json_atomic(target, bad)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failure_during_write_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.bin"
    write_bytes_atomic(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distill_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_failed_replace_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.txt"
    write_text_atomic(target, "old")

    def broken_replace(src: object, dst: object) -> None:
        raise PermissionError("denied")

    monkeypatch.setattr(distill_io.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_permissions_kept_and_new_files_follow_umask(tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    write_text_atomic(target, "a")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    os.chmod(target, 0o600)
    write_text_atomic(target, "b")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "b"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_bytes_atomic(tmp_path / "a", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "a", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(IsADirectoryError):
        write_bytes_atomic(tmp_path, b"x")
    assert list(tmp_path.iterdir()) == []
