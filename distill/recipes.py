"""Named model + training recipes (YAML-shaped dicts), e.g. the one tuned for the embedded benchmark.

A recipe has two sections, ``model`` (:class:`~distill.models.config.ModelConfig` fields other than the label
space, which comes from the training data's categories) and ``train``
(:class:`~distill.train.loop.TrainConfig`).
``distill train --config FILE.yaml`` reads the same shape.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from distill.errors import InputError

RECIPES: dict[str, dict[str, Any]] = {
    # Small R-CNN for the ~256 px synthetic benchmark on a 2-core CPU: ResNet-18 FPN from scratch with
    # trainable BatchNorm, anchors one octave smaller than COCO's, light mask/keypoint heads.
    "synth": {
        "model": {
            "backbone": "resnet18",
            "norm": "bn",
            "masks": True,
            "fpn_channels": 64,
            "anchor_sizes": [16, 32, 64, 128, 256],
            "test_size": 256,
            "max_size": 512,
            "train_sizes": [208, 224, 240, 256, 272],
            "box_head_dim": 256,
            "mask_head_layers": [64, 64],
            "keypoint_head_layers": [64, 64, 64, 64],
            "box_batch_size_per_image": 64,
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 600,
            "rpn_post_nms_top_n_test": 300,
        },
        # AdamW: from scratch with a few hundred iterations it learned faster than SGD in our runs
        # (200 AdamW iterations: 3.2 box AP; 300 SGD iterations at lr 0.02 clipped to norm 5: 1.3; unclipped
        # SGD diverged, and the clipping it needs shrinks the box head's share of an early gradient dominated
        # by the mask and keypoint heads).
        "train": {
            "iterations": 400,
            "batch_size": 4,
            "optimizer": "adamw",
            "base_lr": 0.002,
            "weight_decay": 0.05,
            "warmup_iters": 50,
            "schedule": "cosine",
            "clip_grad_norm": 20.0,
            "checkpoint_period": 100,
        },
    },
    # A model that trains in seconds on the ``tiny`` benchmark (160 px): smoke runs and the service tests.
    "tiny": {
        "model": {
            "backbone": "resnet18",
            "masks": True,
            "fpn_channels": 32,
            "anchor_sizes": [16, 32, 64, 128, 256],
            "test_size": 160,
            "max_size": 320,
            "train_sizes": [144, 160],
            "box_head_dim": 64,
            "mask_head_layers": [16],
            "keypoint_head_layers": [32, 32],
            "box_batch_size_per_image": 32,
            "rpn_pre_nms_top_n_train": 300,
            "rpn_post_nms_top_n_train": 100,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100,
        },
        "train": {
            "iterations": 60,
            "batch_size": 4,
            "base_lr": 0.02,
            "warmup_iters": 10,
            "checkpoint_period": 20,
        },
    },
    # torchvision's COCO defaults (ResNet-50 FPN, 800 px): for real data, usually with --init imagenet/PATH.
    "coco": {
        "model": {"backbone": "resnet50", "norm": "frozen_bn"},
        "train": {"iterations": 90000, "batch_size": 2},
    },
}


# ``synth`` at 160 px with lighter heads (FPN 32 channels, 2-layer keypoint head, 1-layer mask head, half the
# sampled RoIs and RPN training proposals): ~2.5x fewer seconds per iteration, so a teacher on the ``semi``
# preset gets 1200 iterations in the time ``synth`` trains ~500.
RECIPES["synth-small"] = {
    "model": {
        **RECIPES["synth"]["model"],
        "fpn_channels": 32,
        "test_size": 160,
        "max_size": 320,
        "train_sizes": [128, 144, 160, 176, 192],
        "box_head_dim": 128,
        "mask_head_layers": [32],
        "keypoint_head_layers": [32, 32],
        "box_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
    },
    "train": {**RECIPES["synth"]["train"], "iterations": 1200},
}


def load_recipe(name_or_path: str | None) -> dict[str, Any]:
    """A recipe by name (see ``RECIPES``) or from a YAML file with ``model:`` and/or ``train:`` sections."""
    if name_or_path is None:
        return {"model": {}, "train": {}}
    if name_or_path in RECIPES:
        return copy.deepcopy(RECIPES[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"{name_or_path}: no such config file or recipe (recipes: {', '.join(sorted(RECIPES))})"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or set(raw) - {"model", "train"}:
        raise InputError(
            f"{path}: expected a mapping with 'model' and/or 'train' sections, got keys {list(raw)}"
        )
    return {"model": dict(raw.get("model") or {}), "train": dict(raw.get("train") or {})}
