"""Training a detectron2 model (teacher or student) with detectron2's own trainer machinery.

detectron2's ``SimpleTrainer``, optimizer, LR scheduler, ``DatasetMapper`` (its augmentations) and
``DetectionCheckpointer`` (periodic checkpoints, resume) do the work; distill adds what detectron2 lacks:

* the labeled and pseudo-label COCO files registered as two datasets, mixed at a fixed ratio per minibatch
  by :class:`~distill.train.samplers.RatioBatchSampler` (exact over any prefix, resumable);
* pseudo-label images without instances kept as negatives (detectron2 drops empty images when
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is on, which stays the rule for the labeled set only), and the
  ``MIN_KEYPOINTS_PER_IMAGE`` filter applied to the labeled set only;
* the label space taken from the labeled COCO file (``NUM_CLASSES``/``NUM_KEYPOINTS`` set from it, keypoint
  names and flip map registered as metadata);
* a distill model directory at the end (``config.yaml`` + ``detectron2.yaml`` + ``weights.pt``).

Importing this module needs detectron2.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from distill.data.coco import load_coco
from distill.errors import Cancelled, InputError, TrainingError
from distill.hooks import NULL_CONTEXT, StepContext
from distill.models.config import Detectron2ModelConfig, config_from_coco_categories
from distill.models.detectron2 import Detectron2Detector
from distill.models.files import is_complete, read_meta
from distill.train.loop import TrainResult
from distill.train.samplers import RatioBatchSampler

from detectron2.checkpoint import DetectionCheckpointer  # isort: skip
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.datasets import load_coco_json
from detectron2.engine import SimpleTrainer, hooks
from detectron2.engine.train_loop import HookBase
from detectron2.solver import build_lr_scheduler, build_optimizer

CHECKPOINT_DIR = "checkpoints"


def _not_a_cancel(record: logging.LogRecord) -> bool:
    """detectron2's trainer logs every exception out of a step as a crash; a cancel is not one."""
    return not (record.exc_info and isinstance(record.exc_info[1], Cancelled))


logging.getLogger("detectron2.engine.train_loop").addFilter(_not_a_cancel)


def train_detectron2(
    cfg: CfgNode,
    labeled_json: str | Path,
    labeled_images: str | Path,
    out_dir: str | Path,
    *,
    pseudo_json: str | Path | None = None,
    pseudo_images: str | Path | None = None,
    ratio: tuple[float, float] = (6.0, 4.0),
    init: str = "imagenet",
    iterations: int | None = None,
    batch_size: int | None = None,
    base_lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    context: StepContext = NULL_CONTEXT,
) -> TrainResult:
    """Train ``cfg``'s model on the labeled set (plus pseudo-labels at ``ratio``); save a model dir.

    ``init``: ``imagenet`` (``cfg.MODEL.WEIGHTS``: ImageNet weights in the model-zoo configs; must be a local
    file here), ``scratch`` (random), or a path (a
    distill model directory such as the teacher, or a detectron2 ``.pth``/``.pkl``). Checkpoints go to
    ``out_dir/checkpoints``; a rerun resumes from the last one. ``iterations`` rescales the LR steps and
    warm-up of the config's schedule to the new length. A cancel (``context``) writes a checkpoint at the
    current iteration and raises :class:`~distill.errors.Cancelled` before any model directory is saved.
    """
    out_dir = Path(out_dir)
    labeled = load_coco(labeled_json)
    label_space = config_from_coco_categories(labeled.categories)
    if pseudo_json is not None:
        pseudo = load_coco(pseudo_json)
        if [c["id"] for c in pseudo.categories] != [c["id"] for c in labeled.categories]:
            raise InputError(f"{pseudo_json}: categories differ from {labeled_json}'s")
    cfg = _training_cfg(cfg, label_space, out_dir, iterations, batch_size, base_lr, seed, device)
    names = [_register(labeled_json, labeled_images, label_space, "labeled")]
    if pseudo_json is not None:
        names.append(_register(pseudo_json, pseudo_images or labeled_images, label_space, "pseudo"))
    cfg.defrost()
    cfg.DATASETS.TRAIN = tuple(names)
    cfg.freeze()
    finished = _finished_run(out_dir, cfg.SOLVER.MAX_ITER)
    if finished is not None:
        return finished  # complete already: keep its model directory and record as they are

    torch.manual_seed(seed)
    detector = Detectron2Detector(_model_config(cfg, label_space), cfg, device=device)
    trainer, record, start_iter = _trainer(cfg, detector, init, out_dir, names, ratio, seed, context)
    started = time.perf_counter()
    if start_iter < cfg.SOLVER.MAX_ITER:
        context.check_cancelled(f"detectron2 training before iteration {start_iter}")
        try:
            trainer.train(start_iter, cfg.SOLVER.MAX_ITER)
        except FloatingPointError as exc:
            raise TrainingError(
                f"detectron2 training diverged ({exc}); lower SOLVER.BASE_LR or turn on SOLVER.CLIP_GRADIENTS"
            ) from None
    detector.model.eval()
    result = TrainResult(
        iterations=cfg.SOLVER.MAX_ITER,
        first_losses=record.first,
        final_losses=record.last,
        seconds=time.perf_counter() - started,
        resumed_from=start_iter,
    )
    training = {
        "backend": "detectron2",
        "data": str(labeled_json),
        "pseudo": None if pseudo_json is None else str(pseudo_json),
        "ratio": list(ratio) if pseudo_json is not None else None,
        "init": init,
        "iterations": result.iterations,
        "first_loss": result.first_losses,
        "final_loss": result.final_losses,
        "seconds": round(result.seconds, 1),
    }
    detector.save(out_dir, extra={"training": training})
    return result


