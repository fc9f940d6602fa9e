"""The pseudo-label file: valid COCO, loads in pycocotools, ids that cannot collide, provenance, artifacts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from distill.data.coco import CocoDataset, coco_statistics, encode_mask, load_coco
from distill.errors import InputError
from distill.pseudo.calibrate import calibrate
from distill.pseudo.labels import build_pseudo_labels
from distill.pseudo.make import make_pseudo_labels

PERSON_KPS = ["nose", "left_eye", "right_eye"]


def labeled_dataset() -> CocoDataset:
    return CocoDataset.from_dict(
        {
            "images": [{"id": 1, "file_name": "l1.png", "width": 20, "height": 10}],
            "annotations": [
                {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0},
                {
                    "id": 9,
                    "image_id": 1,
                    "category_id": 2,
                    "bbox": [5, 1, 4, 6],
                    "area": 24,
                    "iscrowd": 0,
                    "keypoints": [6, 2, 2, 7, 3, 2, 0, 0, 0],
                    "num_keypoints": 2,
                },
            ],
            "categories": [
                {"id": 1, "name": "disk"},
                {"id": 2, "name": "person", "keypoints": PERSON_KPS, "skeleton": []},
            ],
        }
    )


UNLABELED = [
    {"id": 1, "file_name": "u1.png", "width": 20, "height": 10},  # collides with the labeled image id 1
    {"id": 2, "file_name": "u2.png", "width": 20, "height": 10},
    {"id": 3, "file_name": "u3.png", "width": 20, "height": 10},  # no prediction: stays as a negative
]


def predictions() -> list[dict]:
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    return [
        {"image_id": 1, "category_id": 1, "bbox": [3, 2, 6, 4], "score": 0.9, "agreement": 1.0,
         "segmentation": encode_mask(mask)},
        {"image_id": 2, "category_id": 2, "bbox": [1, 1, 8, 8], "score": 0.8, "agreement": 0.5,
         "keypoints": [2, 2, 3.0, 3, 3, 0.5, 4, 4, 1.5]},
        {"image_id": 2, "category_id": 1, "bbox": [10, 1, 3, 3], "score": 0.1, "agreement": 0.25},
    ]  # fmt: skip


def test_kept_predictions_become_a_valid_coco_file_with_provenance() -> None:
    labeled = labeled_dataset()
    cal = calibrate(predictions(), labeled=coco_statistics(labeled), unlabeled_image_ids=[1, 2, 3])
    data = build_pseudo_labels(
        predictions(), images=UNLABELED, labeled=labeled, calibration=cal, provenance={"teacher": "T"}
    )
    # labeled density 2 per image x 3 images = 6 > 3 detections: all kept (at the floor)
    assert len(data["annotations"]) == 3
    assert data["info"]["teacher"] == "T" and data["info"]["counts"] == {"images": 3, "annotations": 3}
    # ids: annotations after the labeled max (9); image ids shifted past the labeled max because 1 collides
    assert [a["id"] for a in data["annotations"]] == [10, 11, 12]
    assert data["info"]["image_id_offset"] == 1
    assert [im["id"] for im in data["images"]] == [2, 3, 4]
    assert {a["image_id"] for a in data["annotations"]} == {2, 3}
    first, person = data["annotations"][0], data["annotations"][1]
    assert first["area"] == 24.0 and first["score"] == 0.9 and first["agreement"] == 1.0
    # keypoints: labeled mean 2 visible per person -> scores 3.0 and 1.5 kept (v=2), 0.5 dropped (0,0,0)
    assert person["keypoints"] == [2, 2, 2, 0, 0, 0, 4, 4, 2]
    assert person["num_keypoints"] == 2 and person["area"] == 64.0
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = data
        api.createIndex()
    assert len(api.getAnnIds(imgIds=[4])) == 0 and api.annToMask(api.anns[10]).sum() == 24


def test_unknown_category_is_an_input_error() -> None:
    labeled = labeled_dataset()
    bad = [{**predictions()[0], "category_id": 5}]
    cal = calibrate(bad, labeled=coco_statistics(labeled), unlabeled_image_ids=[1])
    with pytest.raises(InputError, match=r"R\.json: category ids \[5\]"):
        build_pseudo_labels(bad, images=UNLABELED, labeled=labeled, calibration=cal, source="R.json")


def _write_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    labeled = tmp_path / "labeled.json"
    labeled.write_text(json.dumps(labeled_dataset().data))
    unlabeled = tmp_path / "unlabeled.json"
    unlabeled.write_text(json.dumps({"images": UNLABELED, "annotations": [], "categories": []}))
    results = tmp_path / "R.json"
    results.write_text(json.dumps(predictions()))
    return labeled, unlabeled, results


def test_make_pseudo_labels_writes_the_file_and_the_calibration_artifacts(tmp_path: Path) -> None:
    labeled, unlabeled, results = _write_inputs(tmp_path)
    out = tmp_path / "P.json"
    cal = make_pseudo_labels(results, unlabeled=unlabeled, labeled_json=labeled, out=out, threshold=0.5)
    assert cal.mode == "fixed" and cal.kept_instances == 2
    pseudo = load_coco(out)
    assert len(pseudo.annotations) == 2 and len(pseudo.images) == 3
    assert pseudo.data["info"]["predictions"] == str(results)
    report = json.loads((tmp_path / "P.calibration.json").read_text())
    assert report["threshold"] == 0.5 and report["kept_instances"] == 2
    assert (tmp_path / "P.calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_the_teacher_could_not_read_is_not_pseudo_labeled(tmp_path: Path) -> None:
    """A stream's ``error`` line (an unreadable image) keeps that image out of the file and the per-image
    count: without a prediction it would otherwise train as an image with no objects."""
    labeled, unlabeled, _ = _write_inputs(tmp_path)
    stream = tmp_path / "R.jsonl"
    lines = [
        {"path": "u1.png", "file_name": "u1.png", "image_id": 1, "instances": predictions()[:1]},
        {"path": "u2.png", "file_name": "u2.png", "image_id": 2, "instances": []},
        {"path": "u3.png", "file_name": "u3.png", "image_id": 3, "error": "truncated file"},
    ]
    stream.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "P.json"
    cal = make_pseudo_labels(stream, unlabeled=unlabeled, labeled_json=labeled, out=out, threshold=0.5)
    assert [im["file_name"] for im in load_coco(out).images] == ["u1.png", "u2.png"]
    assert cal.kept_per_image == pytest.approx(0.5)  # 1 instance over the 2 readable images, not 3

    explicit = make_pseudo_labels(
        predictions(), unlabeled=unlabeled, labeled_json=labeled, out=tmp_path / "Q.json", threshold=0.5,
        unreadable=[2],
    )  # fmt: skip
    assert [im["file_name"] for im in load_coco(tmp_path / "Q.json").images] == ["u1.png", "u3.png"]
    assert explicit.kept_instances == 1  # image 2 and its prediction are out


def test_strict_mode_fails_on_a_health_warning_and_writes_nothing(tmp_path: Path) -> None:
    labeled, unlabeled, results = _write_inputs(tmp_path)
    out = tmp_path / "P.json"
    with pytest.raises(InputError, match="score floor"):
        make_pseudo_labels(results, unlabeled=unlabeled, labeled_json=labeled, out=out, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.json", "labeled.json", "unlabeled.json"]


def test_calibrate_min_agreement_writes_what_it_counted(tmp_path: Path) -> None:
    """``distill calibrate --min-agreement A``: a confident prediction seen by too few views is left out of
    the calibration *and* of the written file, so the file holds exactly the calibrated count."""
    from tests.test_cli import run

    labeled, unlabeled, results = _write_inputs(tmp_path)
    lonely = {"image_id": 3, "category_id": 1, "bbox": [2, 2, 5, 5], "score": 0.95, "agreement": 0.25}
    results.write_text(json.dumps([*predictions(), lonely]))
    out = tmp_path / "P.json"
    run(
        "calibrate", "--predictions", str(results), "--unlabeled", str(unlabeled), "--labeled", str(labeled),
        "--out", str(out), "--min-agreement", "0.5",
    )  # fmt: skip
    report = json.loads((tmp_path / "P.calibration.json").read_text())
    pseudo = load_coco(out)
    assert report["kept_instances"] == 2 == len(pseudo.annotations)
    assert sorted(a["agreement"] for a in pseudo.annotations) == [0.5, 1.0]
    assert pseudo.data["info"]["counts"]["annotations"] == 2
