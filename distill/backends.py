"""The detector backends, in one registry: load a model directory, train a model, say what is available.

Every caller that depends on the backend (the steps, the CLI, the benches) goes through here, so backend
dispatch is written once. ``torchvision`` is always available; ``detectron2`` when detectron2 is installed
(it is not on PyPI: see the README). Each backend's modules are imported when first used, so distill imports
without detectron2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from distill.errors import InputError, ModelFileError
from distill.hooks import NULL_CONTEXT, StepContext
from distill.models.config import ModelConfig, load_model_config
from distill.models.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_complete,
    load_exact,
    read_meta,
    read_state_dict,
)
from distill.specs import TrainSpec
from distill.train.loop import TrainResult

__all__ = ["Backend", "get_backend", "list_backends", "load_model", "model_backend"]


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this backend cannot be used here (``None``: it can)."""

    def load(self, directory: Path, config: Any, device: str | torch.device) -> Any:
        """The detector of a model directory whose ``config.yaml`` names this backend."""

    def train(self, spec: TrainSpec, context: StepContext) -> TrainResult:
        """Train ``spec.out`` (all keys in ``spec`` are local paths here); resumes its checkpoint."""

    def default_iterations(self, model_dir: Path) -> int | None:
        """How long the model in ``model_dir`` was (or would be) trained, for a student's schedule."""

    def is_trained(self, spec: TrainSpec, model_dir: Path) -> bool:
        """Whether the complete model directory ``model_dir`` is what training ``spec`` would make (its
        schedule length; for torchvision also the training config), so that the step can reuse it."""


class TorchvisionBackend:
    name = "torchvision"

    def unavailable(self) -> str | None:
        return None

    def load(self, directory: Path, config: Any, device: str | torch.device) -> Any:
        from distill.models.torchvision import TorchvisionDetector

        detector = TorchvisionDetector(config, device=device)
        load_exact(detector.model, read_state_dict(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
        return detector

    def train(self, spec: TrainSpec, context: StepContext = NULL_CONTEXT) -> TrainResult:
        from distill.train.torchvision import train_model, train_student

        if spec.config_overrides or spec.architecture_from:
            raise InputError(
                "config_overrides / architecture_from are for the detectron2 backend (torchvision recipes "
                "take a YAML file)"
            )
        overrides = _train_overrides(spec)
        common = {
            "recipe": spec.config,
            "init": spec.init,
            "device": spec.device,
            "train_overrides": overrides,
            "model_overrides": spec.model_overrides,
            "context": context,
        }
        if spec.pseudo is None:
            result = train_model(spec.labeled, spec.labeled_images, spec.out, **common)
        else:
            result = train_student(
                spec.labeled,
                spec.labeled_images,
                spec.pseudo,
                spec.pseudo_images or spec.labeled_images,
                spec.out,
                ratio=spec.ratio,
                **common,
            )
        return result

    def default_iterations(self, model_dir: Path) -> int | None:
        trained = read_meta(model_dir).get("training", {}).get("iterations")
        return int(trained) if trained else None

    def is_trained(self, spec: TrainSpec, model_dir: Path) -> bool:
        from distill.recipes import load_recipe
        from distill.train.loop import TrainConfig

        cfg = TrainConfig.model_validate({**load_recipe(spec.config)["train"], **_train_overrides(spec)})
        training = read_meta(model_dir).get("training", {})
        return is_complete(model_dir, cfg.iterations) and training.get("config") == cfg.model_dump(
            mode="json"
        )


def _train_overrides(spec: TrainSpec) -> dict[str, Any]:
    fields = {"iterations": spec.iterations, "seed": spec.seed}
    return {**spec.train_overrides, **{k: v for k, v in fields.items() if v is not None}}


class Detectron2Backend:
    name = "detectron2"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("detectron2") is None:
            return (
                "the detectron2 backend needs detectron2, which is not installed here and not on PyPI: "
                "install it from its git source (README, 'detectron2 backend') or use the Docker image"
            )
        return None

    def load(self, directory: Path, config: Any, device: str | torch.device) -> Any:
        from distill.models.detectron2 import Detectron2Detector

        return Detectron2Detector.from_directory(directory, config, device=device)

    def train(self, spec: TrainSpec, context: StepContext = NULL_CONTEXT) -> TrainResult:
        from distill.train.detectron2 import train_detectron2

        if spec.train_overrides or spec.model_overrides:
            raise InputError("train_overrides / model_overrides are for torchvision; use config_overrides")
        return train_detectron2(
            self._cfg(spec),
            spec.labeled,
            spec.labeled_images,
            spec.out,
            pseudo_json=spec.pseudo,
            pseudo_images=spec.pseudo_images or spec.labeled_images,
            ratio=spec.ratio,
            init=spec.init,
            iterations=spec.iterations,
            seed=spec.seed or 0,
            device=spec.device,
            context=context,
        )

    def _cfg(self, spec: TrainSpec) -> Any:
        """The detectron2 config ``spec`` trains: a teacher's (``architecture_from``) or ``spec.config``."""
        from distill.models.detectron2 import load_cfg
        from distill.train.detectron2 import read_cfg_of_model

        if spec.architecture_from is not None:
            cfg = read_cfg_of_model(spec.architecture_from)
            if spec.config_overrides:
                cfg = cfg.clone()
                cfg.defrost()
                cfg.merge_from_list(list(spec.config_overrides))
                cfg.freeze()
            return cfg
        if spec.config is None:
            raise InputError("the detectron2 backend needs a config: a .yaml or a model-zoo config name")
        return load_cfg(spec.config, spec.config_overrides)

    def is_trained(self, spec: TrainSpec, model_dir: Path) -> bool:
        return is_complete(model_dir, spec.iterations or int(self._cfg(spec).SOLVER.MAX_ITER))

    def default_iterations(self, model_dir: Path) -> int | None:
        trained = read_meta(model_dir).get("training", {}).get("iterations")
        if trained:
            return int(trained)
        # an imported model: the schedule of its own detectron2 config (read as YAML, no detectron2 needed)
        config = load_model_config(model_dir / CONFIG_FILE)
        path = model_dir / getattr(config, "detectron2_config", "detectron2.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            return int(raw["SOLVER"]["MAX_ITER"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return None


_BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchvisionBackend(), Detectron2Backend())}


def list_backends() -> dict[str, str | None]:
    """Every backend's name and why it is unavailable here (``None``: usable)."""
    return {name: backend.unavailable() for name, backend in _BACKENDS.items()}


def get_backend(name: str, *, source: str = "backend", require_available: bool = True) -> Backend:
    """The backend called ``name``; an error naming ``source`` when it is unknown (or, with
    ``require_available``, when it cannot run here)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ModelFileError(f"{source}: unknown backend {name!r}; known: {', '.join(_BACKENDS)}")
    reason = backend.unavailable()
    if require_available and reason is not None:
        raise ModelFileError(f"{source}: backend {name!r} is unavailable: {reason}")
    return backend


def model_backend(directory: str | Path) -> str:
    """The backend a model directory's ``config.yaml`` names."""
    return _read_config(Path(directory)).backend


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """Rebuild a detector (of the backend its ``config.yaml`` names) from a model directory."""
    directory = Path(directory)
    config = _read_config(directory)
    return get_backend(config.backend, source=str(directory / CONFIG_FILE)).load(directory, config, device)


def _read_config(directory: Path) -> ModelConfig:
    if not directory.is_dir():
        raise ModelFileError(
            f"{directory}: not a model directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    return load_model_config(directory / CONFIG_FILE)
