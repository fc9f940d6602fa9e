"""The ``distill`` command. Exit code 0 on success, 2 on bad input (one-line reason on stderr)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from distill.data.presets import PRESETS
from distill.errors import Cancelled, InputError, TrainingError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Data Distillation: turn unlabeled images into training data for a detector.",
)


def _err(message: str) -> None:
    typer.echo(f"distill: error: {message}", err=True)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return name


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output folder")],
    preset: Annotated[str, typer.Option(help=" | ".join(PRESETS))] = "demo",
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
) -> None:
    """Generate the embedded benchmark: labeled / unlabeled (+ hidden truth) / test COCO splits."""
    from distill.data.synthetic import generate

    try:
        result = generate(out, preset=preset, seed=seed, context=_cli_context())
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for split, count in result.num_images.items():
        typer.echo(f"{split:>10}: {count} images, {result.num_annotations.get(split, 0)} annotations")
    typer.echo(f"wrote {result.out_dir}")


@app.command()
def train(
    train_json: Annotated[Path, typer.Option("--train", help="COCO json of the training set")],
    images: Annotated[Path, typer.Option(help="folder the json's file_name entries are relative to")],
    out: Annotated[Path, typer.Option(help="model directory to write (resumes if it holds a checkpoint)")],
    config: Annotated[
        str | None,
        typer.Option(
            help="torchvision: recipe name (synth, coco) or YAML with model:/train:; detectron2: its config "
            "(.yaml or model-zoo name)"
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="torchvision | detectron2")] = "torchvision",
    init: Annotated[
        str,
        typer.Option(
            help="scratch | imagenet (detectron2: the config's MODEL.WEIGHTS) | PATH (model dir or weights)"
        ),
    ] = "scratch",
    iterations: Annotated[int | None, typer.Option(help="override train.iterations")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    pseudo: Annotated[
        Path | None, typer.Option(help="pseudo-label COCO json (distill calibrate): train a student")
    ] = None,
    pseudo_images: Annotated[
        Path | None, typer.Option(help="folder of the pseudo-labels' file names (default: --images)")
    ] = None,
    ratio: Annotated[str, typer.Option(help="labeled:pseudo images per minibatch, with --pseudo")] = "6:4",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="detectron2 config override KEY=VALUE (repeatable)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Train a detector on a COCO dataset (with --pseudo: a student on labeled + pseudo-labeled images)."""
    from distill import steps
    from distill.backends import list_backends
    from distill.specs import TrainSpec

    if backend not in list_backends():
        raise InputError(f"--backend {backend!r}: expected {' or '.join(list_backends())}")
    if set_ and backend != "detectron2":
        raise InputError("--set is for --backend detectron2 (torchvision recipes take a YAML file)")
    if backend == "detectron2" and config is None:
        raise InputError("--backend detectron2 needs --config: a detectron2 .yaml or a model-zoo config name")
    spec = TrainSpec(
        out=str(out),
        labeled=str(train_json),
        labeled_images=str(images),
        pseudo=None if pseudo is None else str(pseudo),
        pseudo_images=str(pseudo_images or images) if pseudo is not None else None,
        ratio=_parse_ratio(ratio),
        backend=backend,
        config=config,
        config_overrides=_parse_sets(set_),
        init=init,
        iterations=iterations,
        seed=seed,
        device=_device(device),
    )
    result = steps.train(spec, context=_cli_context())
    _echo_trained(result, out)


def _echo_trained(result, out: Path) -> None:
    if result.reused:
        typer.echo(f"{out} is complete already ({result.info.get('iterations')} iterations)")
    else:
        first = result.metrics["first_loss"].get("total", float("nan"))
        final = result.metrics["final_loss"].get("total", float("nan"))
        minutes = result.info["seconds"] / 60
        typer.echo(
            f"trained {result.info['iterations']} iterations in {minutes:.1f} min; "
            f"loss {first:.3f} -> {final:.3f}"
        )
    typer.echo(f"model: {out}")


