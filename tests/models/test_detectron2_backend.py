"""The detectron2 backend against detectron2 itself (skipped where detectron2 is not installed).

Random-init models from detectron2's model-zoo configs at small sizes. With random weights detectron2's
FrozenBatchNorm layers are identities and activations explode, so ``init_norm_statistics`` first sets each
norm layer's statistics from one forward pass (a data-dependent init): then the random model returns plenty of
finite detections to compare.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

with (
    warnings.catch_warnings()
):  # fvcore and detectron2 call torch.jit.script at import: deprecated in torch 2.14
    warnings.simplefilter("ignore", FutureWarning)
    pytest.importorskip("detectron2", reason="detectron2 is not installed (not on PyPI; see the README)")
    import detectron2.data
    import detectron2.modeling  # noqa: F401

from distill.backends import load_model
from distill.errors import Cancelled, InputError, ModelFileError
from distill.hooks import StepContext
from distill.models.detectron2 import Detectron2Detector, init_norm_statistics, load_cfg
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import ViewSet, parse_views

# detectron2 0.6 code that torch 2.14 warns about; not distill's
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:detectron2"),
]

SMALL = [
    "INPUT.MIN_SIZE_TEST", "160",
    "INPUT.MAX_SIZE_TEST", "256",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.WEIGHTS", "",
]  # fmt: skip
KEYPOINT_CONFIG = "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"
MASK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blur = torch.nn.AvgPool2d(9, stride=1, padding=4)  # smooth blobs rather than pure noise
    return [
        blur(torch.rand(1, 3, 150, 170, generator=generator))[0],
        blur(torch.rand(1, 3, 180, 128, generator=generator))[0],
    ]


def _detector(config: str, seed: int = 0) -> Detectron2Detector:
    torch.manual_seed(seed)
    detector = Detectron2Detector.from_cfg(load_cfg(config, SMALL))
    init_norm_statistics(detector, _images(seed))
    return detector


@pytest.fixture(scope="module")
def keypoint_detector() -> Detectron2Detector:
    return _detector(KEYPOINT_CONFIG)


@pytest.fixture(scope="module")
def mask_detector() -> Detectron2Detector:
    return _detector(MASK_CONFIG)


def test_the_label_space_comes_from_detectron2s_coco_metadata(
    keypoint_detector: Detectron2Detector, mask_detector: Detectron2Detector
) -> None:
    config = keypoint_detector.config
    assert config.class_names == ["person"] and config.category_ids == [1]
    assert len(config.keypoint_names) == 17 and ("left_eye", "right_eye") in config.keypoint_flip_map
    assert config.test_size == 160 and config.max_size == 256 and not config.masks
    assert len(mask_detector.class_names) == 80 and mask_detector.config.category_ids[-1] == 90
    assert mask_detector.has_masks and not mask_detector.has_keypoints


@torch.inference_mode()
def test_plain_view_equals_detectron2s_own_inference(keypoint_detector: Detectron2Detector) -> None:
    detector = keypoint_detector
    images = _images()
    ours = detector.predict(images)
    inputs = [
        {"image": detector.resize(image)[0], "height": image.shape[1], "width": image.shape[2]}
        for image in images
    ]
    # a landscape and a portrait image: predict batches each orientation on its own
    theirs = [detector.model.inference([one])[0]["instances"] for one in inputs]
    for o, t in zip(ours, theirs, strict=True):
        assert len(o) >= 10 and len(o) == len(t)
        assert torch.allclose(o.boxes, t.pred_boxes.tensor, atol=1e-3)
        assert torch.equal(o.scores, t.scores) and torch.equal(o.labels, t.pred_classes)
        assert torch.allclose(o.keypoints, t.pred_keypoints, atol=1e-3)


@torch.inference_mode()
def test_mask_probabilities_equal_detectron2s_on_its_own_boxes(mask_detector: Detectron2Detector) -> None:
    detector = mask_detector
    images = _images(1)
    batch = detector.prepare(images)
    raw = detector.model.inference(
        [{"image": detector.resize(image)[0]} for image in images], do_postprocess=False
    )
    feats = detector.features(batch)
    dets = detector.detect(feats, batch)
    probs = detector.mask_probs(feats, batch, [d.boxes for d in dets], [d.labels for d in dets])
    for d, p, r in zip(dets, probs, raw, strict=True):
        assert len(d) >= 10
        assert torch.equal(d.boxes, r.pred_boxes.tensor) and torch.equal(d.labels, r.pred_classes)
        assert torch.allclose(p, r.pred_masks[:, 0], atol=1e-5)


def test_one_view_of_the_engine_equals_plain_inference(keypoint_detector: Detectron2Detector) -> None:
    detector = keypoint_detector
    views = parse_views("none", test_size=detector.config.test_size, max_size=detector.config.max_size)
    images = _images(2)
    plain = detector.predict(images, score_thresh=0.0)
    fused = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0)).predict(images)
    for p, f in zip(plain, fused, strict=True):
        d = f.detections
        assert len(p) > 0
        assert torch.equal(p.boxes, d.boxes) and torch.equal(p.scores, d.scores)
        assert torch.equal(p.keypoints, d.keypoints)


def test_a_flipped_view_unflips_boxes_and_swaps_left_right_keypoints(
    keypoint_detector: Detectron2Detector,
) -> None:
    detector = keypoint_detector
    image = _images(3)[0]
    # views at the image's own size: both paths decode heatmaps on the same pixel grid, so the random model's
    # rather flat heatmaps cannot let the argmax jump between grids
    size, cap = min(image.shape[1:]), max(image.shape[1:])
    every = FusionConfig(view_score_thresh=0.0)
    plain = MultiViewEngine(detector, parse_views(f"{size}", test_size=size, max_size=cap), every)
    a = plain.predict([image])[0].detections
    both = parse_views(f"{size}:flip", test_size=size, max_size=cap)
    flip_only = ViewSet(tuple(v for v in both if v.flip), size, "flip only")
    # the flipped view of the mirrored image is exactly what the plain view sees
    b = MultiViewEngine(detector, flip_only, every).predict([image.flip(-1)])[0].detections
    width = image.shape[-1]
    assert len(a) > 0 and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    mirrored = torch.stack([width - a.boxes[:, 2], a.boxes[:, 1], width - a.boxes[:, 0], a.boxes[:, 3]], 1)
    assert torch.allclose(b.boxes, mirrored, atol=1e-3)
    flip = torch.tensor(detector.config.keypoint_flip_indices())
    ka, kb = a.keypoints, b.keypoints
    swapped = torch.hypot(kb[..., 0] - (width - ka[:, flip, 0]), kb[..., 1] - ka[:, flip, 1])
    unswapped = torch.hypot(kb[..., 0] - (width - ka[..., 0]), kb[..., 1] - ka[..., 1])
    assert swapped.median() <= 1.5
    assert unswapped.median() > 3 * swapped.median() + 3.0


def test_save_then_load_gives_the_same_predictions(mask_detector: Detectron2Detector, tmp_path: Path) -> None:
    images = _images(4)
    before = mask_detector.predict(images)
    mask_detector.save(tmp_path / "model")
    assert (tmp_path / "model" / "detectron2.yaml").is_file()
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded, Detectron2Detector) and loaded.config == mask_detector.config
    after = loaded.predict(images)
    for x, y in zip(before, after, strict=True):
        assert len(x) > 0
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores)
        assert torch.equal(x.masks, y.masks)


def test_weights_of_another_config_are_refused_with_the_tensor_named(
    keypoint_detector: Detectron2Detector, tmp_path: Path
) -> None:
    cfg = load_cfg(
        KEYPOINT_CONFIG, [*SMALL, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "5", "MODEL.DEVICE", "cpu"]
    )
    other = tmp_path / "other.pth"
    from detectron2.modeling import build_model

    torch.save({"model": build_model(cfg).state_dict()}, other)
    with pytest.raises(ModelFileError, match=r"other\.pth: weights do not match the config: .*score_lowres"):
        keypoint_detector.load_weights(other)
    own = tmp_path / "own.pth"
    torch.save({"model": keypoint_detector.model.state_dict()}, own)
    counts = keypoint_detector.load_weights(own)
    assert counts["loaded"] == counts["model_tensors"] and counts["skipped"] == 0


def test_bad_configs_get_errors_that_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 3\n")
    with pytest.raises(InputError, match=r"bad\.yaml: .*MODEL\.NOT_A_KEY"):
        load_cfg(bad)
    with pytest.raises(InputError, match=r"no/such\.yaml: neither a config file nor a detectron2 model-zoo"):
        load_cfg("no/such.yaml")
    with pytest.raises(InputError, match=r"META_ARCHITECTURE is 'RetinaNet'.*distill fuse"):
        Detectron2Detector.from_cfg(
            load_cfg("COCO-Detection/retinanet_R_50_FPN_1x.yaml", ["MODEL.WEIGHTS", ""])
        )
    with pytest.raises(InputError, match=r"give the label space as a COCO json"):
        Detectron2Detector.from_cfg(load_cfg(KEYPOINT_CONFIG, [*SMALL, "DATASETS.TEST", "('mine',)"]))


def test_import_then_multi_view_predict_through_the_cli(
    keypoint_detector: Detectron2Detector, tmp_path: Path
) -> None:
    from PIL import Image

    weights = tmp_path / "model_final.pth"
    torch.save({"model": keypoint_detector.model.state_dict()}, weights)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(_images(5)):
        Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(images / f"{i}.png")

    overrides = [f"--set={k}={v}" for k, v in zip(SMALL[:-2:2], SMALL[1:-2:2], strict=True)]
    model = str(tmp_path / "m")
    proc = _cli("import-detectron2", KEYPOINT_CONFIG, "--weights", str(weights), "--out", model, *overrides)
    assert "1 classes, masks off, 17 keypoints, test size 160 (max 256)" in proc.stdout
    _cli(
        "predict", "--model", str(tmp_path / "m"), "--images", str(images),
        "--views", "0.75x,1x:flip", "--out", str(tmp_path / "R.json"),
    )  # fmt: skip
    results = json.loads((tmp_path / "R.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2}
    assert all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in results)


# -- training ------------------------------------------------------------------------------------------------
TRAIN = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "SOLVER.BASE_LR", "0.001",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.WEIGHTS", "",
]  # fmt: skip


def test_the_ratio_loader_mixes_labeled_and_pseudo_and_keeps_negatives(tiny_data: Path) -> None:
    from distill.data.coco import load_coco
    from distill.models.config import config_from_coco_categories
    from distill.train import detectron2 as d2train

    labeled = load_coco(tiny_data / "labeled.json")
    # the unlabeled split's truth as 'pseudo-labels', with the instances of a few images removed (negatives)
    pseudo = json.loads((tiny_data / "unlabeled_truth.json").read_text())
    negatives = {image["id"] for image in pseudo["images"][:3]}
    pseudo["annotations"] = [a for a in pseudo["annotations"] if a["image_id"] not in negatives]
    pseudo_file = tiny_data.parent / f"{tiny_data.name}_pseudo_negatives.json"
    pseudo_file.write_text(json.dumps(pseudo))

    space = config_from_coco_categories(labeled.categories)
    cfg = d2train._training_cfg(load_cfg(KEYPOINT_CONFIG, TRAIN), space, tiny_data, 10, 5, None, 0, "cpu")
    names = [
        d2train._register(tiny_data / "labeled.json", tiny_data / "images", space, "labeled"),
        d2train._register(pseudo_file, tiny_data / "images", space, "pseudo"),
    ]
    cfg.defrost()
    cfg.DATASETS.TRAIN = tuple(names)
    cfg.freeze()
    loader = iter(d2train._data_loader(cfg, names, (6, 4), 0, 0))
    pseudo_files = {image["file_name"] for image in pseudo["images"]}
    negative_files = {image["file_name"] for image in pseudo["images"] if image["id"] in negatives}
    counts, seen_negative = [0, 0], False
    for _ in range(10):
        for item in next(loader):
            name = Path(item["file_name"]).relative_to((tiny_data / "images").resolve()).as_posix()
            counts[name in pseudo_files] += 1
            seen_negative |= name in negative_files
            assert item["instances"].has("gt_keypoints") or len(item["instances"]) == 0
    assert counts == [30, 20]
    assert seen_negative, "pseudo-label images without instances must stay in the training set"


def test_a_short_training_run_lowers_the_loss_saves_a_model_and_resumes(
    tiny_data: Path, tmp_path: Path
) -> None:
    from distill.train.detectron2 import train_detectron2

    cfg = load_cfg(MASK_CONFIG, TRAIN)
    losses: list[float] = []
    out = tmp_path / "student"
    result = train_detectron2(
        cfg,
        tiny_data / "labeled.json",
        tiny_data / "images",
        out,
        pseudo_json=tiny_data / "unlabeled_truth.json",
        init="scratch",
        iterations=16,
        batch_size=2,
        context=StepContext(progress=lambda e: losses.append(e.values["total"])),
    )
    assert len(losses) == 16 and all(map(math.isfinite, losses))
    assert sum(losses[-4:]) < sum(losses[:4])
    detector = load_model(out)
    assert isinstance(detector, Detectron2Detector) and detector.config.class_names == [
        c["name"] for c in json.loads((tiny_data / "labeled.json").read_text())["categories"]
    ]
    assert len(detector.config.class_names) == detector.cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert (out / "checkpoints" / "model_final.pth").is_file()
    weights = (out / "weights.pt").read_bytes()
    again = train_detectron2(
        cfg, tiny_data / "labeled.json", tiny_data / "images", out,
        pseudo_json=tiny_data / "unlabeled_truth.json", init="scratch", iterations=16, batch_size=2,
    )  # fmt: skip
    assert again.iterations == result.iterations and (out / "weights.pt").read_bytes() == weights
    assert again.final_losses == result.final_losses  # the complete run's record is kept, not overwritten


def test_a_cancelled_training_run_saves_no_model_and_resumes_from_its_checkpoint(
    tiny_data: Path, tmp_path: Path
) -> None:
    from distill.models.files import is_complete
    from distill.train.detectron2 import train_detectron2

    cfg = load_cfg(MASK_CONFIG, TRAIN)
    out = tmp_path / "model"
    seen: list[int] = []
    stop = StepContext(progress=lambda e: seen.append(e.done), should_cancel=lambda: len(seen) >= 3)
    args = (cfg, tiny_data / "labeled.json", tiny_data / "images", out)
    with pytest.raises(Cancelled, match="detectron2 training at iteration 3 of 6"):
        train_detectron2(*args, init="scratch", iterations=6, batch_size=2, context=stop)
    assert not is_complete(out) and not (out / "weights.pt").exists()
    assert (out / "checkpoints" / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    result = train_detectron2(*args, init="scratch", iterations=6, batch_size=2)
    assert result.resumed_from == 3 and result.iterations == 6 and is_complete(out, 6)


def test_the_same_json_in_two_folders_registers_two_datasets(tiny_data: Path, tmp_path: Path) -> None:
    """A long-lived worker trains job after job in one process: an identical labeled json elsewhere, with
    its own images, must not reuse the first job's dataset (and image root)."""
    from detectron2.data import MetadataCatalog

    from distill.models.config import config_from_coco_categories
    from distill.train.detectron2 import _register

    first, second = tmp_path / "job1", tmp_path / "job2"
    for job in (first, second):
        (job / "images").mkdir(parents=True)
        (job / "labeled.json").write_bytes((tiny_data / "labeled.json").read_bytes())
    labels = config_from_coco_categories(json.loads((tiny_data / "labeled.json").read_text())["categories"])
    names = [_register(job / "labeled.json", job / "images", labels, "labeled") for job in (first, second)]
    assert names[0] != names[1]
    assert [MetadataCatalog.get(n).image_root for n in names] == [
        str(first / "images"),
        str(second / "images"),
    ]
    # the same json with another image root is another dataset too; the same pair is the same one
    other = _register(first / "labeled.json", second / "images", labels, "labeled")
    assert (
        other not in names
        and _register(first / "labeled.json", first / "images", labels, "labeled") == names[0]
    )