def _trainer(
    cfg: CfgNode,
    detector: Detectron2Detector,
    init: str,
    out_dir: Path,
    names: list[str],
    ratio: tuple[float, float],
    seed: int,
    context: StepContext,
) -> tuple[SimpleTrainer, _Record, int]:
    """detectron2's SimpleTrainer with its LR schedule, periodic checkpoints and distill's record hook, the
    model resumed from its last checkpoint (or initialised from ``init``); the iteration to start at."""
    model = detector.model
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler)
    start_iter = _resume_or_init(checkpointer, detector, init, out_dir)
    trainer = SimpleTrainer(model, _data_loader(cfg, names, ratio, seed, start_iter), optimizer)
    record = _Record(context, cfg.SOLVER.MAX_ITER, checkpointer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(optimizer=optimizer, scheduler=scheduler),
            hooks.PeriodicCheckpointer(
                checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=cfg.SOLVER.MAX_ITER
            ),
            record,
        ]
    )
    return trainer, record, start_iter


def _model_config(cfg: CfgNode, label_space: Any) -> Detectron2ModelConfig:
    """distill's ``config.yaml`` of the model ``cfg`` builds: the labeled set's label space, the test view."""
    keypoints = bool(cfg.MODEL.KEYPOINT_ON)
    return Detectron2ModelConfig(
        class_names=list(label_space.class_names),
        category_ids=list(label_space.category_ids),
        keypoint_names=list(label_space.keypoint_names) if keypoints else [],
        keypoint_flip_map=list(label_space.keypoint_flip_map) if keypoints else [],
        keypoint_sigmas=label_space.keypoint_sigmas if keypoints else None,
        # detectron2's keypoint head predicts keypoints for every detection, whatever its class
        keypoint_category_ids=list(label_space.category_ids) if keypoints else [],
        masks=bool(cfg.MODEL.MASK_ON),
        test_size=int(cfg.INPUT.MIN_SIZE_TEST),
        max_size=int(cfg.INPUT.MAX_SIZE_TEST),
    )


def _finished_run(out_dir: Path, iterations: int) -> TrainResult | None:
    """The record of a complete run in ``out_dir`` (its ``meta.json``), if there is one of this length."""
    if not is_complete(out_dir, iterations):
        return None
    training = read_meta(out_dir)["training"]
    return TrainResult(
        iterations=iterations,
        first_losses=training.get("first_loss", {}),
        final_losses=training.get("final_loss", {}),
        seconds=float(training.get("seconds", 0.0)),
        resumed_from=iterations,
    )


