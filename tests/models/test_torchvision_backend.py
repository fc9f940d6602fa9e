from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from distill.backends import get_backend, list_backends, load_model
from distill.errors import InputError, ModelFileError
from distill.models.config import ModelConfig
from distill.models.files import load_init_weights
from distill.models.torchvision import TorchvisionDetector
from distill.train.torchvision import build_detector


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 150, 170, generator=generator), torch.rand(3, 160, 128, generator=generator)]


def test_staged_predict_equals_torchvision_forward(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    det = TorchvisionDetector(tiny_config.model_copy(update={"score_thresh": 0.0}))
    det.model.transform.min_size = (tiny_config.test_size,)
    images = _images()  # a landscape and a portrait image: predict batches each orientation on its own
    with torch.inference_mode():
        reference = [det.model([image.clone()])[0] for image in images]
    ours = det.predict(images)
    keypoint_label = tiny_config.category_ids.index(tiny_config.keypoint_category_ids[0])
    for ref, got in zip(reference, ours, strict=True):
        assert len(got) > 0
        assert torch.equal(ref["boxes"], got.boxes)
        assert torch.equal(ref["scores"], got.scores)
        assert torch.equal(ref["labels"] - 1, got.labels)
        sel = got.labels == keypoint_label
        assert torch.equal(ref["keypoints"][sel][..., :2], got.keypoints[sel][..., :2])
        assert torch.equal(ref["keypoints_scores"][sel], got.keypoints[sel][..., 2])
        # torchvision pastes masks into the image; ours stay in the box frame until export
        assert got.masks.shape == (len(got), 28, 28)
        assert torch.all((got.masks >= 0) & (got.masks <= 1))


def test_save_load_gives_identical_predictions(trained_tiny_model: Path, tmp_path: Path) -> None:
    det = load_model(trained_tiny_model)
    copy_dir = det.save(tmp_path / "copy")
    again = load_model(copy_dir)
    images = _images()
    for a, b in zip(det.predict(images), again.predict(images), strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.keypoints, b.keypoints) and torch.equal(a.masks, b.masks)


def test_truncated_weights_are_a_clear_error(trained_tiny_model: Path, tmp_path: Path) -> None:
    det = load_model(trained_tiny_model)
    target = det.save(tmp_path / "m")
    weights = target / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"weights\.pt: cannot read weights"):
        load_model(target)


def test_weights_from_another_config_are_rejected(trained_tiny_model: Path, tmp_path: Path) -> None:
    det = load_model(trained_tiny_model)
    target = det.save(tmp_path / "m")
    config_file = target / "config.yaml"
    config_file.write_text(config_file.read_text().replace("fpn_channels: 32", "fpn_channels: 48"))
    with pytest.raises(ModelFileError, match=r"do not match the config.*another shape"):
        load_model(target)


def test_missing_and_invalid_model_dirs(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a model directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text(
        "backbone: resnet9000\nclass_names: [a]\ncategory_ids: [1]\n"
    )
    with pytest.raises(InputError, match=r"config\.yaml: backbone"):
        load_model(tmp_path / "bad")


def test_init_from_backbone_checkpoint(tiny_config: ModelConfig, tmp_path: Path) -> None:
    classifier = resnet18(weights=None)
    torch.nn.init.constant_(classifier.conv1.weight, 0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    det = build_detector(tiny_config, init=str(path))
    assert torch.all(det.model.backbone.body.conv1.weight == 0.125)
    counts = load_init_weights(det, path)
    assert counts["loaded"] > 50 and counts["skipped"] == 2  # the classifier's fc.weight / fc.bias
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ModelFileError, match="no tensor matches"):
        build_detector(tiny_config, init=str(tmp_path / "other.pth"))


def test_config_validation_messages() -> None:
    with pytest.raises(InputError, match="class_names has 2 entries but category_ids has 1"):
        ModelConfig.from_dict({"class_names": ["a", "b"], "category_ids": [1]})
    with pytest.raises(InputError, match="names an unknown keypoint"):
        ModelConfig.from_dict(
            {
                "class_names": ["p"],
                "category_ids": [1],
                "keypoint_names": ["a"],
                "keypoint_category_ids": [1],
                "keypoint_flip_map": [["a", "b"]],
            }
        )


def test_keypoint_flip_indices_swap_pairs(tiny_config: ModelConfig) -> None:
    names = tiny_config.keypoint_names
    perm = tiny_config.keypoint_flip_indices()
    assert names[perm[names.index("left_hand")]] == "right_hand"
    assert names[perm[names.index("head")]] == "head"
    assert sorted(perm) == list(range(len(names)))


def test_mobilenet_and_resnet50_build_and_run(tiny_config: ModelConfig) -> None:
    for backbone in ("mobilenet_v3_large", "resnet50"):
        cfg = tiny_config.model_copy(update={"backbone": backbone, "fpn_channels": 256, "score_thresh": 0.0})
        det = TorchvisionDetector(cfg)
        out = det.predict([torch.rand(3, 96, 112)])
        assert len(out) == 1 and out[0].boxes.shape[1] == 4


def test_a_detectron2_model_directory_without_detectron2_says_what_is_missing(tmp_path: Path) -> None:
    import importlib.util

    from distill.errors import ModelFileError
    from distill.models.config import Detectron2ModelConfig, load_model_config

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    config = Detectron2ModelConfig(class_names=["person"], category_ids=[1], test_size=640)
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    assert load_model_config(tmp_path / "config.yaml") == config
    with pytest.raises(
        ModelFileError,
        match=r"config\.yaml: backend 'detectron2' is unavailable: the detectron2 backend needs",
    ):
        load_model(tmp_path)
    # the registry lists it with the reason, and a backend nobody knows is named as such
    assert list_backends()["torchvision"] is None and "not installed" in list_backends()["detectron2"]
    with pytest.raises(ModelFileError, match=r"unknown backend 'mmdet'; known: torchvision, detectron2"):
        get_backend("mmdet")


def test_an_imported_detectron2_teacher_gives_its_student_its_own_schedule(tmp_path: Path) -> None:
    """Without ``teacher.iterations``, an imported detectron2 teacher (no training record) has the schedule of
    its detectron2 config, not the synth recipe's (which the student's 1.5x would then be taken of)."""
    import yaml

    from distill.models.config import Detectron2ModelConfig
    from distill.pipeline import PipelineConfig, student_iterations, teacher_iterations

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    config = Detectron2ModelConfig(class_names=["person"], category_ids=[1], test_size=640)
    (teacher / "config.yaml").write_text(config.to_yaml())
    (teacher / "detectron2.yaml").write_text(
        yaml.safe_dump({"SOLVER": {"MAX_ITER": 90000, "STEPS": [60000]}})
    )
    data = {"labeled": "l.json", "labeled_images": "i", "unlabeled": "u"}
    pipeline = PipelineConfig.model_validate({"data": data, "teacher": {"model": str(teacher)}})
    assert teacher_iterations(pipeline) == 90000 and student_iterations(pipeline) == 135000
    (teacher / "meta.json").write_text('{"backend": "detectron2", "training": {"iterations": 500}}')
    assert teacher_iterations(pipeline) == 500  # a trained one: its own record
