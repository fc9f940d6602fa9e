"""Pseudo-label files from fused predictions: calibrate the threshold(s), write the COCO file and the
calibration report and plot beside it (``distill calibrate``, the ``pseudo_label`` step)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from distill.data.coco import coco_statistics, load_coco, load_results, save_coco, validate_results
from distill.data.images import image_size, iter_image_refs
from distill.errors import InputError
from distill.io import write_json_atomic
from distill.layout import calibration_files
from distill.models.files import file_sha256
from distill.pseudo.calibrate import Calibration, calibrate
from distill.pseudo.labels import build_pseudo_labels
from distill.pseudo.plot import plot_calibration
from distill.tta.stream import read_instances, read_unreadable


def unlabeled_images(source: str | Path, images_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """COCO image entries (id, file_name, width, height) of an unlabeled set: a COCO json or an image folder.

    For a folder, ids are positions + 1 (as ``distill predict`` assigns them) and sizes are read from the
    image headers (EXIF rotation applied, like decoding does).
    """
    refs = iter_image_refs(source, images_dir=images_dir)
    if all(r.width is not None and r.height is not None for r in refs):
        return [
            {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height} for r in refs
        ]
    out = []
    for ref in refs:
        width, height = image_size(ref.path)
        out.append({"id": ref.image_id, "file_name": ref.file_name, "width": width, "height": height})
    return out


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """COCO results from a ``.json`` list or a multi-view ``.jsonl`` stream (``agreement`` kept per entry)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: predictions file not found")
        results = read_instances(path)
        validate_results(results, str(path))
        return results
    return load_results(path)


def make_pseudo_labels(
    predictions: str | Path | list[dict[str, Any]],
    *,
    unlabeled: str | Path,
    labeled_json: str | Path,
    out: str | Path,
    unlabeled_images_dir: str | Path | None = None,
    per_class: bool = False,
    threshold: float | None = None,
    min_agreement: float | None = None,
    keypoint_threshold: float | None = None,
    strict: bool = False,
    provenance: dict[str, Any] | None = None,
    source: str | None = None,
    unreadable: Collection[int] | None = None,
) -> Calibration:
    """Calibrate the threshold(s) and write the pseudo-label COCO file ``out`` plus the calibration artifacts
    ``OUT.calibration.json`` and ``OUT.calibration.png``. Under ``strict`` a health warning is an error (and
    nothing is written). ``source`` names the predictions in messages and provenance (default: their path).

    ``unreadable``: ids of unlabeled images the teacher could not read (default: the ``error`` lines of a
    ``.jsonl`` ``predictions``): left out of the pseudo-labels and of the per-image count, since an image
    without a prediction would otherwise enter training as one with no objects.

    The calibration files come first and ``out`` last, so ``out`` existing means all three are complete.
    """
    out = Path(out)
    labeled = load_coco(labeled_json)
    images = unlabeled_images(unlabeled, unlabeled_images_dir)
    if unreadable is None and not isinstance(predictions, list) and Path(predictions).suffix == ".jsonl":
        unreadable = read_unreadable(predictions)
    if unreadable:
        skip = set(unreadable)
        images = [im for im in images if im["id"] not in skip]
    if source is None:
        source = str(predictions) if not isinstance(predictions, list) else "predictions"
    entries = predictions if isinstance(predictions, list) else load_predictions(predictions)
    stats = coco_statistics(labeled)
    if stats.num_instances == 0:
        raise InputError(f"{labeled_json}: the labeled set has no instances; nothing to calibrate against")
    try:
        calibration = calibrate(
            entries,
            labeled=stats,
            unlabeled_image_ids=[im["id"] for im in images],
            per_class=per_class,
            threshold=threshold,
            min_agreement=min_agreement,
            keypoint_threshold=keypoint_threshold,
        )
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    if strict and calibration.warnings:
        raise InputError(
            "calibration failed the health checks (--strict): " + "; ".join(calibration.warnings)
        )
    data = build_pseudo_labels(
        entries,
        images=images,
        labeled=labeled,
        calibration=calibration,
        provenance={
            "predictions": source,
            "labeled": str(labeled_json),
            "labeled_sha256": file_sha256(labeled_json),
            **(provenance or {}),
        },
        source=source,
    )
    report, plot = (Path(p) for p in calibration_files(str(out)))
    write_json_atomic(report, calibration.to_dict(), indent=1)
    plot_calibration(
        calibration,
        plot,
        category_names={c["id"]: c["name"] for c in labeled.categories},
    )
    save_coco(data, out)
    return calibration
