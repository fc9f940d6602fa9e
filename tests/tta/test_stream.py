from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.backends import load_model
from distill.data.images import iter_image_refs
from distill.errors import Cancelled
from distill.hooks import StepContext
from distill.tta.engine import MultiViewEngine
from distill.tta.stream import partial_path, read_instances, run_to_jsonl
from distill.tta.views import parse_views


def test_stream_is_resumable_reports_bad_files_and_never_duplicates(
    trained_tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    detector = load_model(trained_tiny_model)
    views = parse_views(
        "0.75x,1x:flip", test_size=detector.config.test_size, max_size=detector.config.max_size
    )
    engine = MultiViewEngine(detector, views)
    refs = iter_image_refs(tiny_data / "test.json", images_dir=tiny_data / "images")[:5]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    refs = [*refs[:2], type(refs[0])(image_id=99, path=str(bad), file_name="broken.png"), *refs[2:]]
    out = tmp_path / "pred.jsonl"

    calls = iter(range(100))
    with pytest.raises(Cancelled, match="inference after 2 of 6 images"):
        run_to_jsonl(
            engine, refs, out, batch_size=2, context=StepContext(should_cancel=lambda: next(calls) >= 1)
        )
    assert not out.exists() and len(partial_path(out).read_text().splitlines()) == 2
    with open(partial_path(out), "a") as handle:  # a crash mid-write leaves a torn line
        handle.write('{"path": "torn')

    second = run_to_jsonl(engine, refs, out, batch_size=2)
    assert second.images_done == len(refs) and out.exists() and not partial_path(out).exists()
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == [r.path for r in refs]  # each image once, in order
    assert second.skipped == [(str(bad), lines[2]["error"])]
    results = read_instances(out)
    agreement = [r.pop("agreement") for r in results]
    assert agreement and len(results) == len(agreement) and all(0.0 < a <= 1.0 for a in agreement)
    assert {r["image_id"] for r in results} <= {r.image_id for r in refs}

    again = run_to_jsonl(engine, refs, out, batch_size=2)  # a redelivered shard: nothing recomputed
    assert (
        again.images_done == len(refs) and out.read_text() == "\n".join(json.dumps(x) for x in lines) + "\n"
    )


def test_a_stream_resumes_after_another_machines_lines_and_refuses_a_second_writer(
    trained_tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    import fcntl

    from distill.errors import DistillError

    detector = load_model(trained_tiny_model)
    engine = MultiViewEngine(detector, parse_views("1x", test_size=160, max_size=320))
    refs = iter_image_refs(tiny_data / "test.json", images_dir=tiny_data / "images")[:4]
    out = tmp_path / "shard.jsonl"
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        run_to_jsonl(
            engine, refs, out, batch_size=2, context=StepContext(should_cancel=lambda: next(calls) >= 1)
        )
    # the partial lines as another worker wrote them: its own cache paths, the same ids and file names
    written = partial_path(out).read_text().splitlines()
    moved = [{**json.loads(t), "path": f"/elsewhere/{i}.png"} for i, t in enumerate(written)]
    partial_path(out).write_text("".join(json.dumps(line) + "\n" for line in moved))
    seen: list[int] = []
    predict = engine.predict
    engine.predict = lambda images: seen.append(len(images)) or predict(images)  # count what is recomputed
    run_to_jsonl(engine, refs, out, batch_size=2)
    assert seen == [2]  # only the two images the other worker had not done
    assert [json.loads(t)["file_name"] for t in out.read_text().splitlines()] == [r.file_name for r in refs]

    other = tmp_path / "busy.jsonl"
    with open(other.with_name(other.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DistillError, match="another process is writing this predictions stream"):
            run_to_jsonl(engine, refs, other, batch_size=2)
    assert not other.exists() and not partial_path(other).exists()
