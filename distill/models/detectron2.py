"""The :class:`~distill.models.base.Detector` protocol over a detectron2 ``GeneralizedRCNN``.

detectron2 users keep their config files and ``model_final.pth``; distill runs the model's own stages::

    prepare   detectron2's resize rule (ResizeShortestEdge), its input format (BGR/RGB, 0-255) and its
              pixel normalisation; padding to the backbone's size divisibility
    features  model.backbone, once per view
    detect    model.proposal_generator + the box branch of model.roi_heads
    keypoint_logits / mask_probs
              the roi_heads' own poolers and heads on *given* boxes (the merged boxes of all views)

so distill's multi-view engine fuses keypoint heatmaps and soft masks of detectron2 models, which
detectron2's ``GeneralizedRCNNWithTTA`` cannot do for keypoints and does with a second backbone pass for
masks. Importing this module needs detectron2 (not on PyPI: see the README).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import InputError, ModelFileError
from distill.models.base import PreparedBatch, predict_plain_view
from distill.models.config import Detectron2ModelConfig
from distill.models.files import WEIGHTS_FILE, load_exact, read_state_dict, save_model
from distill.structures import Detections
from distill.transforms import ResizeFlip

try:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data.transforms import ResizeShortestEdge
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, ImageList
except ImportError as exc:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "the detectron2 backend needs detectron2, which is not on PyPI: install it from its git source "
        "(see the README, 'detectron2 backend'), or use the Docker image"
    ) from exc

DETECTRON2_CONFIG_FILE = "detectron2.yaml"


def decode_heatmaps_detectron2(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Heatmap logits ``[R, K, S, S]`` on boxes ``[R, 4]`` -> ``[R, K, 3]`` (x, y, score), as detectron2's
    ``keypoint_rcnn_inference`` decodes them, computed stably.

    Each map is resized (bicubic) to the box's pixel size; the argmax pixel ``d`` becomes ``d + 0.5`` scaled
    back to the box; the score is detectron2's: the peak's softmax probability over the *pooled* map,
    ``exp(peak - logsumexp(map))``, capped at 1. (detectron2's own function exponentiates without the
    log-sum-exp and asserts, which fails on the huge logits of a barely trained model.)
    """
    num, num_kp = maps.shape[:2]
    out = maps.new_zeros((num, num_kp, 3))
    if num == 0:
        return out
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    pooled_lse = maps.flatten(2).logsumexp(2)  # [R, K]
    for i in range(num):
        size = (int(heights_ceil[i]), int(widths_ceil[i]))
        roi_map = F.interpolate(maps[i : i + 1], size=size, mode="bicubic", align_corners=False)[0]
        peak, position = roi_map.flatten(1).max(1)
        x_int = position % size[1]
        y_int = torch.div(position, size[1], rounding_mode="floor")
        out[i, :, 0] = (x_int.float() + 0.5) * (widths[i] / widths_ceil[i]) + boxes[i, 0]
        out[i, :, 1] = (y_int.float() + 0.5) * (heights[i] / heights_ceil[i]) + boxes[i, 1]
        # bicubic overshoot can lift the peak above the pooled log-sum-exp: a probability stays <= 1
        out[i, :, 2] = (peak - pooled_lse[i]).clamp(max=0.0).exp()
    return out


def model_zoo_config(name: str) -> Path:
    """The path of a config shipped inside detectron2 (``COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml``).

    Located as a file under the installed package, so it works without ``pkg_resources`` (which
    ``detectron2.model_zoo`` imports and setuptools >= 81 no longer ships).
    """
    spec = importlib.util.find_spec("detectron2")
    roots = (
        [Path(p) / "model_zoo" / "configs" for p in (spec.submodule_search_locations or [])] if spec else []
    )
    for root in roots:
        if (root / name).is_file():
            return root / name
    raise InputError(
        f"{name}: neither a config file nor a detectron2 model-zoo config "
        f"(looked under {', '.join(map(str, roots)) or 'the detectron2 package'})"
    )


