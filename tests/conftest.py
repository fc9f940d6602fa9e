"""Shared fixtures: the embedded ``tiny`` benchmark and a small, quickly trained model on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.data.coco import load_coco
from distill.models.config import ModelConfig, config_from_coco_categories
from distill.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough to train for a few dozen iterations inside the test suite (the ``tiny`` recipe's).
TINY_MODEL = dict(RECIPES["tiny"]["model"])


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when it is absent (a user's clone has no shared/)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real-data fixtures live in ../shared/data)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic benchmark (seed 0), generated once per session."""
    from distill.data.synthetic import generate

    out = tmp_path_factory.mktemp("tiny")
    generate(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_data: Path) -> ModelConfig:
    return config_from_coco_categories(load_coco(tiny_data / "labeled.json").categories, **TINY_MODEL)


@pytest.fixture(scope="session")
def trained_tiny_model(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory trained briefly on the tiny labeled split (+ unlabeled truth, for more signal)."""
    from distill.train.torchvision import train_model

    out = tmp_path_factory.mktemp("tiny_model")
    train_model(
        tiny_data / "labeled.json",
        tiny_data / "images",
        out,
        model_overrides=TINY_MODEL,
        train_overrides={
            "iterations": 60,
            "batch_size": 4,
            "base_lr": 0.02,
            "warmup_iters": 10,
            "checkpoint_period": 1000,
            "clip_grad_norm": 5.0,
        },
    )
    return out
