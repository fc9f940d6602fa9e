"""Every built-in recipe is a valid model + training config for a COCO label space."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.data.coco import load_coco
from distill.recipes import RECIPES
from distill.train.torchvision import recipe_configs


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_built_in_recipe_validates_against_the_benchmarks_categories(name: str, tiny_data: Path) -> None:
    labeled = load_coco(tiny_data / "labeled.json")
    model, train = recipe_configs(labeled, name)
    assert model.category_ids == [c["id"] for c in labeled.categories]
    assert model.keypoint_names  # the figures' keypoints reach the model
    for key, value in RECIPES[name]["model"].items():  # each setting is a model field, and it is applied
        assert getattr(model, key) == value, key
    for key, value in RECIPES[name]["train"].items():
        assert getattr(train, key) == value, key
