"""The training loop: SGD + warmup + step/cosine schedule, gradient clipping, AMP on GPU, checkpoint + resume.

The loop is iteration-based and deterministic from ``TrainConfig.seed``: the batch of iteration ``i`` and its
flips depend only on (seed, i), and the checkpoint carries model, optimizer, scheduler and RNG state, so an
interrupted run resumed from its checkpoint continues the same trajectory.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from distill.errors import Cancelled, TrainingError
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_bytes_atomic
from distill.models.files import CHECKPOINT_FILE
from distill.models.files import TRAIN_LOG_FILE as LOG_FILE
from distill.train.data import Target, hflip
from distill.train.samplers import ShuffledBatchSampler

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """How to train (not what: that is the :class:`~distill.models.config.ModelConfig`)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1000, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    batch_size: int = Field(4, ge=1)
    base_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    schedule: Literal["step", "cosine"] = "cosine"
    steps: list[float] = Field(
        default_factory=lambda: [0.67, 0.89], description="step schedule, as fractions"
    )
    gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_norm: float | None = Field(10.0, gt=0)
    amp: bool | Literal["auto"] = "auto"
    seed: int = 0
    hflip_prob: float = Field(0.5, ge=0, le=1)
    checkpoint_period: int = Field(200, ge=1)
    log_period: int = Field(20, ge=1)
    keep_empty_images: bool = True


@dataclass
class TrainResult:
    iterations: int
    resumed_from: int
    final_losses: dict[str, float]
    first_losses: dict[str, float]
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class BatchSampler(Protocol):
    def batches(self, start_iteration: int = 0) -> object: ...


class TrainableDetector(Protocol):
    device: torch.device

    def losses(self, images: list[torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]: ...

    def keypoint_flip_indices(self) -> torch.Tensor | None: ...

    def train(self, mode: bool = True) -> object: ...

    def parameters(self) -> object: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


def lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """Multiplier of ``base_lr`` at ``iteration`` (0-based): linear warmup, then step or cosine decay."""
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * iteration / cfg.iterations))
    else:
        decay = cfg.gamma ** sum(iteration >= int(s * cfg.iterations) for s in cfg.steps)
    return warm * decay


def train_detector(
    detector: TrainableDetector,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    sampler: BatchSampler | None = None,
    context: StepContext = NULL_CONTEXT,
) -> TrainResult:
    """Train ``detector`` in place; resumes from ``out_dir/checkpoint.pt`` when present.

    ``sampler`` yields lists of dataset indices (default: shuffled epochs). Every iteration reports a
    ``train`` progress event (losses, lr, it/s as values) and checks ``context`` for a cancel: then a
    checkpoint is written and :class:`~distill.errors.Cancelled` raised, so a re-run resumes there.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = detector.device
    sampler = sampler or ShuffledBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
    use_amp = device.type == "cuda" if cfg.amp == "auto" else bool(cfg.amp and device.type == "cuda")
    params = [p for p in detector.parameters() if p.requires_grad]
    state = _State(detector, _optimizer(params, cfg), cfg, out_dir / CHECKPOINT_FILE, use_amp)
    flip_indices = detector.keypoint_flip_indices()
    flip_list = None if flip_indices is None else flip_indices.tolist()

    start = state.resume()
    if start == 0:
        torch.manual_seed(cfg.seed)
        (out_dir / LOG_FILE).unlink(missing_ok=True)
    elif start < cfg.iterations:
        logger.info("resuming training from %s at iteration %d", state.path, start)
    detector.train()
    history: list[dict[str, float]] = []
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    began = time.perf_counter()
    speed = _Speed(began)
    iteration = start
    batches = iter(sampler.batches(start))
    while iteration < cfg.iterations:
        if context.cancelled():
            state.save(iteration)
            raise Cancelled(
                f"training at iteration {iteration} of {cfg.iterations} (checkpoint {state.path})"
            )
        images, targets = _load_batch(dataset, next(batches), cfg, iteration, flip_list, device)
        values = state.step(images, targets, iteration, params)
        iteration += 1
        first = first or values
        last = values
        lr = state.optimizer.param_groups[0]["lr"]
        if iteration % cfg.log_period == 0 or iteration == cfg.iterations:
            history.append(_log(out_dir / LOG_FILE, {"iteration": iteration, "lr": lr, **values}))
        rate = speed.tick(iteration % cfg.log_period == 0)
        context.report(
            "train", iteration, cfg.iterations, values={**values, "lr": lr, "iters_per_second": rate}
        )
        if iteration % cfg.checkpoint_period == 0 or iteration == cfg.iterations:
            state.save(iteration)
    detector.eval()
    return TrainResult(iteration, start, last, first, time.perf_counter() - began, history)


def _log(path: Path, record: dict[str, float]) -> dict[str, float]:
    """Append one line to the training log; returns the record."""
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")
    return record


def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=cfg.weight_decay)


class _Speed:
    """Iterations per second over the current logging window."""

    def __init__(self, now: float) -> None:
        self.start, self.count = now, 0

    def tick(self, new_window: bool) -> float:
        self.count += 1
        now = time.perf_counter()
        rate = self.count / max(now - self.start, 1e-9)
        if new_window:
            self.start, self.count = now, 0
        return rate


class _State:
    """Model, optimizer, LR schedule and AMP scaler of one run: a step, a checkpoint, a resume."""

    def __init__(self, detector, optimizer, cfg: TrainConfig, path: Path, use_amp: bool) -> None:
        self.detector, self.optimizer, self.cfg, self.path = detector, optimizer, cfg, path
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.use_amp = use_amp

    def step(self, images, targets, iteration: int, params) -> dict[str, float]:
        """One SGD step, returning its losses (``total`` included); a non-finite loss is a TrainingError."""
        cfg = self.cfg
        with torch.autocast(self.detector.device.type, enabled=self.use_amp):
            loss_dict = self.detector.losses(images, targets)
        loss = sum(loss_dict.values())
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {float(loss.detach())} at iteration {iteration + 1} ({_fmt(values)}); "
                f"lower base_lr (now {cfg.base_lr}) or set clip_grad_norm (now {cfg.clip_grad_norm}); the "
                f"last good checkpoint is {self.path}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values["total"] = float(loss.detach())
        return values

    def save(self, iteration: int) -> None:
        state = {
            "iteration": iteration,
            "train_config": self.cfg.model_dump(mode="json"),
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.path, buffer.getvalue())

    def resume(self) -> int:
        """The iteration to continue from: the checkpoint's (its state loaded), or 0 without one."""
        if not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location=self.detector.device, weights_only=False)
        except Exception as exc:
            raise TrainingError(
                f"{self.path}: cannot read checkpoint ({exc}); delete it to start over"
            ) from None
        saved, now = state.get("train_config", {}), self.cfg.model_dump(mode="json")
        if saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise TrainingError(
                f"{self.path}: checkpoint was written with another training config (differs in {changed}); "
                "use a new output directory or delete the checkpoint"
            )
        self.detector.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        return int(state["iteration"])


def _load_batch(
    dataset: torch.utils.data.Dataset,
    indices: list[int],
    cfg: TrainConfig,
    iteration: int,
    flip_indices: list[int] | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[Target]]:
    generator = torch.Generator().manual_seed(cfg.seed * 7_919 + iteration)
    flips = (torch.rand(len(indices), generator=generator) < cfg.hflip_prob).tolist()
    images, targets = [], []
    for index, flip in zip(indices, flips, strict=True):
        image, target = dataset[index]
        if flip:
            image, target = hflip(image, target, flip_indices)
        images.append(image.to(device))
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())