def load_cfg(config: str | Path, opts: Sequence[str] = ()) -> CfgNode:
    """A detectron2 config from a ``.yaml`` path or a model-zoo name, with ``KEY VALUE`` overrides."""
    path = Path(config)
    if not path.is_file():
        path = model_zoo_config(str(config))
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path))
    except KeyError as exc:  # yacs: "Non-existent config key: MODEL.FOO"
        raise InputError(f"{path}: {exc.args[0] if exc.args else exc}") from None
    except Exception as exc:  # YAML errors, bad _BASE_ files, type mismatches
        raise InputError(f"{path}: not a usable detectron2 config ({type(exc).__name__}: {exc})") from None
    if len(opts) % 2:
        raise InputError(f"detectron2 overrides must be KEY VALUE pairs, got {list(opts)}")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as exc:
        raise InputError(f"detectron2 override {list(opts)}: {exc}") from None
    return cfg


def label_space_from_cfg(cfg: CfgNode, categories: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The :class:`~distill.models.config.LabelSpace` fields of a detectron2 model.

    From ``categories`` (a COCO ``categories`` list, keypoint names and ``keypoint_flip_map`` included) when
    given, else from the metadata detectron2 registers for ``cfg.DATASETS.TEST[0]`` (the built-in COCO sets
    carry class names, COCO category ids, keypoint names and the flip map). Checked against the config's
    number of classes and keypoints.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    keypoints_on = bool(cfg.MODEL.KEYPOINT_ON)
    fields: dict[str, Any]
    if categories is not None:
        from distill.models.config import config_from_coco_categories

        fields = config_from_coco_categories(categories).model_dump(
            include={"class_names", "category_ids", "keypoint_names", "keypoint_flip_map", "keypoint_sigmas"}
        )
        source = "the given categories"
    else:
        fields = _label_space_from_metadata(cfg)
        source = f"detectron2's metadata of {cfg.DATASETS.TEST[0]!r}"
    if len(fields["class_names"]) != num_classes:
        raise InputError(
            f"{source} name {len(fields['class_names'])} classes but the config's "
            f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}"
        )
    if keypoints_on:
        expected = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
        if len(fields.get("keypoint_names") or []) != expected:
            raise InputError(
                f"{source} name {len(fields.get('keypoint_names') or [])} keypoints but the config's "
                f"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS is {expected}"
            )
        # detectron2's keypoint head predicts keypoints for every detection, whatever its class
        fields["keypoint_category_ids"] = list(fields["category_ids"])
    else:
        fields.update(keypoint_names=[], keypoint_flip_map=[], keypoint_sigmas=None)
    return fields


def _label_space_from_metadata(cfg: CfgNode) -> dict[str, Any]:
    import detectron2.data  # noqa: F401  (registers the built-in datasets' metadata)
    from detectron2.data import MetadataCatalog

    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    meta = MetadataCatalog.get(names[0]) if names else None
    classes = getattr(meta, "thing_classes", None) if meta is not None else None
    if not classes:
        raise InputError(
            f"the config's dataset {names[0] if names else '(none)'!r} has no registered class names: give "
            "the label space as a COCO json (--categories) or register the dataset's metadata"
        )
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None) or {
        i + 1: i for i in range(len(classes))
    }
    by_index = {index: dataset_id for dataset_id, index in id_map.items()}
    fields: dict[str, Any] = {
        "class_names": list(classes),
        "category_ids": [int(by_index.get(i, i + 1)) for i in range(len(classes))],
        "keypoint_names": list(getattr(meta, "keypoint_names", None) or []),
        "keypoint_flip_map": [tuple(p) for p in getattr(meta, "keypoint_flip_map", None) or []],
        "keypoint_sigmas": None,
    }
    return fields