def test_distill_run_with_a_detectron2_teacher_trains_a_detectron2_student(
    tiny_data: Path, tmp_path: Path
) -> None:
    from distill.pipeline import PipelineConfig, run_pipeline

    teacher = tmp_path / "teacher"
    overrides = [f"--set={k}={v}" for k, v in zip(TRAIN[::2], TRAIN[1::2], strict=True)]
    proc = _cli(
        "train", "--backend", "detectron2", "--config", KEYPOINT_CONFIG, "--set", "MODEL.MASK_ON=True",
        *overrides, "--train", str(tiny_data / "labeled.json"), "--images", str(tiny_data / "images"),
        "--out", str(teacher), "--iterations", "4", "--init", "scratch",
    )  # fmt: skip
    assert "trained 4 iterations" in proc.stdout
    config = PipelineConfig.model_validate(
        {
            "data": {
                "labeled": tiny_data / "labeled.json",
                "labeled_images": tiny_data / "images",
                "unlabeled": tiny_data / "unlabeled.json",
                "unlabeled_images": tiny_data / "images",
                "test": tiny_data / "test.json",
                "test_images": tiny_data / "images",
            },
            "teacher": {"model": teacher},
            "inference": {"views": "1x:flip", "max_detections": 20},
            "student": {"iterations": 4},
        }
    )
    summary = run_pipeline(config, tmp_path / "run")
    round_1 = summary["rounds"][0]
    student = load_model(round_1["student"])
    assert isinstance(student, Detectron2Detector) and student.has_keypoints and student.has_masks
    meta = json.loads((Path(round_1["student"]) / "meta.json").read_text())
    assert meta["training"]["backend"] == "detectron2" and meta["training"]["ratio"] == [6.0, 4.0]
    assert meta["training"]["pseudo"].endswith("pseudo.json")
    pseudo = json.loads((tmp_path / "run" / "round_1" / "pseudo.json").read_text())
    assert len(pseudo["images"]) == len(json.loads((tiny_data / "unlabeled.json").read_text())["images"])
    assert set(round_1["metrics"]["student"]) >= {"bbox", "segm", "keypoints"}


def test_keypoint_decoding_equals_detectron2s_and_survives_huge_logits() -> None:
    from detectron2.structures.keypoints import heatmaps_to_keypoints

    from distill.models.detectron2 import decode_heatmaps_detectron2

    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 17, 56, 56, generator=generator) * 3
    boxes = torch.tensor(
        [[10.0, 20, 60, 90], [0, 0, 5.5, 7.2], [30, 30, 230, 130], [1, 2, 3, 4], [7, 7, 57, 57]]
    )
    ours = decode_heatmaps_detectron2(maps, boxes)
    theirs = heatmaps_to_keypoints(maps, boxes)[:, :, [0, 1, 3]]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    huge = decode_heatmaps_detectron2(maps * 1e4, boxes)  # detectron2's own asserts here (exp overflow)
    assert torch.isfinite(huge).all() and (huge[..., 2] <= 1).all()
