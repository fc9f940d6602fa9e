"""A whole distillation round on the ``tiny`` benchmark through ``distill run``, and the pipeline config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill.data.coco import load_coco
from distill.errors import InputError
from distill.pipeline import PipelineConfig, primary_metric
from tests.conftest import TINY_MODEL
from tests.test_cli import run

# the student starts from the trained tiny model and barely moves: it keeps that model's (small, non-zero) AP
STUDENT_TRAIN = {"batch_size": 2, "base_lr": 1e-5, "warmup_iters": 2, "checkpoint_period": 1000}


def write_pipeline(tmp_path: Path, tiny_data: Path, teacher: Path, **sections) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": STUDENT_TRAIN}))
    config = {
        "data": {
            "labeled": str(tiny_data / "labeled.json"),
            "labeled_images": str(tiny_data / "images"),
            "unlabeled": str(tiny_data / "unlabeled.json"),
            "unlabeled_images": str(tiny_data / "images"),
            "test": str(tiny_data / "test.json"),
            "test_images": str(tiny_data / "images"),
        },
        "teacher": {"model": str(teacher), "recipe": "recipe.yaml"},
        # every detection counts (a briefly trained teacher is unsure of all), so the target is reachable
        "inference": {
            "views": "1x,1.25x:flip",
            "batch_size": 4,
            "max_detections": 20,
            "view_score_thresh": 0.0,
        },
        "evaluation": {"primary": "bbox/AP50"},
        **sections,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def blind_teacher(trained_tiny_model: Path, tmp_path: Path) -> Path:
    """The trained tiny model with a plain-view score threshold no detection passes: it scores exactly 0 on
    the test split (so a student with any true positive must be promoted), while its multi-view inference,
    run at ``view_score_thresh`` 0, still yields pseudo-labels."""
    teacher = tmp_path / "blind_teacher"
    shutil.copytree(trained_tiny_model, teacher)
    config = yaml.safe_load((teacher / "config.yaml").read_text())
    (teacher / "config.yaml").write_text(yaml.safe_dump({**config, "score_thresh": 1.0}))
    return teacher


@pytest.mark.slow
def test_distill_run_promotes_hands_the_teacher_on_and_resumes_as_a_no_op(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, blind_teacher: Path
) -> None:
    student = {"iterations": 6, "ratio": [6, 4], "init": str(trained_tiny_model)}
    config = write_pipeline(tmp_path, tiny_data, blind_teacher, student=student, rounds=2)
    out = tmp_path / "run"
    proc = run("run", "--config", str(config), "--out", str(out), "--device", "cpu")
    assert "teacher vs student" in proc.stdout and "calibration (global)" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["rounds"]
    # round 1: the blind teacher scores 0, the student keeps the trained model's true positives
    assert first["primary"]["metric"] == "bbox/AP50" and first["primary"]["teacher"] == 0.0
    assert first["primary"]["student"] > 0 and first["promoted"] is True
    assert all(v == 0.0 for m in first["metrics"]["teacher"].values() for v in m.values())
    # round 2: its teacher is round 1's student, with round 1's metrics (not evaluated again)
    assert second["teacher"] == first["student"] == str(out / "round_1" / "student")
    assert second["metrics"]["teacher"] == first["metrics"]["student"]
    assert not (out / "round_2" / "teacher_metrics.json").exists()
    assert load_coco(out / "round_2" / "pseudo.json").data["info"]["teacher"] == first["student"]
    assert summary["final_model"] == (second["student"] if second["promoted"] else first["student"])
    # predictions for every unlabeled image, 4 views
    lines = (out / "round_1" / "predictions.jsonl").read_text().splitlines()
    unlabeled = load_coco(tiny_data / "unlabeled.json")
    assert len(lines) == len(unlabeled.images)
    assert (
        first["views"]["views"][0] == {"size": 160, "max_size": 320, "flip": False}
        and len(first["views"]["views"]) == 4
    )
    # the pseudo-labels: every unlabeled image, calibrated to the labeled density, provenance recorded
    pseudo = load_coco(out / "round_1" / "pseudo.json")
    assert len(pseudo.images) == len(unlabeled.images)
    labeled = load_coco(tiny_data / "labeled.json")
    target = len(labeled.annotations) / len(labeled.images) * len(unlabeled.images)
    calibration = json.loads((out / "round_1" / "pseudo.calibration.json").read_text())
    assert len(pseudo.annotations) == calibration["kept_instances"]
    assert not calibration["selections"]["all"]["at_floor"]
    assert abs(len(pseudo.annotations) - target) <= 3  # exact up to score ties
    assert pseudo.data["info"]["teacher"] == str(blind_teacher)
    assert pseudo.annotations and all(0 < a["agreement"] <= 1 for a in pseudo.annotations)
    student_meta = json.loads((out / "round_1" / "student" / "meta.json").read_text())
    assert student_meta["training"]["iterations"] == 6 and student_meta["training"]["ratio"] == [6.0, 4.0]
    report = (out / "report.md").read_text()
    assert report.count("round_1/pseudo.calibration.png") == 1 and "## Round 2" in report

    weights = out / "round_1" / "student" / "weights.pt"
    stamp = weights.stat().st_mtime_ns
    again = run("run", "--config", str(config), "--out", str(out), "--device", "cpu")
    assert "is complete" in again.stdout and "multi-view inference" not in again.stdout
    assert weights.stat().st_mtime_ns == stamp

    # distill calibrate on the same predictions: per class, exit 0, its own artifacts
    per_class = tmp_path / "P.json"
    proc = run(
        "calibrate",
        "--predictions", str(out / "round_1" / "predictions.jsonl"),
        "--unlabeled", str(tiny_data / "unlabeled.json"),
        "--labeled", str(tiny_data / "labeled.json"),
        "--out", str(per_class),
        "--per-class",
    )  # fmt: skip
    assert "calibration (per-class)" in proc.stdout
    report = json.loads((tmp_path / "P.calibration.json").read_text())
    assert report["mode"] == "per-class" and set(report["class_thresholds"]) == {"1", "2", "3", "4"}


@pytest.mark.slow
def test_a_student_that_does_not_win_by_min_gain_ends_the_run(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, blind_teacher: Path
) -> None:
    student = {"iterations": 2, "init": str(trained_tiny_model)}
    evaluation = {"primary": "bbox/AP50", "min_gain": 1.0}  # +100 AP points: impossible
    config = write_pipeline(
        tmp_path, tiny_data, blind_teacher, student=student, evaluation=evaluation, rounds=3
    )
    proc = run("run", "--config", str(config), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert "stopping after round 1: the student did not beat the teacher" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (only,) = summary["rounds"]
    assert only["primary"]["student"] > only["primary"]["teacher"] == 0.0  # it won, but not by min_gain
    assert only["promoted"] is False and summary["final_model"] == str(blind_teacher)
    assert not (tmp_path / "run" / "round_2").exists()


def test_calibrate_cli_rejects_conflicting_options(tmp_path: Path, tiny_data: Path) -> None:
    proc = run(
        "calibrate",
        "--predictions", str(tmp_path / "missing.json"),
        "--unlabeled", str(tiny_data / "unlabeled.json"),
        "--labeled", str(tiny_data / "labeled.json"),
        "--out", str(tmp_path / "P.json"),
        "--per-class", "--threshold", "0.5",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "exclude each other" in proc.stderr


def test_pipeline_config_errors_name_the_field_and_paths_resolve(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump({"data": {"labeled": "l.json", "labeled_images": "img", "unlabeled": "u"}})
    )
    config = PipelineConfig.from_yaml(path)
    assert config.data.labeled == tmp_path / "l.json" and config.student.ratio == (6.0, 4.0)
    path.write_text(yaml.safe_dump({"data": {"labeled": "l.json"}, "studnet": {}}))
    with pytest.raises(InputError, match=r"p\.yaml: data\.labeled_images: Field required \(3 problem"):
        PipelineConfig.from_yaml(path)
    path.write_text(
        yaml.safe_dump(
            {"data": {"labeled": "l", "labeled_images": "i", "unlabeled": "u"}, "student": {"ratio": 3}}
        )
    )
    with pytest.raises(InputError, match=r"student\.ratio"):
        PipelineConfig.from_yaml(path)


def test_a_run_directory_refuses_another_config_but_accepts_more_rounds(tmp_path: Path) -> None:
    from distill.pipeline import run_pipeline

    data = {"labeled": "l.json", "labeled_images": "i", "unlabeled": "u"}
    config = PipelineConfig.model_validate({"data": data, "student": {"ratio": [6, 4]}})
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    other = PipelineConfig.model_validate({"data": data, "student": {"ratio": [1, 1]}, "rounds": 3})
    with pytest.raises(InputError, match=r"another pipeline config \(differs in student\.ratio\)"):
        run_pipeline(other, out)
    more_rounds = PipelineConfig.model_validate({"data": data, "student": {"ratio": [6, 4]}, "rounds": 3})
    with pytest.raises(InputError, match=r"data\.labeled: l\.json does not exist"):  # past the config check
        run_pipeline(more_rounds, out)
    # the same files named by absolute paths are the same config
    absolute = {key: str(Path(value).resolve()) for key, value in data.items()}
    same = PipelineConfig.model_validate({"data": absolute, "student": {"ratio": [6, 4]}})
    with pytest.raises(InputError, match=r"data\.labeled: /.*l\.json does not exist"):
        run_pipeline(same, out)
    moved = PipelineConfig.model_validate({"data": {**absolute, "unlabeled": "/elsewhere/u"}})
    with pytest.raises(InputError, match=r"differs in data\.unlabeled\)"):
        run_pipeline(moved, out)
    # the feature cache changes speed, not results: a resumed run may change it
    cache = PipelineConfig.model_validate(
        {"data": data, "student": {"ratio": [6, 4]}, "inference": {"feature_cache_mb": 512}}
    )
    with pytest.raises(InputError, match=r"data\.labeled: l\.json does not exist"):
        run_pipeline(cache, out)
    # a run saved before a setting existed counts as having its default, and another value still differs
    saved = yaml.safe_load((out / "pipeline.yaml").read_text())
    del saved["inference"]["max_detections"], saved["inference"]["feature_cache_mb"]
    (out / "pipeline.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(InputError, match=r"data\.labeled: l\.json does not exist"):
        run_pipeline(config, out)
    fewer = PipelineConfig.model_validate(
        {"data": data, "student": {"ratio": [6, 4]}, "inference": {"max_detections": 20}}
    )
    with pytest.raises(InputError, match=r"differs in inference\.max_detections\)"):
        run_pipeline(fewer, out)


def test_the_promotion_metric_must_exist(tmp_path: Path) -> None:

    path = tmp_path / "p.yaml"
    data = {"labeled": "l", "labeled_images": "i", "unlabeled": "u"}
    path.write_text(yaml.safe_dump({"data": data, "evaluation": {"primary": "keypoint/AP"}}))
    with pytest.raises(InputError, match=r"evaluation\.primary: .*'keypoint/AP' is not IOU_TYPE/METRIC"):
        PipelineConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"data": data, "evaluation": {"primary": "bbox/AR"}}))
    with pytest.raises(InputError, match=r"evaluation\.primary"):
        PipelineConfig.from_yaml(path)
    assert primary_metric({"bbox": {"AP": 0.25}}, "bbox") == 0.25
    with pytest.raises(InputError, match=r"no keypoints results \(it is evaluated on bbox\)"):
        primary_metric({"bbox": {"AP": 0.25}}, "keypoints/AP")


def test_a_run_directory_refuses_data_or_recipes_changed_under_the_same_names(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill import recipes
    from distill.demo import synthetic_data_spec
    from distill.pipeline import inputs_record, run_pipeline

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    spec = synthetic_data_spec(data)
    config = PipelineConfig.model_validate({"data": spec, "teacher": {"recipe": "tiny"}})
    out = tmp_path / "run"
    out.mkdir()
    (out / "pipeline.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    (out / "inputs.json").write_text(json.dumps(inputs_record(config)))
    labeled = json.loads((data / "labeled.json").read_text())
    labeled["annotations"] = labeled["annotations"][:-1]  # one box fewer: another labeled split
    (data / "labeled.json").write_text(json.dumps(labeled))
    with pytest.raises(InputError, match=r"made from other inputs \(changed since: data\.labeled\)"):
        run_pipeline(config, out)
    (out / "inputs.json").write_text(json.dumps(inputs_record(config)))  # the run as if made from these
    changed = {**recipes.RECIPES["tiny"], "model": {**recipes.RECIPES["tiny"]["model"], "test_size": 192}}
    monkeypatch.setitem(recipes.RECIPES, "tiny", changed)  # an upgraded distill's built-in recipe
    with pytest.raises(InputError, match=r"changed since: teacher\.recipe\)"):
        run_pipeline(config, out)
    assert sorted(p.name for p in out.iterdir()) == ["inputs.json", "pipeline.yaml"]  # nothing else made


def test_benchmark_tags_change_with_the_preset_definition(monkeypatch) -> None:
    """``make demo`` names its datasets by this tag: an upgraded preset must not reuse an older one's."""
    import dataclasses

    from distill.data import synthetic
    from distill.demo import benchmark_tag

    tag = benchmark_tag("tiny", 0)
    assert tag.startswith("tiny-") and tag.endswith("-s0") and tag == benchmark_tag("tiny", 0)
    assert benchmark_tag("tiny", 1) != tag and benchmark_tag("demo", 0) != tag
    changed = dataclasses.replace(synthetic.PRESETS["tiny"], num_unlabeled=25)
    monkeypatch.setitem(synthetic.PRESETS, "tiny", changed)
    assert benchmark_tag("tiny", 0) != tag


def test_the_demo_refuses_a_run_directory_of_another_benchmark_before_touching_it(tmp_path: Path) -> None:
    from distill.data.synthetic import generate
    from distill.demo import run_demo

    out = tmp_path / "demo"
    generate(out / "data", preset="tiny", seed=0)
    (out / "pipeline.yaml").write_text("{}")  # a run was made here
    before = (out / "data" / "test.json").read_bytes()
    with pytest.raises(InputError, match=r"another version of the 'tiny' benchmark \(seed 1\)"):
        run_demo(out, preset="tiny", seed=1)
    assert (out / "data" / "test.json").read_bytes() == before  # not regenerated