def _training_cfg(
    cfg: CfgNode,
    label_space: Any,
    out_dir: Path,
    iterations: int | None,
    batch_size: int | None,
    base_lr: float | None,
    seed: int,
    device: str,
) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(label_space.class_names)
    if cfg.MODEL.KEYPOINT_ON:
        if not label_space.has_keypoints:
            raise InputError(
                "the config has MODEL.KEYPOINT_ON but the labeled categories define no keypoints"
            )
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(label_space.keypoint_names)
    cfg.INPUT.MASK_FORMAT = "bitmask"  # pseudo-label masks are RLE; polygons convert too
    cfg.OUTPUT_DIR = str(out_dir / CHECKPOINT_DIR)
    cfg.SEED = seed
    cfg.DATALOADER.NUM_WORKERS = min(cfg.DATALOADER.NUM_WORKERS, os.cpu_count() or 1)
    if batch_size is not None:
        cfg.SOLVER.IMS_PER_BATCH = batch_size
    if base_lr is not None:
        cfg.SOLVER.BASE_LR = base_lr
    if iterations is not None:
        scale = iterations / cfg.SOLVER.MAX_ITER
        steps = sorted({max(1, round(s * scale)) for s in cfg.SOLVER.STEPS})
        cfg.SOLVER.STEPS = tuple(s for s in steps if s < iterations)
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(0, iterations // 10))
        cfg.SOLVER.MAX_ITER = iterations
        cfg.SOLVER.CHECKPOINT_PERIOD = min(cfg.SOLVER.CHECKPOINT_PERIOD, max(1, math.ceil(iterations / 4)))
    cfg.freeze()
    return cfg


def _register(json_file: str | Path, images: str | Path, label_space: Any, role: str) -> str:
    """Register a COCO file as a detectron2 dataset; returns its name.

    Idempotent within a process: the name hashes the json's path, its content *and* the image root, so the
    same json content in another folder, or with other images, is another dataset (a long-lived worker
    trains job after job in one process, and detectron2's catalog is global).
    """
    name = dataset_name(json_file, images, role)
    if name not in DatasetCatalog.list():
        path = Path(json_file).resolve()
        image_root = str(Path(images).resolve())
        num_keypoints = len(label_space.keypoint_names)
        DatasetCatalog.register(name, lambda: _load_dicts(path, image_root, name, num_keypoints))
        meta = MetadataCatalog.get(name)
        meta.set(thing_classes=list(label_space.class_names), json_file=str(path), image_root=image_root)
        if label_space.has_keypoints:
            meta.set(
                keypoint_names=list(label_space.keypoint_names),
                keypoint_flip_map=[tuple(p) for p in label_space.keypoint_flip_map],
            )
    return name


def dataset_name(json_file: str | Path, images: str | Path, role: str) -> str:
    """The catalog name of a COCO file with its image root: ``distill_{role}_{hash}``."""
    path = Path(json_file).resolve()
    digest = hashlib.sha256()
    for part in (str(path).encode(), str(Path(images).resolve()).encode(), path.read_bytes()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return f"distill_{role}_{digest.hexdigest()[:16]}"


def _load_dicts(path: Path, image_root: str, name: str, num_keypoints: int) -> list[dict]:
    """detectron2 dataset dicts of a COCO file. For a keypoint model, instances without keypoints (other
    classes) get all-invisible ones: detectron2's keypoint head reads ``gt_keypoints`` of every foreground
    proposal, so an image whose instances carry none would fail."""
    dicts = load_coco_json(str(path), image_root, name)
    if num_keypoints:
        empty = [0.0] * (3 * num_keypoints)
        for record in dicts:
            for annotation in record.get("annotations", []):
                annotation.setdefault("keypoints", empty)
    return dicts


def _data_loader(cfg: CfgNode, names: list[str], ratio: tuple[float, float], seed: int, start_iter: int):
    """Endless minibatches of mapped dataset dicts, labeled : pseudo at ``ratio``."""
    min_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
    labeled = get_detection_dataset_dicts(
        [names[0]], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, min_keypoints=min_keypoints
    )
    parts = [labeled]
    if len(names) > 1:  # pseudo-labels: negatives stay, no keypoint minimum
        parts.append(get_detection_dataset_dicts([names[1]], filter_empty=False, min_keypoints=0))
    sizes = [len(p) for p in parts]
    mix = list(ratio) if len(parts) > 1 else [1.0]
    sampler = RatioBatchSampler(sizes, mix, cfg.SOLVER.IMS_PER_BATCH, seed=seed)
    dataset = MapDataset(DatasetFromList([d for p in parts for d in p], copy=False), DatasetMapper(cfg, True))
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_Batches(sampler, start_iter),
        collate_fn=_as_list,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def _as_list(batch: list[dict]) -> list[dict]:
    """detectron2 models take a list of dataset dicts (a module-level function: picklable for workers)."""
    return batch


class _Batches:
    """An iterable batch sampler over :meth:`RatioBatchSampler.batches` from ``start`` on."""

    def __init__(self, sampler: RatioBatchSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return self.sampler.batches(self.start)


def _resume_or_init(
    checkpointer: DetectionCheckpointer, detector: Detectron2Detector, init: str, out_dir: Path
) -> int:
    """The iteration to start from: after the last checkpoint, or 0 after loading ``init``."""
    if checkpointer.has_checkpoint():
        state = checkpointer.resume_or_load("", resume=True)
        return int(state.get("iteration", -1)) + 1
    if init == "imagenet":
        weights = detector.cfg.MODEL.WEIGHTS
        if weights and not Path(weights).is_file():
            raise InputError(
                f"MODEL.WEIGHTS {weights!r} is not a local file (no downloads here); pass a local "
                "weights path as init, or init scratch"
            )
        if weights:
            detector.load_weights(weights, strict=False)
    elif init != "scratch":
        path = Path(init)
        if path.is_dir():
            path = path / "weights.pt"
        counts = detector.load_weights(path, strict=False)
        if counts["loaded"] == 0:
            raise InputError(f"{path}: no tensor matches this model by name and shape")
    return 0


class _Record(HookBase):
    """First and last losses, progress events, and the cancel check after every step."""

    def __init__(self, context: StepContext, total: int, checkpointer: DetectionCheckpointer) -> None:
        self.context, self.total, self.checkpointer = context, total, checkpointer
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._started = time.perf_counter()
        self._start_iter: int | None = None

    def after_step(self) -> None:
        storage = self.trainer.storage
        histories = storage.histories()
        # distill's names: "total" and detectron2's loss_* terms
        losses = {k: float(v.latest()) for k, v in histories.items() if k.startswith("loss")}
        if "total_loss" in histories:
            losses["total"] = float(histories["total_loss"].latest())
        if not self.first:
            self.first = losses
        self.last = losses
        iteration = self.trainer.iter + 1
        if self._start_iter is None:
            self._start_iter = iteration - 1
        elapsed = time.perf_counter() - self._started
        lr = float(storage.history("lr").latest()) if "lr" in histories else 0.0
        speed = (iteration - self._start_iter) / max(elapsed, 1e-9)
        self.context.report(
            "train", iteration, self.total, values={**losses, "lr": lr, "iters_per_second": speed}
        )
        if iteration < self.total and self.context.cancelled():
            # the same record PeriodicCheckpointer writes: resume_or_load continues at iteration + 1
            self.checkpointer.save(f"model_{self.trainer.iter:07d}", iteration=self.trainer.iter)
            raise Cancelled(f"detectron2 training at iteration {iteration} of {self.total}")


def read_cfg_of_model(model_dir: str | Path) -> CfgNode:
    """The detectron2 config saved in a distill model directory."""
    from distill.models.config import load_model_config
    from distill.models.detectron2 import load_cfg

    model_dir = Path(model_dir)
    config = load_model_config(model_dir / "config.yaml")
    if not isinstance(config, Detectron2ModelConfig):
        raise InputError(f"{model_dir}: a {config.backend} model, not a detectron2 one")
    return load_cfg(model_dir / config.detectron2_config)


__all__ = ["read_cfg_of_model", "train_detectron2"]
