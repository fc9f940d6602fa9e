"""The steps a worker runs: ``train``, ``infer`` (one shard of images), ``pseudo_label``, ``evaluate``.

Each is ``step(spec, storage, context) -> StepResult``: the spec (:mod:`distill.specs`) names inputs and
outputs as storage keys, the :class:`~distill.storage.Storage` resolves them (local paths as they are; remote
ones copied in and out at the step's boundary), and the :class:`~distill.hooks.StepContext` carries progress,
the cancel check and the logger. A step whose output is already complete returns it as ``reused``; a
cancelled step raises :class:`~distill.errors.Cancelled` and leaves nothing that claims completeness, so the
same call again resumes (training from its checkpoint, inference after its last written line). A shard's
output depends only on its inputs, so a redelivered shard overwrites instead of duplicating.

A round is these steps in order (see :mod:`distill.pipeline`, which composes them in-process)::

    train(teacher) -> infer(shard i of n, for every i) -> pseudo_label(all shards) -> train(student)
                   -> evaluate(teacher), evaluate(student) -> promote if the student wins
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from distill.backends import get_backend, load_model
from distill.data.coco import load_coco
from distill.data.images import ImageRef, iter_image_refs
from distill.errors import Cancelled, InputError
from distill.evaluate import evaluate as coco_evaluate
from distill.hooks import NULL_CONTEXT, StepContext
from distill.io import write_json_atomic, write_text_atomic
from distill.layout import calibration_files
from distill.models.files import CONFIG_FILE, META_FILE, WEIGHTS_FILE, file_sha256, is_complete, read_meta
from distill.predict import predict_coco
from distill.pseudo.make import load_predictions, make_pseudo_labels
from distill.specs import EvaluateSpec, InferenceSpec, InferSpec, PseudoLabelSpec, StepResult, TrainSpec
from distill.storage import Storage
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.stream import StreamResult, partial_path, read_unreadable, run_to_jsonl
from distill.tta.views import ViewSet, parse_views

__all__ = ["LOCAL", "evaluate", "evaluate_model", "infer", "pseudo_label", "shard_slice", "train"]


LOCAL = Storage()  # local paths, as given


# -- train -------------------------------------------------------------------------------------------------
# what loading a model needs of its directory (not its checkpoints); detectron2.yaml for detectron2 models
MODEL_FILES = [CONFIG_FILE, WEIGHTS_FILE, META_FILE, "detectron2.yaml"]


def train(spec: TrainSpec, storage: Storage = LOCAL, context: StepContext = NULL_CONTEXT) -> StepResult:
    """Train (or resume training) the model directory ``spec.out`` with ``spec.backend``.

    A model directory already trained to this spec (its backend says: same iterations, for torchvision the
    same training config) is ``reused``; a different one resumes or refuses through its checkpoint.
    """
    backend = get_backend(spec.backend, source=f"backend {spec.backend!r}")
    artifacts = {"model": spec.out}
    config = _local_config(storage, spec.config)
    done = _trained_model(storage, spec.out)
    planned = {
        "config": config,
        "architecture_from": _local_or_none(storage, spec.architecture_from, MODEL_FILES),
    }
    if done is not None and backend.is_trained(spec.model_copy(update=planned), done):
        iterations = read_meta(done).get("training", {}).get("iterations")
        return StepResult(step="train", artifacts=artifacts, reused=True, info={"iterations": iterations})
    out = storage.output(spec.out)
    if not storage.is_local and storage.exists(spec.out):
        storage.local(spec.out)  # what another worker left (checkpoints): resume it
    local = spec.model_copy(
        update={
            "out": str(out),
            "labeled": str(storage.local(spec.labeled)),
            "labeled_images": str(storage.local(spec.labeled_images)),
            "pseudo": _local_or_none(storage, spec.pseudo),
            "pseudo_images": _local_or_none(storage, spec.pseudo_images),
            "architecture_from": planned["architecture_from"],
            "init": spec.init if spec.init in ("scratch", "imagenet") else str(storage.local(spec.init)),
            "config": config,
        }
    )
    try:
        result = backend.train(local, context)
    except Cancelled:
        if not storage.is_local and out.is_dir():
            storage.commit(spec.out)  # the checkpoint, without weights.pt/meta.json: resumable elsewhere
        raise
    storage.commit(spec.out)
    return StepResult(
        step="train",
        artifacts=artifacts,
        metrics={"first_loss": result.first_losses, "final_loss": result.final_losses},
        info={
            "iterations": result.iterations,
            "resumed_from": result.resumed_from,
            "seconds": result.seconds,
        },
    )


def _trained_model(storage: Storage, key: str) -> Path | None:
    """The local copy of a complete model directory at ``key`` (``weights.pt`` + ``meta.json``), or None."""
    if storage.is_local:
        path = Path(storage.path(key))
        return path if is_complete(path) else None
    if not storage.exists(f"{key}/{META_FILE}"):
        return None
    path = storage.local(key, members=MODEL_FILES)
    return path if is_complete(path) else None


def _local_or_none(storage: Storage, key: str | None, members: list[str] | None = None) -> str | None:
    return None if key is None else str(storage.local(key, members=members))


def _local_config(storage: Storage, config: str | None) -> str | None:
    """A recipe / model-zoo name stays a name; a config file in storage becomes a local file."""
    if config is None or not config.endswith((".yaml", ".yml")) or not storage.exists(config):
        return config
    return str(storage.local(config))


# -- infer -------------------------------------------------------------------------------------------------
def shard_slice(count_items: int, shard: tuple[int, int]) -> slice:
    """The contiguous slice of ``count_items`` items that shard ``(index, count)`` covers (sizes differ by
    at most one; every item in exactly one shard)."""
    index, count = shard
    return slice(count_items * index // count, count_items * (index + 1) // count)


def infer(spec: InferSpec, storage: Storage = LOCAL, context: StepContext = NULL_CONTEXT) -> StepResult:
    """Fused multi-view predictions of one shard of images as JSON lines (see :mod:`distill.tta.stream`).

    With ``spec.cache`` (see :class:`_InferCache`) an image whose prediction is cached is not run again:
    only the others go through the engine, streamed (and resumable) as ``OUT.misses`` instead of ``OUT``, and
    are cached; the shard's file is then written in the images' order, line for line as without the cache.
    """
    artifacts = {"predictions": spec.out}
    if storage.exists(spec.out):
        lines = [json.loads(text) for text in storage.local(spec.out).read_text().splitlines()]
        skipped = [_skip(ln.get("file_name") or ln["path"], ln["error"]) for ln in lines if "error" in ln]
        info = {"images": len(lines), "skipped": len(skipped), "skipped_images": skipped}
        return StepResult(step="infer", artifacts=artifacts, reused=True, info=info)
    inference = spec.inference
    model_dir = storage.local(spec.model, members=MODEL_FILES)
    detector = load_model(model_dir, device=spec.device)
    views = parse_views(
        inference.views, test_size=detector.config.test_size, max_size=detector.config.max_size
    )
    fusion = FusionConfig(
        method=inference.fusion,
        max_detections=inference.max_detections,
        score_floor=inference.score_floor,
        view_score_thresh=inference.view_score_thresh,
        feature_cache_mb=inference.feature_cache_mb,
    )
    refs = _shard_refs(storage, spec)
    context.logger.info(
        "multi-view inference: %d images (shard %d of %d) x %d views (%s)",
        len(refs),
        spec.shard[0] + 1,
        spec.shard[1],
        len(views),
        inference.views,
    )
    engine = MultiViewEngine(detector, views, fusion)
    stream_key = spec.out if spec.cache is None else f"{spec.out}{MISSES_SUFFIX}"
    stream = _stage_partial(storage, stream_key)
    cached = 0
    try:
        if spec.cache is None:
            result = run_to_jsonl(engine, refs, stream, batch_size=inference.batch_size, context=context)
        else:
            cache = _InferCache(storage, spec.cache, _cache_settings(model_dir, views, inference), context)
            out = storage.output(spec.out)
            result, cached = _infer_cached(engine, refs, stream, out, cache, inference.batch_size, context)
    except Cancelled:
        if not storage.is_local:
            storage.commit(f"{stream_key}.partial")  # the lines so far: another worker resumes after them
        raise
    storage.commit(spec.out)
    warnings = [f"skipped {path}: {reason}" for path, reason in result.skipped]
    if engine.recomputed_views:
        warnings.append(
            f"the backbone features of {engine.recomputed_views} of {len(views)} views did not fit the "
            "feature cache and were recomputed for the heads (raise feature_cache_mb, or lower batch_size)"
        )
    names = {str(ref.path): ref.file_name for ref in refs}
    return StepResult(
        step="infer",
        artifacts=artifacts,
        warnings=warnings,
        info={
            "images": result.images_done,
            "cached": cached,
            "inferred": result.images_done - cached - len(result.skipped),
            "views": views.to_dict(),
            "skipped": len(result.skipped),
            "skipped_images": [_skip(names.get(str(p), str(p)), why) for p, why in result.skipped],
        },
    )


def _skip(name: str, reason: str) -> dict[str, str]:
    return {"name": name, "reason": reason}


def _stage_partial(storage: Storage, key: str) -> Path:
    """The local output path of a predictions stream, with the ``.partial`` lines of an interrupted run
    (another worker's, on remote storage) in place to resume after."""
    out = storage.output(key)
    if not storage.is_local:
        storage.output(f"{key}.partial")
        if storage.exists(f"{key}.partial"):
            storage.local(f"{key}.partial")
    return out


def _shard_refs(storage: Storage, spec: InferSpec) -> list[ImageRef]:
    if storage.is_local:
        refs = iter_image_refs(storage.path(spec.images), images_dir=_path_or_none(storage, spec.images_dir))
        return refs[shard_slice(len(refs), spec.shard)]
    if not spec.images.endswith(".json") or spec.images_dir is None:
        raise InputError(
            f"{spec.images}: on remote storage the images must be a COCO json with images_dir (a folder "
            "cannot be listed consistently across machines)"
        )
    local_json = storage.local(spec.images)
    images = load_coco(local_json).images
    names = [im["file_name"] for im in images[shard_slice(len(images), spec.shard)]]
    folder = storage.local(spec.images_dir, members=names)  # only this shard's images
    refs = iter_image_refs(local_json, images_dir=folder)
    return refs[shard_slice(len(refs), spec.shard)]


def _path_or_none(storage: Storage, key: str | None) -> str | None:
    return None if key is None else storage.path(key)


# -- the inference cache ---------------------------------------------------------------------------------
MISSES_SUFFIX = ".misses"  # with a cache: the stream of the images that were not cached
CACHE_FORMAT = 1  # bump when what an entry holds, or what the engine makes of the same inputs, changes
SPEED_ONLY = {"batch_size", "feature_cache_mb"}  # inference settings that never change a prediction

_RefKey = tuple[int | None, str]  # (image id, file name): how a stream's line names its image


class _InferCache:
    """Fused per-image predictions, kept under ``PREFIX/SETTINGS/SHA[:2]/SHA.json`` in a storage.

    ``SETTINGS`` is the sha256 of :func:`_cache_settings` (the model's files, the resolved views, the fusion
    settings, :data:`CACHE_FORMAT`), which is written beside the entries as ``settings.json``: one folder per
    model and settings, deleted as a whole. ``SHA`` is the sha256 of the image file's bytes. An entry holds
    what depends on the image's content only: ``height``, ``width`` and the ``instances`` without their
    ``image_id`` (a line's path, file name and ids come from the image reference that finds it).
    """

    def __init__(self, storage: Storage, prefix: str, settings: dict[str, Any], context: StepContext) -> None:
        self.storage, self.settings, self.logger = storage, settings, context.logger
        self.folder = f"{prefix.rstrip('/')}/{_sha256_json(settings)}"
        self._recorded = False

    def read(self, image_sha256: str) -> dict[str, Any] | None:
        """The entry of an image, or None: not cached, or unreadable (logged; inferred and rewritten)."""
        key = self._key(image_sha256)
        try:
            entry = json.loads(self.storage.local(key).read_text())
            _check_entry(entry)
        except (FileNotFoundError, InputError):  # InputError: a remote storage lacks the key
            return None
        except (OSError, ValueError) as error:
            self.logger.warning("inference cache: %s is unreadable (%s)", self.storage.describe(key), error)
            return None
        return entry

    def write(self, image_sha256: str, line: dict[str, Any]) -> None:
        """Cache the fused prediction ``line`` of an image (a complete file, then published)."""
        if not self._recorded:
            self._publish(f"{self.folder}/settings.json", self.settings)
            self._recorded = True
        entry = {
            "height": line["height"],
            "width": line["width"],
            "instances": [{k: v for k, v in i.items() if k != "image_id"} for i in line["instances"]],
        }
        self._publish(self._key(image_sha256), entry)

    def _key(self, image_sha256: str) -> str:
        return f"{self.folder}/{image_sha256[:2]}/{image_sha256}.json"

    def _publish(self, key: str, record: dict[str, Any]) -> None:
        write_json_atomic(self.storage.output(key), record)
        self.storage.commit(key)


def _check_entry(entry: Any) -> None:
    """Raise ValueError unless ``entry`` has the shape :meth:`_InferCache.write` gives it."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("height"), int)
        and isinstance(entry.get("width"), int)
        and isinstance(entry.get("instances"), list)
        and all(isinstance(instance, dict) for instance in entry["instances"])
    ):
        raise ValueError("not a cached prediction")


def _cache_settings(model_dir: Path, views: ViewSet, inference: InferenceSpec) -> dict[str, Any]:
    """What a prediction depends on besides the image: the sha256 of each model file, the views resolved
    against the model (not their spelling), the inference settings but :data:`SPEED_ONLY`, the format."""
    return {
        "format": CACHE_FORMAT,
        "model": {
            name: _model_file_sha256(model_dir / name) for name in MODEL_FILES if (model_dir / name).is_file()
        },
        "views": {k: v for k, v in views.to_dict().items() if k != "spec"},
        "inference": inference.model_dump(mode="json", exclude={"views", *SPEED_ONLY}),
    }


def _model_file_sha256(path: Path) -> str:
    """The sha256 of a model file, memoised by (path, size, mtime): a worker hashes its weights once."""
    stat = path.stat()
    return _memo_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _memo_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)  # size and mtime_ns only key the memo


def _sha256_json(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _image_sha256(path: str) -> str | None:
    """The sha256 of an image file; None when it cannot be read (the stream's line says why; not cached)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _infer_cached(
    engine: MultiViewEngine,
    refs: list[ImageRef],
    stream: Path,
    out: Path,
    cache: _InferCache,
    batch_size: int,
    context: StepContext,
) -> tuple[StreamResult, int]:
    """Write the prediction lines of ``refs`` to ``out``, in their order: cached ones from ``cache``, the
    others run through ``stream`` (resumable, as ``run_to_jsonl`` streams are) and then cached.

    Images named by the stream's ``.partial`` lines are taken from there, not from the cache, so that the
    stream's images stay the ones it was started with. Returns the result and the number of cache hits.
    """
    partial = partial_path(stream)
    if stream.exists():
        os.replace(stream, partial)  # finished but not merged (the process died then): resume it
    resumed = _stream_keys(partial)
    digests = {_ref_key(ref): _image_sha256(ref.path) for ref in refs}
    texts: dict[_RefKey, str] = {}
    misses = []
    for ref in refs:
        digest = digests[_ref_key(ref)]
        entry = None if digest is None or _ref_key(ref) in resumed else cache.read(digest)
        if entry is None:
            misses.append(ref)
        else:
            texts[_ref_key(ref)] = json.dumps(_cached_line(ref, entry)) + "\n"
    hits = len(refs) - len(misses)
    context.report("infer", hits, len(refs))
    errors: dict[_RefKey, tuple[str, str]] = {}
    if misses:
        run_to_jsonl(engine, misses, stream, batch_size=batch_size, context=_offset(context, hits, len(refs)))
        for text in stream.read_text().splitlines(keepends=True):
            line = json.loads(text)
            key = _line_key(line)
            texts[key] = text
            if "error" in line:
                errors[key] = (line["path"], line["error"])
            elif digests[key] is not None:
                cache.write(digests[key], line)
    write_text_atomic(out, "".join(texts[_ref_key(ref)] for ref in refs))
    stream.unlink(missing_ok=True)
    skipped = [errors[_ref_key(ref)] for ref in refs if _ref_key(ref) in errors]
    return StreamResult(out, len(refs), len(refs), skipped), hits


def _cached_line(ref: ImageRef, entry: dict[str, Any]) -> dict[str, Any]:
    """The stream line of ``ref`` from its cache entry: the keys, in the order, that the stream writes."""
    return {
        "path": ref.path,
        "file_name": ref.file_name,
        "image_id": ref.image_id,
        "height": entry["height"],
        "width": entry["width"],
        "instances": [{"image_id": ref.image_id or 0, **instance} for instance in entry["instances"]],
    }


def _ref_key(ref: ImageRef) -> _RefKey:
    return (ref.image_id, ref.file_name)


def _line_key(line: dict[str, Any]) -> _RefKey:
    return (line["image_id"], line["file_name"])


def _stream_keys(path: Path) -> set[_RefKey]:
    """The images that the complete lines of a predictions stream name (none when there is no stream)."""
    if not path.is_file():
        return set()
    return {_line_key(json.loads(t)) for t in path.read_text().splitlines(keepends=True) if t.endswith("\n")}


def _offset(context: StepContext, done: int, total: int) -> StepContext:
    """``context`` with progress counted on from ``done`` of ``total`` (the cache hits, the whole shard)."""
    return StepContext(
        progress=lambda e: context.report(e.stage, done + e.done, total, e.message, e.values),
        should_cancel=context.cancelled,
        logger=context.logger,
    )


# -- pseudo_label ------------------------------------------------------------------------------------------
def pseudo_label(
    spec: PseudoLabelSpec, storage: Storage = LOCAL, context: StepContext = NULL_CONTEXT
) -> StepResult:
    """Calibrate the threshold(s) on every shard's predictions and write the pseudo-label file + report."""
    report_key, plot_key = calibration_files(spec.out)
    artifacts = {"pseudo_labels": spec.out, "calibration": report_key, "calibration_plot": plot_key}
    if storage.exists(spec.out) and storage.exists(report_key):
        calibration = json.loads(storage.local(report_key).read_text())
        return StepResult(
            step="pseudo_label",
            artifacts=artifacts,
            reused=True,
            metrics=_calibration_metrics(calibration),
            warnings=calibration["warnings"],
        )
    entries: list[dict[str, Any]] = []
    unreadable: list[int] = []
    for i, key in enumerate(spec.predictions):
        context.check_cancelled(
            f"pseudo-labels while reading predictions file {i + 1} of {len(spec.predictions)}"
        )
        local = storage.local(key)
        entries.extend(load_predictions(local))
        if local.suffix == ".jsonl":
            unreadable.extend(read_unreadable(local))
        context.report("pseudo_label", i + 1, len(spec.predictions), "reading predictions")
    context.check_cancelled("pseudo-labels before calibrating (nothing written)")
    cal = spec.calibration
    out = storage.output(spec.out)
    for key in (report_key, plot_key):
        storage.output(key)
    calibration = make_pseudo_labels(
        entries,
        unlabeled=storage.local(spec.unlabeled),
        # a json's images carry their sizes: on remote storage the folder is not needed (members=[])
        unlabeled_images_dir=_local_or_none(
            storage, spec.unlabeled_images, _no_members(storage, spec.unlabeled)
        ),
        labeled_json=storage.local(spec.labeled),
        out=out,
        per_class=cal.per_class,
        threshold=cal.threshold,
        min_agreement=cal.min_agreement,
        keypoint_threshold=cal.keypoint_threshold,
        strict=cal.strict,
        provenance=spec.provenance,
        source=", ".join(spec.predictions),
        unreadable=unreadable,
    )
    for key in (report_key, plot_key, spec.out):  # the pseudo-label file last: it marks completion
        storage.commit(key)
    record = calibration.to_dict()
    return StepResult(
        step="pseudo_label",
        artifacts=artifacts,
        metrics=_calibration_metrics(record),
        warnings=list(calibration.warnings),
    )


def _no_members(storage: Storage, source: str) -> list[str] | None:
    return [] if not storage.is_local and source.endswith(".json") else None


def _calibration_metrics(record: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "mode",
        "threshold",
        "class_thresholds",
        "keypoint_thresholds",
        "kept_instances",
        "kept_per_image",
    )
    return {k: record[k] for k in keys} | {"labeled_per_image": record["labeled_instances_per_image"]}


# -- evaluate ----------------------------------------------------------------------------------------------
def evaluate_model(
    model_dir: str | Path,
    truth_json: str | Path,
    images_dir: str | Path | None,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    context: StepContext = NULL_CONTEXT,
) -> dict[str, dict[str, float]]:
    """COCO metrics of a model directory on a labeled COCO split (one plain view).

    Every head the model has is scored, 0 when it produced nothing of that kind (a weak model with no
    keypoint-class detections still has a keypoint AP, so rounds can compare it).
    """
    truth = load_coco(truth_json)
    detector = load_model(model_dir, device=device)
    refs = iter_image_refs(truth_json, images_dir=images_dir)
    results = predict_coco(detector, refs, batch_size=batch_size, context=context, stage="evaluate")
    iou_types = ["bbox"]
    if detector.has_masks:
        iou_types.append("segm")
    if detector.has_keypoints and truth.keypoint_categories():
        iou_types.append("keypoints")
    return coco_evaluate(truth, results, iou_types=iou_types)


def evaluate(spec: EvaluateSpec, storage: Storage = LOCAL, context: StepContext = NULL_CONTEXT) -> StepResult:
    """COCO metrics of ``spec.model`` on ``spec.truth``, written to ``spec.out`` (when given)."""
    artifacts = {"metrics": spec.out} if spec.out else {}
    if spec.out is not None and storage.exists(spec.out):
        metrics = json.loads(storage.local(spec.out).read_text())
        return StepResult(step="evaluate", artifacts=artifacts, metrics=metrics, reused=True)
    truth = storage.local(spec.truth)
    images = None
    if spec.images is not None:
        names = None if storage.is_local else [im["file_name"] for im in load_coco(truth).images]
        images = storage.local(spec.images, members=names)
    elif not storage.is_local:
        raise InputError(f"{spec.truth}: on remote storage an evaluation needs its images folder (images)")
    model = storage.local(spec.model, members=MODEL_FILES)
    metrics = evaluate_model(
        model,
        truth,
        images,
        device=spec.device,
        batch_size=spec.batch_size,
        context=context,
    )
    if spec.out is not None:
        write_json_atomic(storage.output(spec.out), metrics, indent=2)
        storage.commit(spec.out)
    return StepResult(
        step="evaluate",
        artifacts=artifacts,
        metrics=metrics,
        info={"model_sha256": file_sha256(model / WEIGHTS_FILE)},
    )
