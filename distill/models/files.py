"""Model directories on disk: ``config.yaml`` (label space, architecture) + ``weights.pt`` + ``meta.json``.

A detectron2 model directory also holds ``detectron2.yaml``, detectron2's own config (the architecture);
``config.yaml``'s ``backend`` says which backend rebuilds the model (see :mod:`distill.backends`).

The helpers here know files, not backends: writing a model directory atomically, reading its meta record and
weights, loading a state dict exactly or partially (``--init PATH``).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from distill.errors import ModelFileError
from distill.io import write_bytes_atomic, write_json_atomic, write_text_atomic

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"
CHECKPOINT_FILE = "checkpoint.pt"  # torchvision training state, while training or after a cancel
TRAIN_LOG_FILE = "train_log.jsonl"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(directory: str | Path, iterations: int | None = None) -> bool:
    """True when ``directory`` is a finished model directory (of ``iterations`` training iterations, if
    given): a cancelled or running training leaves its checkpoint, never ``weights.pt`` + ``meta.json``."""
    directory = Path(directory)
    if not ((directory / WEIGHTS_FILE).is_file() and (directory / META_FILE).is_file()):
        return False
    return iterations is None or read_meta(directory).get("training", {}).get("iterations") == iterations


def save_model(detector: Any, directory: str | Path, *, extra: dict | None = None) -> Path:
    """Write a model directory atomically file by file; returns the directory.

    ``detector`` is any backend's detector: it has ``model`` (an ``nn.Module``), ``config`` and optionally
    ``config_files()`` (more files of the architecture, name -> text).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in detector.model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(directory / WEIGHTS_FILE, data)
    for name, text in getattr(detector, "config_files", dict)().items():
        write_text_atomic(directory / name, text)
    write_text_atomic(directory / CONFIG_FILE, detector.config.to_yaml())
    meta = {"backend": detector.config.backend, "weights_sha256": hashlib.sha256(data).hexdigest()}
    meta.update(extra or {})
    write_json_atomic(directory / META_FILE, meta, indent=2)
    return directory


def read_meta(directory: str | Path) -> dict:
    """The ``meta.json`` of a model directory ({} if absent)."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth`` file, unwrapping ``{"model": ...}`` / ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        raise ModelFileError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}); truncated or not a PyTorch file?"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``module``: every tensor by name and shape, or an error that says what differs."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            details.append(
                f"{len(mismatched)} with another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise ModelFileError(
            f"{source}: weights do not match the config: {'; '.join(details)}; "
            "was it saved with another config?"
        )
    module.load_state_dict(state)


def load_init_weights(detector: Any, path: str | Path) -> dict[str, int]:
    """Initialise from a model dir, a detector state dict or a backbone checkpoint (partial load).

    Tensors whose name and shape match are copied; a backbone classification checkpoint (``conv1.weight``,
    ``layer1...``) is mapped onto ``backbone.body``. Returns counts; raises if nothing matched.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    state = read_state_dict(path)
    own = detector.model.state_dict()
    if not any(k in own for k in state) and any(f"backbone.body.{k}" in own for k in state):
        state = {f"backbone.body.{k}": v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelFileError(
            f"{path}: no tensor matches this model by name and shape; is it for backbone "
            f"{detector.config.backbone!r}?"
        )
    detector.model.load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": len(state) - len(usable), "model_tensors": len(own)}