def _parse_sets(items: list[str] | None) -> list[str]:
    """``KEY=VALUE`` options -> detectron2's flat override list."""
    opts: list[str] = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. INPUT.MIN_SIZE_TEST=640")
        opts += [key, value]
    return opts


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="model directory")],
    images: Annotated[Path, typer.Option(help="image folder, list file, or COCO json")],
    out: Annotated[Path, typer.Option(help="COCO results json to write")],
    images_dir: Annotated[
        Path | None, typer.Option(help="folder for a COCO json's file_name entries")
    ] = None,
    views: Annotated[
        str, typer.Option(help="none | paper | SIZES[:flip], e.g. 400,600:flip or 0.5x,1x:flip")
    ] = ("none"),
    fusion: Annotated[str, typer.Option(help="nms | vote | soft-nms | wbf (multi-view only)")] = "nms",
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    score_thresh: Annotated[float | None, typer.Option(help="default: the model's")] = None,
    max_detections: Annotated[
        int,
        typer.Option(min=1, help="multi-view: fused boxes per image; the keypoint/mask heads run on these"),
    ] = 100,
    feature_cache_mb: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="multi-view: memory for the views' backbone features, reused by the heads (default: half "
            "the free GPU memory or a quarter of the available RAM); views that do not fit are recomputed",
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            metavar="KEY_OR_DIR",
            help="multi-view: keep each image's fused prediction under this folder, by model, settings and "
            "image sha256; an image found there is not inferred again",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Run a model on images and write COCO results (multi-view: plus OUT.views.json with agreement)."""
    from distill.backends import load_model
    from distill.data.images import iter_image_refs
    from distill.io import write_json_atomic

    started = time.perf_counter()
    if views == "none":
        from distill.predict import Skipped, predict_coco

        if cache is not None:
            raise InputError("--cache: only multi-view inference is cached; give --views (e.g. paper)")

        refs = iter_image_refs(images, images_dir=images_dir)
        detector = load_model(model, device=_device(device))
        skipped_items: list[Skipped] = []
        results = predict_coco(
            detector, refs, batch_size=batch_size, score_thresh=score_thresh, skipped=skipped_items,
            context=_cli_context(),
        )  # fmt: skip
        skipped = [(s.path, s.reason) for s in skipped_items]
        images_done = len(refs) - len(skipped)
    else:
        from distill.specs import InferenceSpec

        if fusion not in ("nms", "vote", "soft-nms", "wbf"):
            raise InputError(f"--fusion {fusion!r}: expected nms, vote, soft-nms or wbf")
        inference = InferenceSpec(
            views=views, fusion=fusion, batch_size=batch_size, max_detections=max_detections,
            view_score_thresh=score_thresh, feature_cache_mb=feature_cache_mb,
        )  # fmt: skip
        results, skipped = _predict_views(model, images, images_dir, out, inference, _device(device), cache)
        images_done = len(iter_image_refs(images, images_dir=images_dir)) - len(skipped)
    write_json_atomic(out, results)
    seconds = time.perf_counter() - started
    typer.echo(f"{len(results)} detections on {images_done} images ({seconds:.1f} s) -> {out}")
    for path, reason in skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)


def _predict_views(
    model: Path, images: Path, images_dir: Path | None, out: Path, inference, device: str, cache: str | None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Multi-view predict through the ``infer`` step: the fused results (with agreement), also written as
    ``OUT.jsonl`` (the resumable stream) and ``OUT.views.json`` (view set, fusion, agreement, skipped);
    ``cache``: the step's inference cache (see :attr:`distill.specs.InferSpec.cache`)."""
    from distill import steps
    from distill.io import write_json_atomic
    from distill.specs import InferSpec
    from distill.tta.stream import read_instances

    lines = out.with_name(out.name + ".jsonl")
    spec = InferSpec(
        model=str(model),
        images=str(images),
        images_dir=None if images_dir is None else str(images_dir),
        out=str(lines),
        inference=inference,
        device=device,
        cache=cache,
    )
    result = steps.infer(spec, context=_cli_context())
    if cache is not None and not result.reused:
        typer.echo(
            f"inference cache: {result.info['cached']} images cached, {result.info['inferred']} inferred"
        )
    for warning in result.warnings:
        if not warning.startswith("skipped "):
            typer.echo(f"note: {warning}", err=True)
    streamed = [json.loads(t) for t in lines.read_text().splitlines()]
    skipped = [(line["path"], line["error"]) for line in streamed if "error" in line]
    results = read_instances(lines)  # each keeps its agreement, for calibrate --min-agreement
    write_json_atomic(
        out.with_name(out.name + ".views.json"),
        {
            "views": result.info.get("views") or _views_of(model, inference.views),
            "fusion": inference.fusion,
            "agreement": [r["agreement"] for r in results],
            "skipped": skipped,
        },
    )
    return results, skipped


