"""The step layer: a round run step by step (inference in shuffled, repeated shards) equals the in-process
pipeline; every kind of step stops on a cancel without leaving anything that claims completeness, and
resumes; the storage seam runs the same steps against a non-local fsspec filesystem."""

from __future__ import annotations

import json
import logging
import random
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from distill import steps
from distill.cli import app
from distill.data.coco import load_coco
from distill.data.synthetic import generate
from distill.errors import Cancelled, InputError
from distill.hooks import StepContext
from distill.layout import RunLayout
from distill.models.files import is_complete
from distill.pipeline import (
    PipelineConfig,
    evaluate_spec,
    infer_spec,
    pseudo_label_spec,
    run_pipeline,
    student_train_spec,
)
from distill.specs import EvaluateSpec, InferenceSpec, InferSpec, PseudoLabelSpec, TrainSpec
from distill.storage import Storage
from tests.conftest import TINY_MODEL

STUDENT_TRAIN = {"batch_size": 2, "base_lr": 0.01, "warmup_iters": 2, "checkpoint_period": 1000}
VIEWS = InferenceSpec(views="1x,1.25x:flip", batch_size=1, max_detections=20, view_score_thresh=0.0)


def pipeline_config(tmp_path: Path, tiny_data: Path, teacher: Path, **sections) -> PipelineConfig:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": STUDENT_TRAIN}))
    images = str(tiny_data / "images")
    return PipelineConfig.model_validate(
        {
            "data": {
                "labeled": str(tiny_data / "labeled.json"),
                "labeled_images": images,
                "unlabeled": str(tiny_data / "unlabeled.json"),
                "unlabeled_images": images,
                "test": str(tiny_data / "test.json"),
                "test_images": images,
            },
            "teacher": {"model": str(teacher), "recipe": str(recipe)},
            "inference": VIEWS.model_dump(),
            "student": {"iterations": 4, "ratio": [6, 4]},
            **sections,
        }
    )


def without_info(path: str | Path) -> dict:
    """A pseudo-label file without its ``info`` (creation date, the predictions' file names)."""
    data = json.loads(Path(path).read_text())
    calibration = data.pop("info")["calibration"]
    return {**data, "calibration": calibration}


class CancelAfter:
    """A cancel request that arrives after ``n`` progress events of ``stage``."""

    def __init__(self, n: int, stage: str) -> None:
        self.n, self.stage, self.seen = n, stage, 0

    def progress(self, event) -> None:
        self.seen += event.stage == self.stage

    def context(self) -> StepContext:
        return StepContext(progress=self.progress, should_cancel=lambda: self.seen >= self.n)


@pytest.mark.slow
def test_a_round_step_by_step_equals_the_in_process_pipeline(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    config = pipeline_config(tmp_path, tiny_data, trained_tiny_model)
    summary = run_pipeline(config, tmp_path / "run")
    in_process = RunLayout(str(tmp_path / "run")).round(1)

    layout = RunLayout(str(tmp_path / "steps")).round(1)
    teacher = str(trained_tiny_model)
    specs = [infer_spec(config, teacher, layout.shard(i, 3), shard=(i, 3)) for i in range(3)]
    order = [0, 1, 2]
    random.Random(7).shuffle(order)
    done = {i: steps.infer(specs[i]) for i in order}
    assert not any(r.reused for r in done.values())
    assert sum(r.info["images"] for r in done.values()) == len(load_coco(tiny_data / "unlabeled.json").images)
    # a redelivered shard finds its output complete; one whose output was lost recomputes the same bytes
    assert steps.infer(specs[order[0]]).reused
    first = Path(layout.shard(order[1], 3)).read_bytes()
    Path(layout.shard(order[1], 3)).unlink()
    steps.infer(specs[order[1]])
    assert Path(layout.shard(order[1], 3)).read_bytes() == first

    labeled = steps.pseudo_label(pseudo_label_spec(config, teacher, layout.shards(3), layout.pseudo))
    assert without_info(layout.pseudo) == without_info(in_process.pseudo)
    assert labeled.metrics["kept_instances"] == summary["rounds"][0]["calibration"]["kept_per_image"] * 24

    student = steps.train(student_train_spec(config, teacher, layout.pseudo, layout.student))
    assert student.info["iterations"] == 4 and is_complete(layout.student, 4)
    mine = torch.load(Path(layout.student) / "weights.pt", weights_only=True)
    theirs = torch.load(Path(in_process.student) / "weights.pt", weights_only=True)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # same pseudo-labels, same seed: same model
    metrics = steps.evaluate(evaluate_spec(config, layout.student, layout.student_metrics)).metrics
    assert metrics == summary["rounds"][0]["metrics"]["student"]
    assert steps.evaluate(evaluate_spec(config, layout.student, layout.student_metrics)).reused


def test_shards_cover_every_item_exactly_once() -> None:
    for items in (0, 1, 5, 24, 101):
        for count in (1, 2, 3, 7, 40):
            covered = [i for s in range(count) for i in range(items)[steps.shard_slice(items, (s, count))]]
            assert covered == list(range(items))


def test_cancelled_training_saves_no_model_and_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_data: Path
) -> None:
    spec = TrainSpec(
        out=str(tmp_path / "model"),
        labeled=str(tiny_data / "labeled.json"),
        labeled_images=str(tiny_data / "images"),
        config="synth",
        iterations=5,
        model_overrides=TINY_MODEL,
        train_overrides=STUDENT_TRAIN,
    )
    with pytest.raises(Cancelled, match="training at iteration 3 of 5"):
        steps.train(spec, context=CancelAfter(3, "train").context())
    out = tmp_path / "model"
    assert not is_complete(out) and not (out / "weights.pt").exists() and not (out / "meta.json").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 3
    result = steps.train(spec)
    assert result.info == {"iterations": 5, "resumed_from": 3, "seconds": result.info["seconds"]}
    assert is_complete(out, 5) and steps.train(spec).reused