class _RecordingCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer (Detectron/c2 name matching included), keeping what did not match."""

    incompatible: Any = None

    def _log_incompatible_keys(self, incompatible: Any) -> None:
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


class Detectron2Detector(nn.Module):
    """The :class:`~distill.models.base.Detector` protocol over a detectron2 ``GeneralizedRCNN``."""

    backend = "detectron2"

    def __init__(
        self, config: Detectron2ModelConfig, cfg: CfgNode, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        arch = cfg.MODEL.META_ARCHITECTURE
        if arch != "GeneralizedRCNN":
            raise InputError(
                f"MODEL.META_ARCHITECTURE is {arch!r}: distill's detectron2 backend runs GeneralizedRCNN "
                "stage by stage (backbone once per view, heads on merged boxes). For other models, write "
                "each view's COCO results yourself and fuse them with `distill fuse`"
            )
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise InputError(f"INPUT.FORMAT is {cfg.INPUT.FORMAT!r}; the detectron2 backend reads BGR or RGB")
        if config.masks != bool(cfg.MODEL.MASK_ON):
            raise InputError(f"masks is {config.masks} but the config's MODEL.MASK_ON is {cfg.MODEL.MASK_ON}")
        if config.has_keypoints != bool(cfg.MODEL.KEYPOINT_ON):
            raise InputError(
                f"keypoint_names has {len(config.keypoint_names)} names but MODEL.KEYPOINT_ON is "
                f"{cfg.MODEL.KEYPOINT_ON}"
            )
        self.device = torch.device(device)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = str(self.device)
        cfg.freeze()
        self.cfg = cfg
        self.config = config
        # resize with antialiasing, like the PIL resize of detectron2's uint8 data pipeline; False gives the
        # plain bilinear resize detectron2 applies to float images
        self.antialias = True
        self.model = build_model(cfg)
        self.model.eval()
        kp_classes = [config.category_ids.index(c) for c in config.keypoint_category_ids]
        self._keypoint_classes = torch.tensor(kp_classes, dtype=torch.int64, device=self.device)
        self.eval()

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_cfg(
        cls,
        cfg: CfgNode,
        *,
        weights: str | Path | None = None,
        categories: list[dict[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
    ) -> Detectron2Detector:
        """A detector for ``cfg``; label space from ``categories`` or the config's dataset metadata.

        ``weights`` (default ``cfg.MODEL.WEIGHTS``; empty = random init) is a detectron2 ``.pth`` or a
        Detectron ``.pkl``, read with detectron2's checkpointer. With ``strict`` every tensor must match by
        name and shape (a model to run); without, a partial match is fine (an initialisation to train from).
        """
        config = Detectron2ModelConfig(
            **label_space_from_cfg(cfg, categories),
            masks=bool(cfg.MODEL.MASK_ON),
            test_size=int(cfg.INPUT.MIN_SIZE_TEST),
            max_size=int(cfg.INPUT.MAX_SIZE_TEST),
        )
        detector = cls(config, cfg, device=device)
        weights = cfg.MODEL.WEIGHTS if weights is None else str(weights)
        if weights:
            detector.load_weights(weights, strict=strict)
        return detector

    @classmethod
    def from_directory(
        cls, directory: str | Path, config: Detectron2ModelConfig, *, device: str | torch.device = "cpu"
    ) -> Detectron2Detector:
        """Rebuild a detector saved with :meth:`save` (weights must match exactly)."""
        directory = Path(directory)
        cfg = load_cfg(directory / config.detectron2_config)
        detector = cls(config, cfg, device=device)
        load_exact(detector.model, read_state_dict(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
        return detector

    def load_weights(self, path: str | Path, *, strict: bool = True) -> dict[str, int]:
        """Load a detectron2/Detectron checkpoint; raises :class:`ModelFileError` on mismatch when strict."""
        path = str(path)
        if not Path(path).is_file():
            raise ModelFileError(f"{path}: weights file not found")
        own = self.model.state_dict()
        backup = {k: v.detach().clone() for k, v in own.items()} if strict else None
        checkpointer = _RecordingCheckpointer(self.model)
        try:
            checkpointer.load(path, checkpointables=[])  # renames Detectron/c2 names; skips bad shapes
        except Exception as exc:
            if backup is not None:
                self.model.load_state_dict(backup)
            raise ModelFileError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
        incompatible = checkpointer.incompatible
        wrong = list(incompatible.incorrect_shapes) if incompatible else []
        missing = list(incompatible.missing_keys) if incompatible else []
        unexpected = list(incompatible.unexpected_keys) if incompatible else []
        if backup is not None and (wrong or missing):
            self.model.load_state_dict(backup)  # nothing half-loaded
            details = []
            if wrong:
                name, file_shape, model_shape = wrong[0]
                details.append(
                    f"{len(wrong)} with another shape (e.g. {name}: file {tuple(file_shape)}, "
                    f"model {tuple(model_shape)})"
                )
            if missing:
                details.append(f"{len(missing)} missing (e.g. {missing[0]})")
            raise ModelFileError(
                f"{path}: weights do not match the config: {'; '.join(details)}; was it trained with "
                "another config (e.g. another NUM_CLASSES or NUM_KEYPOINTS)?"
            )
        loaded = len(own) - len(set(missing) | {name for name, *_ in wrong})
        return {"loaded": loaded, "skipped": len(unexpected) + len(wrong), "model_tensors": len(own)}

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
        return torch.isin(labels, self._keypoint_classes.to(labels.device))

    # -- stages ------------------------------------------------------------------------------------------
    def resize(
        self, image: torch.Tensor, size: int | None = None, flip: bool = False, max_size: int | None = None
    ) -> tuple[torch.Tensor, ResizeFlip]:
        """One float RGB image in [0, 1] -> the model's input (format and 0-255 range of the config),
        flipped and resized by detectron2's ``ResizeShortestEdge`` rule; and the transform."""
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"images must be float [3, H, W] in [0, 1], got {image.dtype} {tuple(image.shape)}"
            )
        size = size or self.config.test_size
        max_size = max_size or self.config.max_size
        image = image.to(self.device)
        if flip:
            image = image.flip(-1)
        h, w = (int(v) for v in image.shape[-2:])
        new_h, new_w = ResizeShortestEdge.get_output_shape(h, w, size, max_size)
        x = image * 255.0
        if self.cfg.INPUT.FORMAT == "BGR":
            x = x.flip(0)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(
                x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=self.antialias
            )[0]
        return x, ResizeFlip(h, w, new_h, new_w, flip)

    def prepare(
        self,
        images: Sequence[torch.Tensor],
        size: int | None = None,
        flip: bool = False,
        max_size: int | None = None,
    ) -> PreparedBatch:
        if len(images) == 0:
            raise ValueError("prepare() needs at least one image")
        resized = [self.resize(image, size, flip, max_size) for image in images]
        return self.batch([x for x, _ in resized], [t for _, t in resized])

    def batch(self, inputs: Sequence[torch.Tensor], transforms: list[ResizeFlip]) -> PreparedBatch:
        """Model inputs (as :meth:`resize` makes them) -> normalised and padded like ``preprocess_image``."""
        model = self.model
        normalised = [(x.to(self.device) - model.pixel_mean) / model.pixel_std for x in inputs]
        images = ImageList.from_tensors(
            normalised,
            model.backbone.size_divisibility,
            padding_constraints=model.backbone.padding_constraints,
        )
        sizes = [(int(h), int(w)) for h, w in images.image_sizes]
        return PreparedBatch(tensor=images.tensor, image_sizes=sizes, transforms=list(transforms))

    def features(self, batch: PreparedBatch) -> dict[str, torch.Tensor]:
        return self.model.backbone(batch.tensor)

    def detect(
        self,
        feats: dict[str, torch.Tensor],
        batch: PreparedBatch,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detections]:
        images = ImageList(batch.tensor, batch.image_sizes)
        proposals, _ = self.model.proposal_generator(images, feats, None)
        heads = self.model.roi_heads
        predictors = (
            heads.box_predictor if isinstance(heads.box_predictor, nn.ModuleList) else [heads.box_predictor]
        )
        saved = [(p.test_score_thresh, p.test_nms_thresh, p.test_topk_per_image) for p in predictors]
        try:
            for p, (score, nms, topk) in zip(predictors, saved, strict=True):
                p.test_score_thresh = score if score_thresh is None else score_thresh
                p.test_nms_thresh = nms if nms_thresh is None else nms_thresh
                p.test_topk_per_image = max_detections or topk
            instances = heads._forward_box(feats, proposals)
        finally:
            for p, (score, nms, topk) in zip(predictors, saved, strict=True):
                p.test_score_thresh, p.test_nms_thresh, p.test_topk_per_image = score, nms, topk
        return [Detections(i.pred_boxes.tensor, i.scores, i.pred_classes) for i in instances]

    def keypoint_logits(
        self, feats: dict[str, torch.Tensor], batch: PreparedBatch, boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if not self.has_keypoints:
            raise ValueError("this model has no keypoint head (MODEL.KEYPOINT_ON is false)")
        heads = self.model.roi_heads
        if heads.keypoint_pooler is None:
            raise InputError("the keypoint head reads whole feature maps (no pooler); not supported")
        pooled = heads.keypoint_pooler(
            [feats[f] for f in heads.keypoint_in_features], [Boxes(b) for b in boxes]
        )
        if len(pooled) == 0:
            size = int(2 * heads.keypoint_pooler.output_size[0] * heads.keypoint_head.up_scale)
            empty = pooled.new_zeros((0, len(self.config.keypoint_names), size, size))
            return [empty for _ in boxes]
        return list(heads.keypoint_head.layers(pooled).split([len(b) for b in boxes]))

    def mask_probs(
        self,
        feats: dict[str, torch.Tensor],
        batch: PreparedBatch,
        boxes: list[torch.Tensor],
        labels: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        if not self.has_masks:
            raise ValueError("this model has no mask head (MODEL.MASK_ON is false)")
        heads = self.model.roi_heads
        if heads.mask_pooler is None:
            raise InputError("the mask head reads whole feature maps (no pooler); not supported")
        pooled = heads.mask_pooler([feats[f] for f in heads.mask_in_features], [Boxes(b) for b in boxes])
        if len(pooled) == 0:
            size = 2 * heads.mask_pooler.output_size[0]
            return [pooled.new_zeros((0, size, size)) for _ in boxes]
        logits = heads.mask_head.layers(pooled)
        if logits.shape[1] == 1:  # class-agnostic masks
            probs = logits[:, 0].sigmoid()
        else:
            label = torch.cat(labels)
            probs = logits[torch.arange(len(label), device=logits.device), label].sigmoid()
        return list(probs.split([len(b) for b in boxes]))

    def decode_keypoints(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """detectron2's decoding: ``(x, y, score)`` with its +0.5 pixel convention and softmax score."""
        return decode_heatmaps_detectron2(logits, boxes)

    @torch.inference_mode()
    def predict(
        self, images: Sequence[torch.Tensor], *, size: int | None = None, score_thresh: float | None = None
    ) -> list[Detections]:
        """One plain view at ``size`` (default: the config's test size); original-image coordinates."""
        return predict_plain_view(self, images, size=size, score_thresh=score_thresh)

    # -- persistence -------------------------------------------------------------------------------------
    def config_files(self) -> dict[str, str]:
        """The files of the architecture besides ``config.yaml``: detectron2's config, as it ran."""
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ""  # the weights are the model directory's own
        cfg.MODEL.DEVICE = "cpu"
        return {self.config.detectron2_config: cfg.dump()}

    def save(self, directory: str | Path, *, extra: dict | None = None) -> Path:
        return save_model(self, directory, extra=extra)


@torch.no_grad()
def init_norm_statistics(detector: Detectron2Detector, images: Sequence[torch.Tensor]) -> None:
    """Set every frozen norm layer's statistics from one forward pass over ``images`` (a data-dependent init).

    For experiments with *random* weights only: detectron2's FrozenBatchNorm layers are identities then, and
    activations explode until nothing is detected. Real checkpoints carry their own statistics.
    """
    from detectron2.layers import FrozenBatchNorm2d

    def hook(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)) + 1e-3)
        module.weight.fill_(1.0)
        module.bias.zero_()

    frozen = [m for m in detector.model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(hook) for m in frozen]
    try:
        detector.features(detector.prepare(list(images)))
    finally:
        for handle in handles:
            handle.remove()


def import_detectron2_model(
    config: str | Path,
    weights: str | Path | None,
    out: str | Path,
    *,
    opts: Sequence[str] = (),
    categories_file: str | Path | None = None,
) -> Path:
    """Turn a detectron2 config + weights into a distill model directory (``distill import-detectron2``)."""
    categories = None
    if categories_file is not None:
        path = Path(categories_file)
        try:
            categories = json.loads(path.read_text())["categories"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: cannot read a COCO 'categories' list ({exc})") from None
    cfg = load_cfg(config, opts)
    detector = Detectron2Detector.from_cfg(cfg, weights=weights, categories=categories)
    return detector.save(out, extra={"imported_from": {"config": str(config), "weights": str(weights or "")}})


__all__ = [
    "DETECTRON2_CONFIG_FILE",
    "Detectron2Detector",
    "decode_heatmaps_detectron2",
    "import_detectron2_model",
    "init_norm_statistics",
    "label_space_from_cfg",
    "load_cfg",
    "model_zoo_config",
]