def _views_of(model: Path, views: str) -> dict:
    """The view set of a model (for a stream that was complete already)."""
    from distill.models.config import load_model_config
    from distill.tta.views import parse_views

    config = load_model_config(model / "config.yaml")
    return parse_views(views, test_size=config.test_size, max_size=config.max_size).to_dict()


@app.command()
def fuse(
    results: Annotated[
        list[Path], typer.Argument(metavar="RESULTS", help="COCO results files to fuse (two or more)")
    ],
    out: Annotated[Path, typer.Option(help="fused COCO results json to write")],
    fusion: Annotated[
        str, typer.Option(help="vote (score-weighted boxes) | wbf (cluster means) | nms | soft-nms")
    ] = "vote",
    iou: Annotated[float, typer.Option(help="clustering IoU threshold, in (0, 1]")] = 0.5,
    max_detections: Annotated[int, typer.Option(min=0, help="per image; 0: no limit")] = 100,
) -> None:
    """Output-level fusion of COCO results (boxes, keypoints, RLE masks) from any source; every fused
    detection gets an "agreement": the fraction of the files with a same-class detection at IoU >= 0.5."""
    from distill.tta.boxes import FUSION_METHODS
    from distill.tta.instances import fuse_result_files

    if len(results) < 2:
        raise InputError(f"need at least two results files, got {len(results)}")
    if fusion not in FUSION_METHODS:
        raise InputError(f"--fusion {fusion!r}: expected nms, vote, soft-nms or wbf")
    if not 0.0 < iou <= 1.0:
        raise InputError(f"--iou {iou}: expected a value in (0, 1]")
    started = time.perf_counter()
    summary = fuse_result_files(
        results, out, method=fusion, iou_thresh=iou, max_detections=max_detections or None
    )
    seconds = time.perf_counter() - started
    typer.echo(
        f"fused {summary.inputs} files ({summary.input_detections} detections) into {summary.detections} "
        f"detections on {summary.images} images ({seconds:.1f} s) -> {summary.out}"
    )


