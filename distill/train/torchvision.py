"""Training torchvision models: a detector on a COCO file, or a student on labeled + pseudo-labeled images.

Both build the model from a recipe (label space from the data), train it with :func:`train_detector`
(resuming ``OUT/checkpoint.pt``) and save the model directory with what it was trained on in ``meta.json``.
A cancelled run raises :class:`~distill.errors.Cancelled` and saves no model directory, only its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.data.coco import CocoDataset, load_coco
from distill.errors import InputError, ModelFileError
from distill.hooks import NULL_CONTEXT, StepContext
from distill.models.config import ModelConfig, config_from_coco_categories
from distill.models.files import file_sha256, load_init_weights
from distill.models.torchvision import TorchvisionDetector, imagenet_weights
from distill.recipes import load_recipe
from distill.train.data import CocoDetectionDataset
from distill.train.loop import TrainConfig, TrainResult, train_detector
from distill.train.samplers import RatioBatchSampler


def build_detector(
    config: ModelConfig, *, device: str | torch.device = "cpu", init: str = "scratch"
) -> TorchvisionDetector:
    """A new torchvision detector for ``config``; ``init`` is ``scratch``, ``imagenet`` or a weights path."""
    if init == "scratch":
        return TorchvisionDetector(config, device=device)
    if init == "imagenet":
        try:
            return TorchvisionDetector(
                config, device=device, backbone_weights=imagenet_weights(config.backbone)
            )
        except OSError as exc:  # URLError is an OSError
            raise ModelFileError(
                f"could not download ImageNet weights for {config.backbone} ({exc}); offline? "
                "pass --init PATH with a local state-dict file instead"
            ) from None
    detector = TorchvisionDetector(config, device=device)
    load_init_weights(detector, init)
    return detector


def recipe_configs(
    dataset: CocoDataset,
    recipe: str | None,
    train_overrides: dict | None = None,
    model_overrides: dict | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The model config (label space from ``dataset``) and training config of a recipe plus overrides."""
    spec = load_recipe(recipe)
    model_fields = {**spec["model"], **(model_overrides or {})}
    model_fields.setdefault("masks", any(a.get("segmentation") for a in dataset.annotations))
    config = config_from_coco_categories(dataset.categories, **model_fields)
    return config, TrainConfig.model_validate({**spec["train"], **(train_overrides or {})})


def train_model(
    train_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    recipe: str | None = None,
    init: str = "scratch",
    device: str = "cpu",
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    context: StepContext = NULL_CONTEXT,
) -> TrainResult:
    """Train a detector on a COCO dataset and save it as a model directory (resuming a checkpoint there)."""
    dataset = load_coco(train_json)
    config, train_cfg = recipe_configs(dataset, recipe, train_overrides, model_overrides)
    torch.manual_seed(train_cfg.seed)  # the initial weights too: the same spec trains the same model
    detector = build_detector(config, device=device, init=init)
    data = CocoDetectionDataset(dataset, images_dir, config, keep_empty=train_cfg.keep_empty_images)
    result = train_detector(detector, data, train_cfg, out_dir, context=context)
    _save_trained(detector, out_dir, result, train_cfg, init, train_json, images=len(data))
    return result


def train_student(
    labeled_json: str | Path,
    labeled_images: str | Path,
    pseudo_json: str | Path,
    pseudo_images: str | Path,
    out_dir: str | Path,
    *,
    recipe: str | None = None,
    init: str = "scratch",
    ratio: tuple[float, float] = (6.0, 4.0),
    device: str = "cpu",
    train_overrides: dict[str, Any] | None = None,
    model_overrides: dict[str, Any] | None = None,
    context: StepContext = NULL_CONTEXT,
) -> TrainResult:
    """Train a student on labeled + pseudo-labeled images, ``ratio`` = labeled : pseudo per minibatch.

    The label space is the labeled set's; images of the pseudo set without instances stay (negatives).
    """
    labeled = load_coco(labeled_json)
    pseudo = load_coco(pseudo_json)
    if [c["id"] for c in pseudo.categories] != [c["id"] for c in labeled.categories]:
        raise InputError(f"{pseudo_json}: categories differ from {labeled_json}'s")
    config, train_cfg = recipe_configs(labeled, recipe, train_overrides, model_overrides)
    torch.manual_seed(train_cfg.seed)  # the initial weights too: the same spec trains the same model
    detector = build_detector(config, device=device, init=init)
    labeled_data = CocoDetectionDataset(
        labeled, labeled_images, config, keep_empty=train_cfg.keep_empty_images
    )
    pseudo_data = CocoDetectionDataset(pseudo, pseudo_images, config, keep_empty=True)
    data = torch.utils.data.ConcatDataset([labeled_data, pseudo_data])
    sampler = RatioBatchSampler(
        [len(labeled_data), len(pseudo_data)], list(ratio), train_cfg.batch_size, seed=train_cfg.seed
    )
    result = train_detector(detector, data, train_cfg, out_dir, sampler=sampler, context=context)
    _save_trained(
        detector,
        out_dir,
        result,
        train_cfg,
        init,
        labeled_json,
        pseudo=str(pseudo_json),
        pseudo_sha256=file_sha256(pseudo_json),
        ratio=list(ratio),
        images={"labeled": len(labeled_data), "pseudo": len(pseudo_data)},
    )
    return result


def _save_trained(
    detector, out_dir, result: TrainResult, cfg: TrainConfig, init: str, data_json, **extra
) -> None:
    """Save the model directory with what it was trained on and how, in ``meta.json``."""
    detector.save(
        out_dir,
        extra={
            "training": {
                "data": str(data_json),
                "data_sha256": file_sha256(data_json),
                **extra,
                "init": init,
                "config": cfg.model_dump(mode="json"),
                "iterations": result.iterations,
                "first_loss": result.first_losses,
                "final_loss": result.final_losses,
                "seconds": round(result.seconds, 1),
            }
        },
    )