def test_cancelled_inference_keeps_its_lines_unpublished_and_resumes(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    spec = InferSpec(
        model=str(trained_tiny_model),
        images=str(tiny_data / "unlabeled.json"),
        images_dir=str(tiny_data / "images"),
        out=str(tmp_path / "a.jsonl"),
        shard=(1, 4),
        inference=VIEWS.model_copy(update={"batch_size": 2}),
    )
    with pytest.raises(Cancelled, match="inference after 2 of 6 images"):
        steps.infer(spec, context=CancelAfter(1, "infer").context())
    assert not (tmp_path / "a.jsonl").exists()
    assert len((tmp_path / "a.jsonl.partial").read_text().splitlines()) == 2
    steps.infer(spec)
    straight = steps.infer(spec.model_copy(update={"out": str(tmp_path / "b.jsonl")}))
    assert straight.info["images"] == 6
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_cancelled_pseudo_labelling_and_evaluation_write_nothing(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    predictions = steps.infer(
        InferSpec(
            model=str(trained_tiny_model),
            images=str(tiny_data / "unlabeled.json"),
            images_dir=str(tiny_data / "images"),
            out=str(tmp_path / "p.jsonl"),
            inference=VIEWS.model_copy(update={"views": "1x", "batch_size": 8}),
        )
    ).artifacts["predictions"]
    spec = PseudoLabelSpec(
        predictions=[predictions],
        unlabeled=str(tiny_data / "unlabeled.json"),
        labeled=str(tiny_data / "labeled.json"),
        out=str(tmp_path / "pseudo.json"),
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Cancelled, match="pseudo-labels"):
        steps.pseudo_label(spec, context=StepContext(should_cancel=lambda: True))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    made = steps.pseudo_label(spec)
    assert set(made.artifacts) == {"pseudo_labels", "calibration", "calibration_plot"}
    assert all(Path(p).is_file() for p in made.artifacts.values())

    evaluation = EvaluateSpec(
        model=str(trained_tiny_model),
        truth=str(tiny_data / "test.json"),
        images=str(tiny_data / "images"),
        out=str(tmp_path / "metrics.json"),
        batch_size=2,
    )
    with pytest.raises(Cancelled, match="evaluate after 4 of 12 images"):
        steps.evaluate(evaluation, context=CancelAfter(3, "evaluate").context())
    assert not (tmp_path / "metrics.json").exists()
    metrics = steps.evaluate(evaluation).metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics and metrics["bbox"]["AP"] >= 0


def test_cancelled_synthesis_writes_no_json_and_a_rerun_completes(tmp_path: Path) -> None:
    with pytest.raises(Cancelled, match="synthetic data after 5 of"):
        generate(tmp_path, preset="tiny", seed=3, context=CancelAfter(5, "synth").context())
    assert not list(tmp_path.glob("*.json"))
    result = generate(tmp_path, preset="tiny", seed=3)
    assert len(load_coco(result.test_json).images) == 12


@pytest.mark.slow
def test_steps_read_and_write_through_a_non_local_filesystem(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    """The same steps on an fsspec ``memory://`` store: inputs fetched, outputs published, same results."""
    url = f"memory://distill-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    for path in [*tiny_data.rglob("*"), *trained_tiny_model.rglob("*")]:
        if path.is_file():
            base = tiny_data if path.is_relative_to(tiny_data) else trained_tiny_model.parent
            prefix = "data" if base == tiny_data else "models"
            fs.pipe_file(f"/{root}/{prefix}/{path.relative_to(base).as_posix()}", path.read_bytes())
    storage = Storage(url, cache_dir=tmp_path / "cache")
    teacher = f"models/{trained_tiny_model.name}"
    assert storage.exists(f"{teacher}/weights.pt") and not storage.is_local
    infer = InferSpec(
        model=teacher, images="data/unlabeled.json", images_dir="data/images", out="run/shard-0.jsonl",
        shard=(0, 2), inference=VIEWS,
    )  # fmt: skip
    steps.infer(infer, storage)
    steps.infer(infer.model_copy(update={"shard": (1, 2), "out": "run/shard-1.jsonl"}), storage)
    folder = tmp_path / "cache" / "data" / "images" / "unlabeled"
    cached = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert len(cached) == 24  # the two shards' images, fetched one by one, no other split
    labeled = steps.pseudo_label(
        PseudoLabelSpec(
            predictions=["run/shard-0.jsonl", "run/shard-1.jsonl"],
            unlabeled="data/unlabeled.json",
            unlabeled_images="data/images",
            labeled="data/labeled.json",
            out="run/pseudo.json",
        ),
        storage,
    )
    assert fs.exists(f"/{root}/run/pseudo.json") and fs.exists(f"/{root}/run/pseudo.calibration.png")
    # the same on local files
    local = steps.infer(
        infer.model_copy(
            update={
                "model": str(trained_tiny_model),
                "images": str(tiny_data / "unlabeled.json"),
                "images_dir": str(tiny_data / "images"),
                "out": str(tmp_path / "all.jsonl"),
                "shard": (0, 1),
            }
        )
    )
    remote_lines = b"".join(fs.cat_file(f"/{root}/run/shard-{i}.jsonl") for i in range(2)).decode()
    strip = [{k: v for k, v in json.loads(t).items() if k != "path"} for t in remote_lines.splitlines()]
    mine = [
        {k: v for k, v in json.loads(t).items() if k != "path"}
        for t in Path(local.artifacts["predictions"]).read_text().splitlines()
    ]
    assert strip == mine
    student = TrainSpec(
        out="run/student", labeled="data/labeled.json", labeled_images="data/images",
        pseudo="run/pseudo.json", pseudo_images="data/images", config="synth", iterations=2,
        model_overrides=TINY_MODEL, train_overrides=STUDENT_TRAIN,
    )  # fmt: skip
    trained = steps.train(student, storage)
    assert trained.info["iterations"] == 2 and fs.exists(f"/{root}/run/student/meta.json")
    assert steps.train(student, storage).reused
    metrics = steps.evaluate(
        EvaluateSpec(model="run/student", truth="data/test.json", images="data/images", out="run/m.json"),
        storage,
    ).metrics
    assert json.loads(fs.cat_file(f"/{root}/run/m.json")) == metrics
    assert labeled.metrics["kept_instances"] > 0


# -- the inference cache -----------------------------------------------------------------------------------
CACHED = InferenceSpec(views="1x:flip", batch_size=2, max_detections=20, view_score_thresh=0.0)


def copy_images(tiny_data: Path, folder: Path) -> Path:
    """A copy of the unlabeled images (the same bytes at other paths)."""
    shutil.copytree(tiny_data / "images" / "unlabeled", folder / "unlabeled")
    return folder


def shard_names(tiny_data: Path) -> list[str]:
    return [im["file_name"] for im in load_coco(tiny_data / "unlabeled.json").images[:6]]  # shard 0 of 4


def cached_infer(
    tmp_path: Path,
    tiny_data: Path,
    model: Path,
    out: str,
    *,
    images: Path | None = None,
    cache: str = "cache",
    context: StepContext | None = None,
    **inference,
) -> steps.StepResult:
    """Shard 0 of 4 (six images) of the unlabeled split, cached under ``tmp_path / cache``."""
    spec = InferSpec(
        model=str(model),
        images=str(tiny_data / "unlabeled.json"),
        images_dir=str(images or tiny_data / "images"),
        out=str(tmp_path / out),
        shard=(0, 4),
        inference=CACHED.model_copy(update=inference),
        cache=str(tmp_path / cache),
    )
    return steps.infer(spec, context=context or StepContext())


def counts(result: steps.StepResult) -> tuple[int, int, int]:
    return result.info["cached"], result.info["inferred"], result.info["skipped"]


def without_paths(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(t).items() if k != "path"} for t in path.read_text().splitlines()]


def test_a_second_inference_over_the_same_images_reads_every_prediction_from_the_cache(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    plain = steps.infer(
        InferSpec(
            model=str(trained_tiny_model),
            images=str(tiny_data / "unlabeled.json"),
            images_dir=str(tiny_data / "images"),
            out=str(tmp_path / "plain.jsonl"),
            shard=(0, 4),
            inference=CACHED,
        )
    )
    assert plain.info["cached"] == 0 and plain.info["inferred"] == 6
    first = cached_infer(tmp_path, tiny_data, trained_tiny_model, "first.jsonl")
    assert counts(first) == (0, 6, 0) and first.info["images"] == 6
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    assert not any((tmp_path / f"first.jsonl.misses{end}").exists() for end in ("", ".partial"))
    events = []
    second = cached_infer(
        tmp_path, tiny_data, trained_tiny_model, "second.jsonl", context=StepContext(progress=events.append)
    )
    assert counts(second) == (6, 0, 0) and second.info["images"] == 6
    assert (tmp_path / "second.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()
    assert (events[-1].done, events[-1].total) == (6, 6)
    # the same bytes at other paths: cached, each line naming its own path
    elsewhere = cached_infer(
        tmp_path,
        tiny_data,
        trained_tiny_model,
        "copy.jsonl",
        images=copy_images(tiny_data, tmp_path / "copy"),
    )
    assert counts(elsewhere) == (6, 0, 0)
    lines = [json.loads(t) for t in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == [
        str(tmp_path / "copy" / name) for name in shard_names(tiny_data)
    ]
    assert without_paths(tmp_path / "copy.jsonl") == without_paths(tmp_path / "first.jsonl")
    # settings that only change the speed share the cache; one folder per model and settings
    assert counts(cached_infer(tmp_path, tiny_data, trained_tiny_model, "b.jsonl", batch_size=4)) == (6, 0, 0)
    (folder,) = (tmp_path / "cache").iterdir()
    assert json.loads((folder / "settings.json").read_text())["inference"]["fusion"] == "nms"
    assert len(list(folder.glob("??/*.json"))) == 6


def test_only_a_changed_image_is_inferred_again(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    images = copy_images(tiny_data, tmp_path / "copy")
    first = cached_infer(tmp_path, tiny_data, trained_tiny_model, "first.jsonl", images=images)
    changed = images / shard_names(tiny_data)[2]
    image = Image.open(changed).convert("RGB")
    image.putpixel((5, 5), (255, 0, 255))
    image.save(changed)
    second = cached_infer(tmp_path, tiny_data, trained_tiny_model, "second.jsonl", images=images)
    assert counts(first) == (0, 6, 0) and counts(second) == (5, 1, 0)
    before, after = without_paths(tmp_path / "first.jsonl"), without_paths(tmp_path / "second.jsonl")
    assert (
        before[:2] + before[3:] == after[:2] + after[3:] and after[2]["file_name"] == before[2]["file_name"]
    )


def test_other_views_fusion_or_model_infer_every_image(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    assert counts(cached_infer(tmp_path, tiny_data, trained_tiny_model, "a.jsonl")) == (0, 6, 0)
    assert counts(cached_infer(tmp_path, tiny_data, trained_tiny_model, "b.jsonl", views="1x")) == (0, 6, 0)
    assert counts(cached_infer(tmp_path, tiny_data, trained_tiny_model, "c.jsonl", fusion="wbf")) == (0, 6, 0)
    other = tmp_path / "other-model"
    shutil.copytree(trained_tiny_model, other)
    weights = torch.load(other / "weights.pt", weights_only=True)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] * 1.01
    torch.save(weights, other / "weights.pt")
    assert counts(cached_infer(tmp_path, tiny_data, other, "d.jsonl")) == (0, 6, 0)
    assert counts(cached_infer(tmp_path, tiny_data, other, "e.jsonl")) == (6, 0, 0)
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_a_corrupt_cache_entry_is_inferred_again_and_rewritten(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cached_infer(tmp_path, tiny_data, trained_tiny_model, "first.jsonl")
    entries = sorted((tmp_path / "cache").glob("*/??/*.json"))
    entries[0].write_text('{"height": 10, "instan')
    entries[1].write_text('{"height": 10}\n')
    with caplog.at_level(logging.WARNING, logger="distill"):
        second = cached_infer(tmp_path, tiny_data, trained_tiny_model, "second.jsonl")
    assert counts(second) == (4, 2, 0)
    assert sum("inference cache" in r.getMessage() for r in caplog.records) == 2
    assert (tmp_path / "second.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()
    assert counts(cached_infer(tmp_path, tiny_data, trained_tiny_model, "third.jsonl")) == (6, 0, 0)


def test_an_unreadable_image_is_never_cached(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    images = copy_images(tiny_data, tmp_path / "copy")
    (images / shard_names(tiny_data)[4]).write_bytes(b"not an image")
    (images / shard_names(tiny_data)[5]).unlink()
    first = cached_infer(tmp_path, tiny_data, trained_tiny_model, "first.jsonl", images=images)
    second = cached_infer(tmp_path, tiny_data, trained_tiny_model, "second.jsonl", images=images)
    assert counts(first) == (0, 4, 2) and counts(second) == (4, 0, 2)
    assert first.info["skipped_images"] == second.info["skipped_images"]
    assert [s["name"] for s in second.info["skipped_images"]] == shard_names(tiny_data)[4:]
    assert len(list((tmp_path / "cache").glob("*/??/*.json"))) == 4
    assert (tmp_path / "second.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()


def test_a_cancelled_cached_inference_resumes_its_misses(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    images = copy_images(tiny_data, tmp_path / "copy")
    cached_infer(tmp_path, tiny_data, trained_tiny_model, "first.jsonl", images=images)
    for name in shard_names(tiny_data)[:4]:  # four images change: four misses, two batches
        image = Image.open(images / name).convert("RGB")
        image.putpixel((0, 0), (1, 2, 3))
        image.save(images / name)
    with pytest.raises(Cancelled, match="inference after 2 of 4 images"):
        cached_infer(
            tmp_path, tiny_data, trained_tiny_model, "a.jsonl", images=images,
            context=CancelAfter(2, "infer").context(),
        )  # fmt: skip
    assert not (tmp_path / "a.jsonl").exists()
    assert len((tmp_path / "a.jsonl.misses.partial").read_text().splitlines()) == 2
    resumed = cached_infer(tmp_path, tiny_data, trained_tiny_model, "a.jsonl", images=images)
    assert counts(resumed) == (2, 4, 0)
    cached_infer(tmp_path, tiny_data, trained_tiny_model, "b.jsonl", images=images, cache="other")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_the_inference_cache_on_a_non_local_filesystem(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path
) -> None:
    url = f"memory://distill-cache-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    fs.pipe_file(f"/{root}/data/unlabeled.json", (tiny_data / "unlabeled.json").read_bytes())
    for name in shard_names(tiny_data):
        fs.pipe_file(f"/{root}/data/images/{name}", (tiny_data / "images" / name).read_bytes())
    for name in ("config.yaml", "weights.pt", "meta.json"):
        fs.pipe_file(f"/{root}/model/{name}", (trained_tiny_model / name).read_bytes())
    storage = Storage(url, cache_dir=tmp_path / "local")
    spec = InferSpec(
        model="model",
        images="data/unlabeled.json",
        images_dir="data/images",
        out="run/a.jsonl",
        shard=(0, 4),
        inference=CACHED,
        cache="cache/infer",
    )
    first = steps.infer(spec, storage)
    entries = [p for p in fs.find(f"/{root}/cache/infer") if not p.endswith("/settings.json")]
    assert len(entries) == 6
    fs.rm(entries[0])  # one entry lost
    second = steps.infer(spec.model_copy(update={"out": "run/b.jsonl"}), storage)
    assert counts(first) == (0, 6, 0) and counts(second) == (5, 1, 0)
    assert fs.cat_file(f"/{root}/run/b.jsonl") == fs.cat_file(f"/{root}/run/a.jsonl")
    assert fs.exists(entries[0]) and not fs.exists(f"/{root}/run/a.jsonl.misses")


def test_predict_caches_through_the_cli(tmp_path: Path, tiny_data: Path, trained_tiny_model: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in shard_names(tiny_data)[:3]:
        shutil.copy(tiny_data / "images" / name, folder)
    args = ["predict", "--model", str(trained_tiny_model), "--images", str(folder), "--views", "1x:flip"]
    args += ["--cache", str(tmp_path / "cache"), "--device", "cpu"]
    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.json")])
    second = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.json")])
    assert "0 images cached, 3 inferred" in first.stdout and "3 images cached, 0 inferred" in second.stdout
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    plain = CliRunner().invoke(app, [*args, "--views", "none", "--out", str(tmp_path / "c.json")])
    assert isinstance(plain.exception, InputError) and not (tmp_path / "c.json").exists()
