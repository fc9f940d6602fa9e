from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.data.coco import load_coco
from distill.errors import Cancelled, TrainingError
from distill.hooks import StepContext
from distill.models.config import ModelConfig
from distill.train.data import CocoDetectionDataset, hflip
from distill.train.loop import TrainConfig, lr_factor, train_detector
from distill.train.samplers import ShuffledBatchSampler
from distill.train.torchvision import build_detector


def _dataset(tiny_data: Path, config: ModelConfig) -> CocoDetectionDataset:
    return CocoDetectionDataset(load_coco(tiny_data / "labeled.json"), tiny_data / "images", config)


@pytest.mark.slow
def test_short_real_training_lowers_the_loss(
    tiny_data: Path, tiny_config: ModelConfig, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    detector = build_detector(tiny_config)
    cfg = TrainConfig(
        iterations=40, batch_size=4, base_lr=0.02, warmup_iters=5, log_period=1, checkpoint_period=100
    )
    result = train_detector(detector, _dataset(tiny_data, tiny_config), cfg, tmp_path)
    totals = [h["total"] for h in result.history]
    assert len(totals) == 40
    first, last = sum(totals[:8]) / 8, sum(totals[-8:]) / 8
    assert last < 0.8 * first, f"loss went {first:.3f} -> {last:.3f}"
    assert (tmp_path / "checkpoint.pt").exists()


def test_resume_after_interruption_continues_the_same_trajectory(
    tiny_data: Path, tiny_config: ModelConfig, tmp_path: Path
) -> None:
    data = _dataset(tiny_data, tiny_config)
    cfg = TrainConfig(iterations=4, batch_size=2, base_lr=0.01, warmup_iters=2, checkpoint_period=2)

    torch.manual_seed(123)
    straight = build_detector(tiny_config)
    train_detector(straight, data, cfg, tmp_path / "straight")

    torch.manual_seed(123)
    interrupted = build_detector(tiny_config)
    calls = iter(range(100))
    stop = StepContext(should_cancel=lambda: next(calls) >= 2)
    with pytest.raises(Cancelled, match="training at iteration 2 of 4"):
        train_detector(interrupted, data, cfg, tmp_path / "resumed", context=stop)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    torch.manual_seed(999)  # a fresh process would not share our RNG state
    resumed = build_detector(tiny_config)
    result = train_detector(resumed, data, cfg, tmp_path / "resumed")
    assert result.resumed_from == 2 and result.iterations == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resume_with_another_config_is_refused(
    tiny_data: Path, tiny_config: ModelConfig, tmp_path: Path
) -> None:
    data = _dataset(tiny_data, tiny_config)
    train_detector(build_detector(tiny_config), data, TrainConfig(iterations=1, batch_size=1), tmp_path)
    with pytest.raises(TrainingError, match=r"another training config \(differs in \['base_lr'\]\)"):
        train_detector(
            build_detector(tiny_config), data, TrainConfig(iterations=1, batch_size=1, base_lr=0.5), tmp_path
        )


def test_non_finite_loss_stops_with_a_clear_error(
    tiny_data: Path, tiny_config: ModelConfig, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    detector = build_detector(tiny_config)
    cfg = TrainConfig(
        iterations=30, batch_size=2, base_lr=1e6, warmup_iters=0, clip_grad_norm=None, momentum=0.0
    )
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at iteration \d+ .*lower base_lr"):
        train_detector(detector, _dataset(tiny_data, tiny_config), cfg, tmp_path)


def test_hflip_mirrors_boxes_masks_and_swaps_keypoints() -> None:
    image = torch.zeros(3, 10, 20)
    image[:, :, :5] = 1.0
    target = {
        "boxes": torch.tensor([[2.0, 1.0, 6.0, 4.0]]),
        "masks": torch.zeros(1, 10, 20, dtype=torch.uint8),
        "keypoints": torch.tensor([[[3.0, 2.0, 2.0], [5.0, 3.0, 1.0], [0.0, 0.0, 0.0]]]),
    }
    target["masks"][0, 1:4, 2:6] = 1
    flipped_image, flipped = hflip(image, target, [1, 0, 2])
    assert torch.all(flipped_image[:, :, 15:] == 1.0) and torch.all(flipped_image[:, :, :15] == 0.0)
    assert flipped["boxes"].tolist() == [[14.0, 1.0, 18.0, 4.0]]
    assert flipped["masks"][0, 1:4, 14:18].all() and flipped["masks"].sum() == 12
    # keypoint 0 (x=3) and 1 (x=5) swap names; positions mirror; the unlabeled one stays at (0, 0, 0)
    assert flipped["keypoints"][0].tolist() == [[15.0, 3.0, 1.0], [17.0, 2.0, 2.0], [0.0, 0.0, 0.0]]


def test_sampler_resumes_at_the_same_batch() -> None:
    sampler = ShuffledBatchSampler(7, 3, seed=5)
    stream = sampler.batches(0)
    first_ten = [next(stream) for _ in range(10)]
    later = sampler.batches(6)
    assert [next(later) for _ in range(4)] == first_ten[6:]
    flat = [i for batch in first_ten[:7] for i in batch]  # 21 draws = 3 full epochs of 7
    assert all(sorted(flat[k * 7 : (k + 1) * 7]) == list(range(7)) for k in range(3))


def test_lr_schedule_warmup_then_cosine_or_steps() -> None:
    cfg = TrainConfig(iterations=100, warmup_iters=10, warmup_factor=0.1, schedule="step", steps=[0.5, 0.8])
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(49, cfg) == 1.0 and lr_factor(50, cfg) == pytest.approx(0.1)
    assert lr_factor(80, cfg) == pytest.approx(0.01)
    cosine = TrainConfig(iterations=100, warmup_iters=0, schedule="cosine")
    assert lr_factor(50, cosine) == pytest.approx(0.5)


def test_images_without_annotations_are_kept_as_negatives(tiny_data: Path, tiny_config: ModelConfig) -> None:
    dataset = load_coco(tiny_data / "labeled.json")
    dataset.data["annotations"] = [a for a in dataset.annotations if a["image_id"] != dataset.images[0]["id"]]
    kept = CocoDetectionDataset(dataset, tiny_data / "images", tiny_config, keep_empty=True)
    dropped = CocoDetectionDataset(dataset, tiny_data / "images", tiny_config, keep_empty=False)
    assert len(kept) == len(dataset.images) and len(dropped) == len(dataset.images) - 1
    image, target = kept[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, *image.shape[1:])