@app.command("import-detectron2")
def import_detectron2(
    config: Annotated[
        str,
        typer.Argument(
            help="detectron2 config: a .yaml path or a model-zoo name, e.g. "
            "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"
        ),
    ],
    out: Annotated[Path, typer.Option(help="model directory to write")],
    weights: Annotated[
        str | None,
        typer.Option(help="model_final.pth (or a Detectron .pkl); default: the config's MODEL.WEIGHTS"),
    ] = None,
    categories: Annotated[
        Path | None,
        typer.Option(
            help="COCO json whose categories are the label space (default: the config's dataset metadata)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="detectron2 config override KEY=VALUE (repeatable)")
    ] = None,
) -> None:
    """Turn a detectron2 config + weights into a distill model directory (needs detectron2 installed)."""
    try:
        from distill.models.detectron2 import import_detectron2_model
    except ImportError as exc:
        raise InputError(str(exc)) from None
    model_dir = import_detectron2_model(
        config, weights, out, opts=_parse_sets(set_), categories_file=categories
    )
    from distill.backends import load_model

    detector = load_model(model_dir)
    c = detector.config
    typer.echo(
        f"imported {config} -> {model_dir}: {len(c.class_names)} classes, "
        f"masks {'on' if c.masks else 'off'}, {len(c.keypoint_names)} keypoints, "
        f"test size {c.test_size} (max {c.max_size})"
    )


@app.command()
def evaluate(
    truth: Annotated[Path, typer.Option(help="COCO json with the true annotations")],
    predictions: Annotated[Path | None, typer.Option(help="COCO results json")] = None,
    model: Annotated[Path | None, typer.Option(help="model directory (instead of --predictions)")] = None,
    images: Annotated[Path | None, typer.Option(help="image folder for --model")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the metrics here")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """COCO AP of predictions (or of a model run on the truth's images) with pycocotools."""
    from distill.data.coco import load_coco, load_results
    from distill.evaluate import evaluate as run_eval
    from distill.evaluate import format_table
    from distill.io import write_json_atomic

    if (predictions is None) == (model is None):
        raise InputError("give exactly one of --predictions or --model")
    if predictions is not None:
        dataset = load_coco(truth)
        metrics = run_eval(dataset, load_results(predictions, dataset))
    else:
        from distill.steps import evaluate_model

        metrics = evaluate_model(model, truth, images, device=_device(device), context=_cli_context())
    typer.echo(format_table({"value": metrics}, keys=("AP", "AP50", "AP75", "APs", "APm", "APl")))
    if json_out is not None:
        write_json_atomic(json_out, metrics, indent=2)


@app.command()
def calibrate(
    predictions: Annotated[Path, typer.Option(help="COCO results json, or a multi-view .jsonl stream")],
    unlabeled: Annotated[Path, typer.Option(help="the unlabeled images: COCO json or image folder")],
    labeled: Annotated[Path, typer.Option(help="labeled COCO json (the target density)")],
    out: Annotated[Path, typer.Option(help="pseudo-label COCO json to write")],
    unlabeled_images: Annotated[
        Path | None, typer.Option(help="folder for the unlabeled json's file names")
    ] = None,
    per_class: Annotated[bool, typer.Option(help="one threshold per class")] = False,
    threshold: Annotated[float | None, typer.Option(help="fixed score threshold instead")] = None,
    keypoint_threshold: Annotated[float | None, typer.Option(help="fixed keypoint score threshold")] = None,
    min_agreement: Annotated[
        float | None, typer.Option(help="drop predictions seen by fewer views first")
    ] = None,
    strict: Annotated[bool, typer.Option(help="fail (exit 2) on a health warning")] = False,
) -> None:
    """Calibrate the score threshold (pseudo-instances per image = labeled mean); write pseudo-labels."""
    from distill.pseudo.make import make_pseudo_labels
    from distill.report import describe_calibration

    if threshold is not None and per_class:
        raise InputError("--threshold and --per-class exclude each other")
    calibration = make_pseudo_labels(
        predictions,
        unlabeled=unlabeled,
        unlabeled_images_dir=unlabeled_images,
        labeled_json=labeled,
        out=out,
        per_class=per_class,
        threshold=threshold,
        min_agreement=min_agreement,
        keypoint_threshold=keypoint_threshold,
        strict=strict,
    )
    for line in describe_calibration(calibration.to_dict(), calibration.warnings).splitlines():
        typer.echo(line, err=line.startswith("warning"))
    typer.echo(f"wrote {out} (+ {out.stem}.calibration.json / .png)")


@app.command()
def run(
    config: Annotated[Path, typer.Option(help="pipeline YAML (see distill.pipeline.PipelineConfig)")],
    out: Annotated[Path, typer.Option(help="run directory (re-running resumes)")],
    rounds: Annotated[int | None, typer.Option(min=1, help="override the config's rounds")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Distillation rounds: teacher, multi-view inference, calibration, student, evaluation, promotion."""
    from distill.pipeline import PipelineConfig, run_pipeline

    pipeline = PipelineConfig.from_yaml(config)
    if rounds is not None:
        pipeline.rounds = rounds
    summary = run_pipeline(pipeline, out, device=_device(device), context=_cli_context())
    typer.echo(f"final model: {summary['final_model']}; report: {out / 'report.md'}")


def _parse_ratio(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--ratio {text!r}: expected LABELED:PSEUDO, e.g. 6:4") from None
    if a < 0 or b < 0 or a + b <= 0:
        raise InputError(f"--ratio {text!r}: parts must be >= 0 with a positive sum")
    return a, b


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="synthetic preset")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
    iterations: Annotated[int | None, typer.Option(help="override the recipe's training iterations")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """The whole round on the embedded benchmark: teacher, pseudo-labels, student, teacher vs student."""
    from distill.demo import run_demo

    summary = run_demo(
        out, preset=preset, seed=seed, iterations=iterations, device=_device(device), context=_cli_context()
    )
    typer.echo(json.dumps(summary["minutes"], indent=None))


@app.command()
def backends() -> None:
    """List the detector backends and whether each can run here."""
    from distill.backends import list_backends

    for name, reason in list_backends().items():
        typer.echo(f"{name:<12} {'available' if reason is None else 'unavailable: ' + reason}")


def _cli_context():
    """A step context drawing one progress bar per stage on stderr (training shows loss, lr and it/s)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from distill.hooks import StepContext

    state: dict = {}

    def report(event) -> None:
        if state.get("stage") != event.stage:
            if "bar" in state:
                state["bar"].stop()
            bar = Progress(
                TextColumn(f"{event.stage:>8}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
            )
            bar.start()
            state.update(
                stage=event.stage, bar=bar, task=bar.add_task(event.stage, total=event.total, info="")
            )
        values, info = event.values, event.message
        if "total" in values:
            speed = values.get("iters_per_second", 0.0)
            info = f"loss {values['total']:.3f}  lr {values.get('lr', 0):.4f}  {speed:.2f} it/s"
        state["bar"].update(state["task"], completed=event.done, total=event.total, info=info)
        if event.total is not None and event.done >= event.total:
            state.pop("bar").stop()
            state.pop("stage")

    return StepContext(progress=report)


def _setup_logging() -> None:
    """The library logs through ``logging``; the CLI prints its INFO lines plainly on stdout."""
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("distill")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def load_plugins(target: typer.Typer = app) -> None:
    """Add the commands other installed packages offer (the service's ``up`` and ``token``): each entry point
    of the group ``distill.cli`` names a ``typer.Typer`` (added as the command group of the entry point's
    name) or a function that registers its commands on ``target``. One that fails to load is reported on
    stderr and skipped."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="distill.cli"):
        try:
            found = entry.load()
            if isinstance(found, typer.Typer):
                target.add_typer(found, name=entry.name)
            else:
                found(target)
        except Exception as exc:  # a broken plugin must not take the library's commands down with it
            _err(f"the commands of {entry.value} are unavailable: {type(exc).__name__}: {exc}")


def main() -> None:
    """Console entry point: distill's errors exit 2 (bad input) or 1 (training), a cancel 130; usage errors
    exit 2."""
    _setup_logging()
    load_plugins()
    try:
        app()  # standalone mode: usage errors print and exit 2, success exits 0
    except Cancelled as exc:
        _err(str(exc))
        sys.exit(130)
    except InputError as exc:
        _err(str(exc))
        sys.exit(2)
    except TrainingError as exc:
        _err(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
