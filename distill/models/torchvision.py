"""torchvision R-CNN backend: Faster / Mask / Keypoint R-CNN on ResNet-FPN or MobileNetV3-FPN.

One ``GeneralizedRCNN`` carries the heads the config asks for (masks and keypoints may both be on). The
stages of the :class:`~distill.models.base.Detector` protocol call the torchvision modules directly, so a
plain single view reproduces ``GeneralizedRCNN.forward`` exactly while multi-view inference can reuse the
backbone features of a view for the keypoint and mask heads on boxes it chooses.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill.models.base import PreparedBatch, predict_plain_view
from distill.models.config import ModelConfig
from distill.models.files import save_model
from distill.structures import Detections
from distill.transforms import ResizeFlip

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
_IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "mobilenet_v3_large": "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
}


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "frozen_bn":
        return misc_nn_ops.FrozenBatchNorm2d
    return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)


def build_backbone(config: ModelConfig, *, weights: Any = None) -> tuple[nn.Module, list[str]]:
    """The backbone with FPN, and the names of the feature maps the RoI heads pool from."""
    norm = _norm_layer(config.norm)
    if config.backbone == "mobilenet_v3_large":
        body = mobilenet_v3_large(weights=weights, norm_layer=norm if config.norm != "bn" else None)
        backbone = _mobilenet_extractor(body, True, 6)
        return backbone, ["0", "1"]
    body = _RESNETS[config.backbone](weights=weights, norm_layer=norm)
    in_channels = [body.inplanes // 8, body.inplanes // 4, body.inplanes // 2, body.inplanes]
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=in_channels,
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    return backbone, ["0", "1", "2", "3"]


def build_rcnn(config: ModelConfig, *, backbone_weights: Any = None) -> FasterRCNN:
    """A torchvision ``GeneralizedRCNN`` with the heads ``config`` asks for."""
    backbone, featmaps = build_backbone(config, weights=backbone_weights)
    channels = backbone.out_channels
    if config.backbone == "mobilenet_v3_large":
        anchors = AnchorGenerator((tuple(config.anchor_sizes),) * 3, ((0.5, 1.0, 2.0),) * 3)
    else:
        sizes = tuple((s,) for s in config.anchor_sizes)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    model = FasterRCNN(
        backbone,
        num_classes=config.num_classes + 1,
        min_size=tuple(config.train_sizes),
        max_size=config.max_size,
        image_mean=config.image_mean,
        image_std=config.image_std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(featmaps, 7, 2),
        box_head=None,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_score_thresh=config.score_thresh,
        box_nms_thresh=config.nms_thresh,
        box_detections_per_img=config.detections_per_image,
    )
    if config.box_head_dim != 1024:
        model.roi_heads.box_head = TwoMLPHead(channels * 7 * 7, config.box_head_dim)
        model.roi_heads.box_predictor = FastRCNNPredictor(config.box_head_dim, config.num_classes + 1)
    heads = model.roi_heads
    if config.masks:
        layers = tuple(config.mask_head_layers)
        heads.mask_roi_pool = MultiScaleRoIAlign(featmaps, 14, 2)
        heads.mask_head = MaskRCNNHeads(channels, layers, 1)
        heads.mask_predictor = MaskRCNNPredictor(layers[-1], layers[-1], config.num_classes + 1)
    if config.has_keypoints:
        layers = tuple(config.keypoint_head_layers)
        heads.keypoint_roi_pool = MultiScaleRoIAlign(featmaps, 14, 2)
        heads.keypoint_head = KeypointRCNNHeads(channels, layers)
        heads.keypoint_predictor = KeypointRCNNPredictor(layers[-1], len(config.keypoint_names))
    return model


class TorchvisionDetector(nn.Module):
    """The :class:`~distill.models.base.Detector` protocol over a torchvision R-CNN."""

    backend = "torchvision"

    def __init__(
        self, config: ModelConfig, *, device: str | torch.device = "cpu", backbone_weights: Any = None
    ):
        super().__init__()
        self.config = config
        self.model = build_rcnn(config, backbone_weights=backbone_weights)
        self.device = torch.device(device)
        self.to(self.device)
        kp_classes = [config.category_ids.index(c) for c in config.keypoint_category_ids]
        self.register_buffer(
            "_keypoint_classes", torch.tensor(kp_classes, dtype=torch.int64), persistent=False
        )
        self.eval()

    # -- label space -------------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def has_masks(self) -> bool:
        return self.config.masks

    @property
    def has_keypoints(self) -> bool:
        return self.config.has_keypoints

    def keypoint_flip_indices(self) -> torch.Tensor | None:
        if not self.has_keypoints:
            return None
        return torch.tensor(self.config.keypoint_flip_indices(), dtype=torch.int64, device=self.device)

    def is_keypoint_class(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the labels (contiguous indices) whose class carries keypoints."""
        return torch.isin(labels, self._keypoint_classes)

    # -- stages ------------------------------------------------------------------------------------------
    def prepare(
        self,
        images: Sequence[torch.Tensor],
        size: int | None = None,
        flip: bool = False,
        max_size: int | None = None,
    ) -> PreparedBatch:
        if len(images) == 0:
            raise ValueError("prepare() needs at least one image")
        size = size or self.config.test_size
        max_size = max_size or self.config.max_size
        mean = torch.tensor(self.config.image_mean, device=self.device)[:, None, None]
        std = torch.tensor(self.config.image_std, device=self.device)[:, None, None]
        resized, transforms = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(
                    f"images must be float [3, H, W] in [0, 1], got {image.dtype} {tuple(image.shape)}"
                )
            image = image.to(self.device)
            if flip:
                image = image.flip(-1)
            h, w = image.shape[-2:]
            scale = min(size / min(h, w), max_size / max(h, w))
            out = F.interpolate(
                ((image - mean) / std)[None],
                scale_factor=scale,
                mode="bilinear",
                recompute_scale_factor=True,
                align_corners=False,
            )[0]
            resized.append(out)
            transforms.append(ResizeFlip(int(h), int(w), int(out.shape[-2]), int(out.shape[-1]), flip))
        tensor = self.model.transform.batch_images(
            resized, size_divisible=self.model.transform.size_divisible
        )
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in resized]
        return PreparedBatch(tensor=tensor, image_sizes=sizes, transforms=transforms)

    def features(self, batch: PreparedBatch) -> OrderedDict[str, torch.Tensor]:
        return self.model.backbone(batch.tensor)

    def detect(
        self,
        feats: OrderedDict[str, torch.Tensor],
        batch: PreparedBatch,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detections]:
        image_list = ImageList(batch.tensor, batch.image_sizes)
        proposals, _ = self.model.rpn(image_list, feats)
        heads = self.model.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(feats, proposals, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
        try:
            heads.score_thresh = self.config.score_thresh if score_thresh is None else score_thresh
            heads.nms_thresh = self.config.nms_thresh if nms_thresh is None else nms_thresh
            heads.detections_per_img = max_detections or self.config.detections_per_image
            boxes, scores, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, batch.image_sizes
            )
        finally:
            heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
        return [Detections(b, s, lab - 1) for b, s, lab in zip(boxes, scores, labels, strict=True)]

    def keypoint_logits(
        self, feats: OrderedDict[str, torch.Tensor], batch: PreparedBatch, boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if not self.has_keypoints:
            raise ValueError("this model has no keypoint head (config.keypoint_names is empty)")
        heads = self.model.roi_heads
        x = heads.keypoint_predictor(
            heads.keypoint_head(heads.keypoint_roi_pool(feats, boxes, batch.image_sizes))
        )
        return list(x.split([len(b) for b in boxes]))

    def mask_probs(
        self,
        feats: OrderedDict[str, torch.Tensor],
        batch: PreparedBatch,
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        if not self.has_masks:
            raise ValueError("this model has no mask head (config.masks is false)")
        heads = self.model.roi_heads
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(feats, boxes, batch.image_sizes)))
        label = torch.cat(labels) + 1
        probs = logits[torch.arange(len(label), device=logits.device), label].sigmoid()
        return list(probs.split([len(b) for b in boxes]))

    def decode_keypoints(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Heatmap logits ``[R, K, S, S]`` on boxes ``[R, 4]`` -> keypoints ``[R, K, 3]`` (x, y, score)."""
        return decode_heatmaps(logits, boxes)

    @torch.inference_mode()
    def predict(
        self, images: Sequence[torch.Tensor], *, size: int | None = None, score_thresh: float | None = None
    ) -> list[Detections]:
        """One plain view at ``size`` (default: the config's test size); original-image coordinates."""
        return predict_plain_view(self, images, size=size, score_thresh=score_thresh)

    # -- training ----------------------------------------------------------------------------------------
    def losses(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Training losses of a batch (the model must be in train mode)."""
        if not self.training:
            raise RuntimeError("call .train() before losses()")
        return self.model(images, targets)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        return save_model(self, directory, extra=extra)


def decode_heatmaps(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Heatmap logits ``[R, K, S, S]`` on boxes ``[R, 4]`` -> keypoints ``[R, K, 3]`` (x, y, logit)."""
    if len(boxes) == 0:
        return torch.zeros((0, logits.shape[1], 3), device=logits.device)
    xy, scores = heatmaps_to_keypoints(logits, boxes)
    xy = xy.clone()
    xy[..., 2] = scores
    return xy


def imagenet_weights(backbone: str) -> Any:
    """The torchvision ImageNet weight enum for a backbone (downloaded by torchvision when first used)."""
    import torchvision.models as tvm

    enum_name, member = _IMAGENET_WEIGHTS[backbone].split(".")
    return getattr(getattr(tvm, enum_name), member)


__all__ = ["TorchvisionDetector", "build_rcnn", "decode_heatmaps", "imagenet_weights"]
