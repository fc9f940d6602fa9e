"""The ``distill`` command. Exit code 0 on success, 2 on bad input (one-line reason on stderr)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import InputError, TrainingError

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
    preset: Annotated[str, typer.Option(help="tiny | demo")] = "demo",
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
) -> None:
    """Generate the embedded benchmark: labeled / unlabeled (+ hidden truth) / test COCO splits."""
    from distill.data.synthetic import generate

    try:
        result = generate(out, preset=preset, seed=seed)
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
        str | None, typer.Option(help="recipe name (synth, coco) or YAML with model:/train:")
    ] = None,
    init: Annotated[
        str, typer.Option(help="scratch | imagenet | PATH (model dir or state dict)")
    ] = "scratch",
    iterations: Annotated[int | None, typer.Option(help="override train.iterations")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Train a detector on a COCO dataset."""
    from distill.workflow import train_model

    overrides = {k: v for k, v in {"iterations": iterations, "seed": seed}.items() if v is not None}
    result = train_model(
        train_json,
        images,
        out,
        recipe=config,
        init=init,
        device=_device(device),
        train_overrides=overrides,
        progress=_train_progress(),
    )
    typer.echo(
        f"trained {result.iterations} iterations in {result.seconds / 60:.1f} min; loss "
        f"{result.first_losses.get('total', float('nan')):.3f} -> "
        f"{result.final_losses.get('total', float('nan')):.3f}"
    )
    typer.echo(f"model: {out}")


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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Run a model on images and write COCO results (multi-view: plus OUT.views.json with agreement)."""
    from distill.data.images import iter_image_refs
    from distill.io import write_json_atomic
    from distill.models.store import load_model

    detector = load_model(model, device=_device(device))
    refs = iter_image_refs(images, images_dir=images_dir)
    started = time.perf_counter()
    if views == "none":
        from distill.predict import Skipped, predict_coco

        skipped_items: list[Skipped] = []
        results = predict_coco(
            detector, refs, batch_size=batch_size, score_thresh=score_thresh, skipped=skipped_items
        )
        skipped = [(s.path, s.reason) for s in skipped_items]
    else:
        from distill.tta.engine import FusionConfig, MultiViewEngine
        from distill.tta.stream import read_results, run_to_jsonl
        from distill.tta.views import parse_views

        view_set = parse_views(views, test_size=detector.config.test_size, max_size=detector.config.max_size)
        if fusion not in ("nms", "vote", "soft-nms", "wbf"):
            raise InputError(f"--fusion {fusion!r}: expected nms, vote, soft-nms or wbf")
        engine = MultiViewEngine(
            detector, view_set, FusionConfig(method=fusion, view_score_thresh=score_thresh)
        )
        lines = out.with_name(out.name + ".jsonl")
        streamed = run_to_jsonl(engine, refs, lines, batch_size=batch_size)
        results, agreement = read_results(lines)
        skipped = streamed.skipped
        write_json_atomic(
            out.with_name(out.name + ".views.json"),
            {"views": view_set.to_dict(), "fusion": fusion, "agreement": agreement, "skipped": skipped},
        )
    write_json_atomic(out, results)
    seconds = time.perf_counter() - started
    typer.echo(f"{len(results)} detections on {len(refs) - len(skipped)} images ({seconds:.1f} s) -> {out}")
    for path, reason in skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)


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
        from distill.workflow import evaluate_model

        metrics = evaluate_model(model, truth, images, device=_device(device))
    typer.echo(format_table({"value": metrics}, keys=("AP", "AP50", "AP75", "APs", "APm", "APl")))
    if json_out is not None:
        write_json_atomic(json_out, metrics, indent=2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="synthetic preset")] = "demo",
    seed: Annotated[int, typer.Option()] = 0,
    iterations: Annotated[int | None, typer.Option(help="override the recipe's training iterations")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """The main job on the embedded benchmark: synthesize, train a teacher, evaluate it, print the metrics."""
    from distill.workflow import run_demo

    summary = run_demo(
        out,
        preset=preset,
        seed=seed,
        iterations=iterations,
        device=_device(device),
        progress=_train_progress(),
        echo=typer.echo,
    )
    typer.echo(json.dumps(summary["minutes"], indent=None))


def _train_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state: dict = {}

    def report(p) -> None:
        if "bar" not in state:
            bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task("train", total=p.total, completed=p.iteration - 1, info="")
        bar = state["bar"]
        bar.update(
            state["task"],
            completed=p.iteration,
            info=f"loss {p.losses['total']:.3f}  lr {p.lr:.4f}  {p.iters_per_second:.2f} it/s",
        )
        if p.iteration >= p.total:
            bar.stop()
            state.clear()

    return report


def main() -> None:
    """Console entry point: distill's errors exit 2 (bad input) or 1 (training); usage errors exit 2."""
    try:
        app()  # standalone mode: usage errors print and exit 2, success exits 0
    except InputError as exc:
        _err(str(exc))
        sys.exit(2)
    except TrainingError as exc:
        _err(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
