"""Streaming multi-view inference over an image source: bounded memory, incremental atomic output, resumable.

Output is JSON lines, one per image, in the order of the image references::

    {"path": ..., "file_name": ..., "image_id": 7, "height": 240, "width": 320, "instances": [{COCO result +
     "agreement"}, ...]}
    {"path": ..., "file_name": ..., "image_id": 8, "error": "cannot identify image file"}   # undecodable

Lines go to ``OUT.partial`` (flushed and fsync'ed per batch); when every image is done the file is renamed to
``OUT``. Running again over the same references resumes after the last complete line (a torn last line is
dropped; images are matched by id and file name, so another machine's partial lines count too), and does
nothing when ``OUT`` already exists — so a redelivered shard overwrites, never duplicates. ``OUT.lock`` keeps
a second process off a stream that one is writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.data.images import ImageRef, decode_images
from distill.errors import DistillError
from distill.export import detections_to_coco
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_text_atomic
from distill.train.data import image_to_tensor
from distill.tta.engine import MultiViewEngine


@dataclass
class StreamResult:
    path: Path  # the final file (exists when complete)
    images_done: int
    images_total: int
    skipped: list[tuple[str, str]]  # (path, reason)


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def run_to_jsonl(
    engine: MultiViewEngine,
    refs: Sequence[ImageRef],
    out: str | Path,
    *,
    batch_size: int = 2,
    context: StepContext = NULL_CONTEXT,
) -> StreamResult:
    """Fused predictions of every image in ``refs`` as JSON lines at ``out`` (see the module docstring).

    Reports ``infer`` progress (images) after each batch; a cancel (``context``) raises
    :class:`~distill.errors.Cancelled` between batches, the lines written so far kept in ``OUT.partial``.
    """
    out = Path(out)
    if out.exists():
        lines = _read_lines(out)
        return StreamResult(out, len(lines), len(refs), _skipped(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run(engine, refs, out, batch_size, context)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``OUT.lock``: a second process on the same stream (a redelivered task while the first still
    runs) would rewrite the ``.partial`` the first appends to, and publish a short file."""
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistillError(f"{out}: another process is writing this predictions stream") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(
    engine: MultiViewEngine, refs: Sequence[ImageRef], out: Path, batch_size: int, context: StepContext
) -> StreamResult:
    partial = partial_path(out)
    done_lines = _read_lines(partial) if partial.exists() else []
    write_text_atomic(partial, "".join(json.dumps(line) + "\n" for line in done_lines))  # drops a torn line
    # an image is done when a line names it: by (image id, file name), which another machine's copy of the
    # same shard agrees on, or by path for lines of older versions
    done = {_line_key(line) for line in done_lines}
    todo = [r for r in refs if (r.image_id, r.file_name) not in done and r.path not in done]
    count = len(refs) - len(todo)
    with open(partial, "a") as handle:
        for start in range(0, len(todo), batch_size):
            context.check_cancelled(f"inference after {count} of {len(refs)} images ({partial} kept)")
            lines = _process(engine, todo[start : start + batch_size])
            handle.write("".join(json.dumps(line) + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
            count += len(lines)
            context.report("infer", count, len(refs))
    lines = _read_lines(partial)
    if len(lines) != len(refs):
        raise DistillError(f"{partial}: {len(lines)} lines for {len(refs)} images; delete it and run again")
    os.replace(partial, out)
    return StreamResult(out, count, len(refs), _skipped(lines))


def _line_key(line: dict) -> tuple[int | None, str] | str:
    return (line.get("image_id"), line["file_name"]) if "file_name" in line else line["path"]


def _process(engine: MultiViewEngine, refs: Sequence[ImageRef]) -> list[dict]:
    decoded, lines = [], {}
    for ref, image, error in decode_images(refs):
        if image is None:
            lines[ref.path] = {
                "path": ref.path,
                "file_name": ref.file_name,
                "image_id": ref.image_id,
                "error": error or "unreadable",
            }
        else:
            decoded.append((ref, image_to_tensor(image)))
    if decoded:
        predictions = engine.predict([t for _, t in decoded])
        for (ref, tensor), pred in zip(decoded, predictions, strict=True):
            height, width = int(tensor.shape[1]), int(tensor.shape[2])
            instances = detections_to_coco(
                pred.detections,
                image_id=ref.image_id or 0,
                height=height,
                width=width,
                config=engine.detector.config,
            )
            for instance, agree in zip(instances, pred.agreement.tolist(), strict=True):
                instance["agreement"] = round(agree, 4)
            lines[ref.path] = {
                "path": ref.path,
                "file_name": ref.file_name,
                "image_id": ref.image_id,
                "height": height,
                "width": width,
                "instances": instances,
            }
    return [lines[r.path] for r in refs]


def _read_lines(path: Path) -> list[dict]:
    lines = []
    with open(path) as handle:
        for text in handle:
            if not text.endswith("\n"):
                break  # torn write: the process died mid-line
            lines.append(json.loads(text))
    return lines


def _skipped(lines: list[dict]) -> list[tuple[str, str]]:
    return [(line["path"], line["error"]) for line in lines if "error" in line]


def read_unreadable(path: str | Path) -> list[int]:
    """Image ids of a JSON-lines file's images that could not be read (their lines carry an ``error``)."""
    return [line["image_id"] for line in _read_lines(Path(path)) if "error" in line]


def read_instances(path: str | Path) -> list[dict]:
    """Every fused instance of a JSON-lines file as a COCO result entry, its ``agreement`` kept."""
    return [dict(instance) for line in _read_lines(Path(path)) for instance in line.get("instances", [])]
