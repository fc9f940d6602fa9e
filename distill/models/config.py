"""The model configuration: what rebuilds a detector (``config.yaml`` in a model dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import InputError

Backbone = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"]


class LabelSpace(BaseModel):
    """What every backend's model config shares: the label space and the plain test view.

    ``category_ids[i]`` is the COCO category id of contiguous class ``i`` (``class_names[i]``). Keypoints are
    predicted for the categories in ``keypoint_category_ids``; ``keypoint_flip_map`` lists left/right pairs
    by name, which horizontal-flip augmentation and test-time un-flipping swap.
    """

    model_config = ConfigDict(extra="forbid")

    class_names: list[str] = Field(min_length=1)
    category_ids: list[int] = Field(min_length=1)
    masks: bool = False
    keypoint_names: list[str] = Field(default_factory=list)
    keypoint_flip_map: list[tuple[str, str]] = Field(default_factory=list)
    keypoint_category_ids: list[int] = Field(default_factory=list)
    keypoint_sigmas: list[float] | None = None
    test_size: int = Field(800, ge=32, description="shorter side at test time (the plain single view)")
    max_size: int = Field(1333, ge=32, description="cap on the longer side")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but "
                f"category_ids has {len(self.category_ids)}"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError("category_ids must be unique")
        unknown = sorted(set(self.keypoint_category_ids) - set(self.category_ids))
        if unknown:
            raise ValueError(f"keypoint_category_ids {unknown} are not in category_ids")
        if bool(self.keypoint_names) != bool(self.keypoint_category_ids):
            raise ValueError("keypoint_names and keypoint_category_ids must be given together")
        names = set(self.keypoint_names)
        for left, right in self.keypoint_flip_map:
            if left not in names or right not in names:
                raise ValueError(f"keypoint_flip_map pair ({left!r}, {right!r}) names an unknown keypoint")
        if self.keypoint_sigmas is not None and len(self.keypoint_sigmas) != len(self.keypoint_names):
            raise ValueError("keypoint_sigmas must have one value per keypoint")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_keypoints(self) -> bool:
        return bool(self.keypoint_names)

    def keypoint_flip_indices(self) -> list[int]:
        """``out[k]`` = the keypoint index that keypoint ``k`` turns into under a horizontal flip."""
        index = {name: i for i, name in enumerate(self.keypoint_names)}
        perm = list(range(len(self.keypoint_names)))
        for left, right in self.keypoint_flip_map:
            perm[index[left]], perm[index[right]] = index[right], index[left]
        return perm

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> Self:
        """Read and validate a config file; errors name the file and the field."""
        return cls.from_dict(_read_yaml(Path(path)), source=str(path))

    @classmethod
    def from_dict(cls, raw: object, source: str = "<config>") -> Self:
        if not isinstance(raw, dict):
            raise InputError(f"{source}: expected a mapping of config fields, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise InputError(f"{source}: {where}: {first['msg']}") from None


class ModelConfig(LabelSpace):
    """A torchvision R-CNN: its architecture on top of the label space (backend ``torchvision``)."""

    backend: Literal["torchvision"] = "torchvision"
    backbone: Backbone = "resnet50"
    norm: Literal["bn", "frozen_bn", "gn"] = Field(
        "bn", description="backbone normalisation: trainable BatchNorm (from scratch), frozen BN, GroupNorm"
    )
    fpn_channels: int = Field(256, ge=8)
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    train_sizes: list[int] = Field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    box_head_dim: int = Field(1024, ge=8)
    mask_head_layers: list[int] = Field(default_factory=lambda: [256, 256, 256, 256])
    keypoint_head_layers: list[int] = Field(default_factory=lambda: [512] * 8)
    rpn_pre_nms_top_n_train: int = Field(2000, ge=1)
    rpn_post_nms_top_n_train: int = Field(2000, ge=1)
    rpn_pre_nms_top_n_test: int = Field(1000, ge=1)
    rpn_post_nms_top_n_test: int = Field(1000, ge=1)
    box_batch_size_per_image: int = 512
    score_thresh: float = Field(0.05, ge=0.0, le=1.0, description="detections below are dropped")
    nms_thresh: float = Field(0.5, gt=0.0, le=1.0)
    detections_per_image: int = Field(100, ge=1)
    image_mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])


class Detectron2ModelConfig(LabelSpace):
    """A detectron2 model: the label space here, the architecture in detectron2's own config file
    (``detectron2_config``, next to this file in the model directory)."""

    backend: Literal["detectron2"] = "detectron2"
    detectron2_config: str = Field("detectron2.yaml", description="detectron2 CfgNode dump in the model dir")


AnyModelConfig = ModelConfig | Detectron2ModelConfig
_CONFIG_CLASSES: dict[str, type[LabelSpace]] = {
    "torchvision": ModelConfig,
    "detectron2": Detectron2ModelConfig,
}


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: model config not found") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None


def load_model_config(path: str | Path) -> AnyModelConfig:
    """A model directory's ``config.yaml``, as the config class of its ``backend`` (default torchvision)."""
    path = Path(path)
    raw = _read_yaml(path)
    backend = raw.get("backend", "torchvision") if isinstance(raw, dict) else "torchvision"
    cls = _CONFIG_CLASSES.get(backend)
    if cls is None:
        raise InputError(f"{path}: backend: unknown backend {backend!r}; known: {', '.join(_CONFIG_CLASSES)}")
    return cls.from_dict(raw, source=str(path))  # type: ignore[return-value]


def config_from_coco_categories(categories: list[dict], **overrides: object) -> ModelConfig:
    """A config whose label space is a COCO ``categories`` list (keypoint metadata included when present)."""
    kp_cats = [c for c in categories if c.get("keypoints")]
    fields: dict[str, object] = {
        "class_names": [c["name"] for c in categories],
        "category_ids": [c["id"] for c in categories],
    }
    if kp_cats:
        names = list(kp_cats[0]["keypoints"])
        if any(list(c["keypoints"]) != names for c in kp_cats[1:]):
            raise InputError("all keypoint categories must share the same keypoint names to train one model")
        fields["keypoint_names"] = names
        fields["keypoint_category_ids"] = [c["id"] for c in kp_cats]
        flip = kp_cats[0].get("keypoint_flip_map") or infer_flip_map(names)
        fields["keypoint_flip_map"] = [tuple(p) for p in flip]
        if kp_cats[0].get("keypoint_sigmas"):
            fields["keypoint_sigmas"] = list(kp_cats[0]["keypoint_sigmas"])
    fields.update(overrides)
    return ModelConfig.from_dict(fields, source="<coco categories>")


def infer_flip_map(names: list[str]) -> list[tuple[str, str]]:
    """Pairs ``left_X``/``right_X`` (also ``l_``/``r_`` prefixes) found among keypoint names."""
    pairs = []
    present = set(names)
    for name in names:
        for left, right in (("left_", "right_"), ("l_", "r_"), ("left", "right")):
            if name.startswith(left) and name.replace(left, right, 1) in present:
                pairs.append((name, name.replace(left, right, 1)))
                break
    return pairs
