"""``distill remote``: drive a distill service over HTTP with :class:`service.remote.Client` — log in, upload
datasets, submit jobs, watch them, download what they wrote, promote and roll back model versions
(``models``), schedule retraining (``schedule``).

The service's URL and token come from ``--url`` / ``--token``, else ``DISTILL_REMOTE_URL`` /
``DISTILL_REMOTE_TOKEN``, else the file ``distill remote login`` writes
(``$XDG_CONFIG_HOME/distill/remote.json``, default ``~/.config/distill/remote.json``, mode 0600). The stored
token is only sent to the URL it was stored with.

Exit codes: 0 done; 1 the server failed or was unreachable, an upload had rejected files, a watched job
failed; 2 a request the server refused (4xx: a bad token, an unknown dataset, a field it names) or bad local
input; 130 a watched job was cancelled (or the watch interrupted).

Module imports are typer and the standard library only (``distill`` loads this module on every run); httpx
and rich are imported by the commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from service.remote import Client, Job, RemoteError, Stage

app = typer.Typer(
    no_args_is_help=True,
    help="Use a distill service over HTTP: log in, upload datasets, run and watch jobs, download artifacts, "
    "promote models, schedule retraining.",
)
run_app = typer.Typer(no_args_is_help=True, help="Submit a job (prints its id; --watch follows it).")
app.add_typer(run_app, name="run")
models_app = typer.Typer(invoke_without_command=True)
app.add_typer(models_app, name="models")
schedule_app = typer.Typer(
    no_args_is_help=True,
    help="Scheduled retraining: a pipeline on a cron, its teacher the model's promoted version, its student "
    "promoted when it beats the teacher on the eval dataset.",
)
app.add_typer(schedule_app, name="schedule")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""What a directory upload sends (the service's image extensions); other files are skipped."""
BATCH_FILES = 64
BATCH_MB = 64
PIPELINE_KEYS = ("teacher", "inference", "calibration", "student", "evaluation", "rounds", "seed",
                 "model_name", "shard_size")  # fmt: skip
DISTILL_KEYS = ("inference", "calibration", "shard_size")
SCHEDULE_KEYS = ("inference", "calibration", "student", "rounds", "seed", "shard_size")
"""A schedule's ``pipeline``: its teacher is the model's promoted version, its evaluation the schedule's."""


class Kind(StrEnum):
    labeled = "labeled"
    unlabeled = "unlabeled"
    eval = "eval"


Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="DISTILL_REMOTE_URL", show_envvar=True,
        help="the service, e.g. http://127.0.0.1:8000 (default: the one `login` stored)",
    ),
]  # fmt: skip
Token = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="DISTILL_REMOTE_TOKEN", show_envvar=True,
        help="an API token (default: the one `login` stored for that URL)",
    ),
]  # fmt: skip
JobId = Annotated[int, typer.Argument(metavar="JOB", help="a job id (`distill remote jobs` lists them)")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"distill: error: {message}", err=True)
    raise typer.Exit(code)


def _note(message: str) -> None:
    typer.echo(f"distill: {message}", err=True)


# --------------------------------------------------------------------------------------------------
# The stored login
# --------------------------------------------------------------------------------------------------


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/distill/remote.json`` (an absolute XDG_CONFIG_HOME only, per the spec), else
    ``~/.config/distill/remote.json``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "distill" / "remote.json"


def load_config() -> dict[str, Any]:
    path = config_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _fail(f"{path}: unreadable ({exc}); run `distill remote login URL` again")
    if not isinstance(data, dict):
        _fail(f"{path}: not a distill remote login; run `distill remote login URL` again")
    return data


def save_config(url: str, token: str) -> Path:
    """Write ``{url, token}`` atomically, readable by its owner only (0600, in a 0700 folder when new)."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".remote.", suffix=".json")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"url": url, "token": token}, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    return path


def _normal_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        _fail(f"URL {url!r}: give it with its scheme, e.g. http://{url or '127.0.0.1:8000'}")
    return url


@dataclass(frozen=True)
class _Target:
    url: str
    token: str


def _target(url: str | None, token: str | None) -> _Target:
    saved = load_config()
    saved_url = _normal_url(saved["url"]) if isinstance(saved.get("url"), str) else None
    if url is None:
        url = saved_url
    if url is None:
        _fail("no service given: run `distill remote login URL` first, or pass --url / DISTILL_REMOTE_URL")
    url = _normal_url(url)
    if token is None and url == saved_url and isinstance(saved.get("token"), str):
        token = saved["token"]  # never sent to another URL than the one it was stored for
    if not token:
        _fail(f"no token for {url}: run `distill remote login {url}`, or pass --token / DISTILL_REMOTE_TOKEN")
    return _Target(url, token)


def _explain(exc: RemoteError, url: str) -> str:
    if exc.status == 401:
        return f"{exc} — the token was refused: log in again (`distill remote login {url}`)"
    return str(exc)


@contextlib.contextmanager
def _client(url: str | None, token: str | None) -> Iterator[Client]:
    """A client of the chosen service; a :class:`RemoteError` inside ends the command with its message
    (exit 2 for a 4xx answer, 1 otherwise)."""
    from service.remote import Client, RemoteError

    target = _target(url, token)
    client = Client(target.url, target.token)
    try:
        yield client
    except RemoteError as exc:
        _fail(_explain(exc, target.url), 2 if 400 <= exc.status < 500 else 1)
    finally:
        client.close()


def _err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _bytes_progress(console: Console):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# login
# --------------------------------------------------------------------------------------------------


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="the service, e.g. http://127.0.0.1:8000")],
    token: Annotated[
        str | None,
        typer.Option(envvar="DISTILL_REMOTE_TOKEN", help="an API token (asked for when not given)"),
    ] = None,
) -> None:
    """Check URL and TOKEN (GET /readyz) and store them for the other commands."""
    from service.remote import Client, RemoteError

    url = _normal_url(url)
    if not token:
        token = typer.prompt("API token", hide_input=True).strip()
    with Client(url, token) as client:
        try:
            checks = client.readyz()
        except RemoteError as exc:
            if exc.status in (401, 403):
                _fail(f"{url} refused the token (HTTP {exc.status}: {exc.detail}); nothing stored")
            if exc.status != 503:
                _fail(f"cannot log in to {url}: {exc}; nothing stored", 2 if 400 <= exc.status < 500 else 1)
            _note(f"the token is good but {exc.detail}")
            checks = None
    path = save_config(url, token)
    state = "ready" if checks else "not ready"
    typer.echo(f"logged in to {url} ({state}); stored in {path}")


@app.command()
def logout() -> None:
    """Forget the stored URL and token."""
    path = config_path()
    if path.exists():
        path.unlink()
        typer.echo(f"removed {path}")
    else:
        typer.echo(f"not logged in ({path} does not exist)")


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    name: str  # the name it gets in the dataset (a COCO file_name)
    path: Path
    size: int


def _collect(paths: list[Path], annotations: Path | None) -> tuple[list[_Part], list[Path]]:
    """What to send: a directory's images (named by their path under it; hidden files and other files
    skipped — those are returned), a file as it is (an image or an archive, named by its file name).
    With ``annotations``: exactly the images its ``file_name`` s name, under the one directory given."""
    if annotations is not None:
        if len(paths) != 1 or not paths[0].is_dir():
            _fail("--annotations takes one directory: the folder its file_name s are relative to")
        return _coco_parts(paths[0], annotations), []
    parts: list[_Part] = []
    skipped: list[Path] = []
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if not file.is_file() or any(p.startswith(".") for p in relative.parts):
                    continue
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    parts.append(_Part(relative.as_posix(), file, file.stat().st_size))
                else:
                    skipped.append(file)
        elif path.is_file():
            parts.append(_Part(path.name, path, path.stat().st_size))
        else:
            _fail(f"{path}: no such file or directory")
    return parts, skipped


def _coco_parts(root: Path, annotations: Path) -> list[_Part]:
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        _fail(f"{annotations}: not a readable COCO json ({exc})")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        _fail(f"{annotations}: images: expected a list of {{file_name, ...}}")
    names = [i["file_name"] for i in images if isinstance(i, dict) and isinstance(i.get("file_name"), str)]
    parts, missing = [], []
    for name in dict.fromkeys(names):
        file = root / name
        if file.is_file():
            parts.append(_Part(PurePosixPath(name).as_posix(), file, file.stat().st_size))
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        _fail(f"{annotations}: {len(missing)} file_name(s) are not files under {root}: {shown}")
    return parts


def _batches(parts: list[_Part], max_files: int, max_bytes: int) -> Iterator[list[_Part]]:
    """Consecutive parts, at most ``max_files`` and ``max_bytes`` a request (a bigger file goes alone)."""
    batch: list[_Part] = []
    size = 0
    for part in parts:
        if batch and (len(batch) >= max_files or size + part.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(part)
        size += part.size
    if batch:
        yield batch


def _resolve_dataset(client: Client, ref: str) -> dict[str, Any]:
    """The dataset called ``ref``, or with the id ``ref``."""
    from service.remote import RemoteError

    found = client.find_dataset(ref)
    if found is not None:
        return dict(found)
    if ref.isdigit():
        try:
            return dict(client.get_dataset(int(ref)))
        except RemoteError as exc:
            if exc.status != 404:
                raise
    _fail(f"no dataset {ref!r} on {client.url} (`distill remote datasets` lists them)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@app.command()
def upload(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="PATH...", help="image folders, images, .zip / .tar / .tar.gz archives"),
    ],
    dataset: Annotated[str, typer.Option(help="the dataset's name (created when missing)")],
    kind: Annotated[
        Kind | None, typer.Option(help="the dataset's kind (when created: default unlabeled)")
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="a COCO json: upload exactly the images its file_names name (relative to the one folder "
            "given), then put it as the dataset's annotations"
        ),
    ] = None,
    batch_files: Annotated[int, typer.Option(min=1, help="files per request")] = BATCH_FILES,
    batch_mb: Annotated[float, typer.Option(min=0.001, help="megabytes per request")] = BATCH_MB,
    url: Url = None,
    token: Token = None,
) -> None:
    """Upload images (folders, files, archives) into a dataset, creating it when missing.

    Sent in batches streamed from disk; prints what was accepted, what was a duplicate and what was rejected
    (with the reason). Exit 1 when anything was rejected."""
    parts, skipped = _collect(paths, annotations)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        _note(f"skipping {_plural(len(skipped), 'file')} that are not images: {shown}")
    if not parts:
        _fail(f"no images in {', '.join(map(str, paths))}")
    with _client(url, token) as client:
        found = client.find_dataset(dataset)
        if found is None:
            created = client.create_dataset(dataset, (kind or Kind.unlabeled).value)
            _note(f"created dataset {created['name']!r} ({created['kind']}, id {created['id']})")
            found = created
        elif kind is not None and found["kind"] != kind.value:
            _fail(f"dataset {dataset!r} exists and is {found['kind']}, not {kind.value}")
        accepted = duplicates = 0
        rejected: list[dict[str, Any]] = []
        total = sum(p.size for p in parts)
        console = _err_console()
        try:
            with _bytes_progress(console) as progress:
                task = progress.add_task(f"upload {dataset}", total=total)
                for batch in _batches(parts, batch_files, int(batch_mb * 2**20)):
                    report = client.upload_images(
                        found["id"], [(p.name, p.path) for p in batch],
                        on_bytes=lambda n: progress.advance(task, n),
                    )  # fmt: skip
                    duplicates += sum(bool(a.get("duplicate")) for a in report["accepted"])
                    accepted += sum(not a.get("duplicate") for a in report["accepted"])
                    rejected += report["rejected"]
        finally:
            typer.echo(
                f"dataset {dataset} (id {found['id']}): {accepted} accepted, {duplicates} duplicate, "
                f"{len(rejected)} rejected"
            )
            for item in rejected:
                origin = f"{item['part']}: " if item.get("part") and item["part"] != item["name"] else ""
                typer.echo(f"  rejected {origin}{item['name']}: {item['reason']}")
        if annotations is not None:
            if rejected:
                _fail(f"{annotations} not put: some of its images were rejected", 1)
            _put_annotations(client, found, annotations)
    if rejected:
        raise typer.Exit(1)


def _put_annotations(client: Client, dataset: dict[str, Any], path: Path) -> None:
    updated = client.put_annotations(dataset["id"], path)
    stats = updated.get("stats") or {}
    described = ", ".join(
        f"{stats[key]} {label}"
        for key, label in (("annotation_images", "images"), ("instances", "instances"),
                           ("categories", "categories"))
        if key in stats
    )  # fmt: skip
    typer.echo(f"dataset {updated['name']} (id {updated['id']}): annotations put ({described})")


@app.command("annotations")
def annotations_command(
    dataset: Annotated[str, typer.Argument(help="the dataset's name or id")],
    coco: Annotated[Path, typer.Argument(metavar="COCO.json", help="annotations naming uploaded images")],
    url: Url = None,
    token: Token = None,
) -> None:
    """Put a COCO json as a dataset's annotations (its file_names must be images uploaded to it)."""
    if not coco.is_file():
        _fail(f"{coco}: no such file")
    with _client(url, token) as client:
        _put_annotations(client, _resolve_dataset(client, dataset), coco)


@app.command()
def datasets(url: Url = None, token: Token = None) -> None:
    """The service's datasets."""
    from rich.console import Console
    from rich.table import Table

    with _client(url, token) as client:
        rows = client.datasets()
    table = Table("id", "name", "kind", "images", "annotations", "created")
    for d in rows:
        stats = d.get("stats") or {}
        notes = "no"
        if d.get("annotations"):
            notes = f"yes: {stats['instances']} instances" if "instances" in stats else "yes"
        table.add_row(str(d["id"]), d["name"], d["kind"], str(stats.get("images", 0)), notes,
                      _when(d.get("created_at")))  # fmt: skip
    Console().print(table)


# --------------------------------------------------------------------------------------------------
# models: the registry and its promotion gate
# --------------------------------------------------------------------------------------------------


def _inherit(ctx: typer.Context, url: str | None, token: str | None) -> tuple[str | None, str | None]:
    """A subcommand's ``--url`` / ``--token``, else those given to its group (``models --url X promote``)."""
    given = ctx.obj if isinstance(ctx.obj, dict) else {}
    return (url if url is not None else given.get("url"), token if token is not None else given.get("token"))


@models_app.callback()
def models(ctx: typer.Context, url: Url = None, token: Token = None) -> None:
    """The service's registered models; promote a version, roll back, show the promotion history.

    Without a subcommand: every version, the newest first (`promoted`: the version that jobs and schedules
    naming the model use)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"url": url, "token": token}
        return
    from rich.console import Console
    from rich.table import Table

    with _client(url, token) as client:
        rows = client.models()
    keys = ("id", "name", "version", "promoted", "role", "backend", "source", "job_id", "parent_id")
    table = Table("id", "name", "version", "promoted", "role", "backend", "source", "job", "parent",
                  "created")  # fmt: skip
    for m in rows:
        cells = [_yes(m[k]) if isinstance(m.get(k), bool) else m.get(k) for k in keys]
        table.add_row(*("" if c is None else str(c) for c in cells), _when(m.get("created_at")))
    Console().print(table)


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _version(entry: dict[str, Any] | None) -> str:
    return "" if not entry else f"v{entry.get('version')}"


ModelName = Annotated[str, typer.Argument(metavar="NAME", help="a model name (`distill remote models`)")]
Reason = Annotated[str, typer.Option(help="why (kept in the promotion history)")]


@models_app.command("promote")
def models_promote(
    ctx: typer.Context,
    name: ModelName,
    version: Annotated[int, typer.Argument(min=1, help="the version of NAME to promote")],
    reason: Reason = "",
    url: Url = None,
    token: Token = None,
) -> None:
    """Make VERSION the promoted version of NAME: jobs and schedules naming the model use it from now on."""
    with _client(*_inherit(ctx, url, token)) as client:
        done = client.promote_model(name, version, reason)
    previous = f" (was {_version(done.get('previous'))})" if done.get("previous") else ""
    typer.echo(f"promoted {done['name']} {_version(done['model'])} (model {done['model']['id']}){previous}")


@models_app.command("rollback")
def models_rollback(
    ctx: typer.Context, name: ModelName, reason: Reason = "", url: Url = None, token: Token = None
) -> None:
    """Undo NAME's latest promotion: the version promoted before it is promoted again (twice: two back)."""
    with _client(*_inherit(ctx, url, token)) as client:
        done = client.rollback_model(name, reason)
    undone = f"; {_version(done.get('previous'))} is no longer promoted" if done.get("previous") else ""
    model = done["model"]
    typer.echo(f"rolled back {done['name']} to {_version(model)} (model {model['id']}){undone}")


@models_app.command("history")
def models_history(ctx: typer.Context, name: ModelName, url: Url = None, token: Token = None) -> None:
    """NAME's promoted version and every promotion and rollback, the newest first, with who did it and why
    (`by`: the API token's id, or the job whose promotion gate did it)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    with _client(*_inherit(ctx, url, token)) as client:
        found = client.promotions(name)
    console = Console()
    current = found.get("promoted")
    if current:
        console.print(f"{found['name']}: promoted {_version(current)} (model {current['id']})", markup=False)
    else:
        console.print(f"{found['name']}: no promoted version", markup=False)
    table = Table("when", "action", "version", "previous", "undone", "by", "reason")
    for row in found.get("history") or []:
        by = ""
        if row.get("created_by") is not None:
            by = f"token {row['created_by']}"
        elif row.get("job_id") is not None:
            by = f"job {row['job_id']}"
        table.add_row(
            _when(row.get("created_at")), row["action"], _version(row.get("model")),
            _version(row.get("previous")), "yes" if row.get("undone") else "", by,
            Text(row.get("reason") or ""),  # free text: no rich markup
        )  # fmt: skip
    console.print(table)


# --------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------


def _when(stamp: str | None) -> str:
    if not stamp:
        return ""
    try:
        return dt.datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _config_sections(path: Path | None, keys: tuple[str, ...], command: str) -> dict[str, Any]:
    """The job-body sections of a YAML config: ``keys`` pass, the library's ``data`` section and the
    sections another job type takes are left out (with a note), anything else passes for the server to
    judge (it names unknown fields)."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"{path}: not a readable YAML file ({exc})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"{path}: expected a mapping of sections ({', '.join(keys)})")
    sections, left_out = {}, []
    for key, value in data.items():
        if key == "data" or (key in PIPELINE_KEYS and key not in keys):
            left_out.append(str(key))
        else:
            sections[key] = value
    if left_out:
        why = "datasets come from --labeled / --unlabeled / --eval" if "data" in left_out else ""
        other = [k for k in left_out if k != "data"]
        if other:
            why = "; ".join(filter(None, [why, f"a {command} job takes no {', '.join(other)}"]))
        _note(f"{path}: leaving out {', '.join(left_out)} ({why})")
    return sections


def _model_id(client: Client, ref: str) -> int | str:
    """A model reference for a job: ``ref`` itself when it is a number (an id) or a bare name (the server
    takes that name's promoted version when the job starts, and records it), else the id of version
    ``VERSION`` of ``NAME:VERSION``."""
    from service.remote import RemoteError

    if ref.isdigit():
        return int(ref)
    name, _, version = ref.rpartition(":")
    if not (name and version.isdigit()):
        return ref
    try:
        found = [m for m in client.models(name=name) if m.get("name") == name]
    except RemoteError as exc:
        if exc.status in (404, 405):
            _fail(f"--teacher-model {ref!r}: this service lists no models (GET /v1/models); give a model id")
        raise
    found = [m for m in found if str(m.get("version")) == version]
    if not found:
        _fail(f"--teacher-model {ref!r}: no such model (`distill remote models` lists them)")
    return int(found[0]["id"])


def _submit(client: Client, body: dict[str, Any], watch: bool) -> None:
    created = client.create_job(body)
    job_id = created["id"]
    typer.echo(job_id)
    if not watch:
        _note(f"job {job_id} {created.get('state', 'queued')}; follow it: distill remote watch {job_id}")
        return
    raise typer.Exit(_watch(client, job_id))


Labeled = Annotated[str, typer.Option(help="the labeled dataset (name or id), with annotations")]
Unlabeled = Annotated[str, typer.Option(help="the unlabeled dataset (name or id)")]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config", exists=True, dir_okay=False,
        help="YAML of pipeline sections: teacher, inference, calibration, student, evaluation, rounds, seed",
    ),
]  # fmt: skip
Watch = Annotated[bool, typer.Option("--watch", help="follow the job until it ends (exit code as `watch`)")]


@run_app.command("pipeline")
def run_pipeline(
    labeled: Labeled,
    unlabeled: Unlabeled,
    eval: Annotated[str | None, typer.Option("--eval", help="an eval dataset: teacher vs student")] = None,
    teacher_model: Annotated[
        str | None,
        typer.Option(
            help="a registered teacher (id, name: its promoted version, or NAME:VERSION); default: the job "
            "trains one"
        ),
    ] = None,
    config: Config = None,
    watch: Watch = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """A pipeline job: teacher, inference, pseudo-labels, student, evaluation, decision.

    Dataset names (or ids) are resolved here; the YAML's sections go into the job as they are."""
    sections = _config_sections(config, PIPELINE_KEYS, "pipeline")
    teacher = sections.get("teacher")
    if teacher is not None and not isinstance(teacher, dict):
        _fail(f"{config}: teacher: expected a mapping")
    if isinstance(teacher, dict) and isinstance(teacher.get("model"), str) and teacher_model is None:
        _fail(f"{config}: teacher.model {teacher['model']!r}: the service takes a registered model: "
              "--teacher-model ID")  # fmt: skip
    with _client(url, token) as client:
        body: dict[str, Any] = {"type": "pipeline", **sections}
        body["labeled"] = _resolve_dataset(client, labeled)["id"]
        body["unlabeled"] = _resolve_dataset(client, unlabeled)["id"]
        if eval is not None:
            body["eval"] = _resolve_dataset(client, eval)["id"]
        if teacher_model is not None:
            body["teacher"] = {**(teacher or {}), "model": _model_id(client, teacher_model)}
        _submit(client, body, watch)


@run_app.command("distill")
def run_distill(
    labeled: Labeled,
    unlabeled: Unlabeled,
    teacher_model: Annotated[
        str, typer.Option(help="the registered teacher: id, name (its promoted version) or NAME:VERSION")
    ],
    config: Config = None,
    watch: Watch = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """Multi-view inference, fusion, calibration and pseudo-labels of the unlabeled dataset."""
    sections = _config_sections(config, DISTILL_KEYS, "distill")
    with _client(url, token) as client:
        body: dict[str, Any] = {"type": "distill", **sections}
        body["labeled"] = _resolve_dataset(client, labeled)["id"]
        body["unlabeled"] = _resolve_dataset(client, unlabeled)["id"]
        body["teacher"] = _model_id(client, teacher_model)
        _submit(client, body, watch)


def _stage_line(stage: Stage) -> str:
    progress = stage.get("progress") or {}
    done, total = progress.get("done", 0), progress.get("total", 0)
    amount = f"{done}/{total}" if total else ""
    units = f"{stage['done_units']}/{stage['units']} units" if stage.get("units", 0) > 1 else ""
    return f"  {stage['state']:<8} {stage['name']:<20} {amount:>11}  {units}".rstrip()


def _watch(client: Client, job_id: int, console: Console | None = None) -> int:
    """Follow a job with a progress bar for its current stage and a line per finished stage; the exit
    code: 0 succeeded, 1 failed, 130 cancelled (or interrupted here: the job goes on)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or Console()
    printed: set[str] = set()
    warned = 0
    job: Job | None = None
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[eta]}"),
        console=console, transient=True, disable=not console.is_terminal,  # a log gets the stage lines
    )  # fmt: skip
    task = progress.add_task("", total=None, eta="")
    try:
        with progress:
            for job in client.follow(job_id):
                for stage in job.get("stages") or []:
                    if stage["state"] == "done" and stage["name"] not in printed:
                        printed.add(stage["name"])
                        progress.console.print(_stage_line(stage))
                for warning in (job.get("warnings") or [])[warned:]:
                    progress.console.print(f"  warning: {warning}")
                warned = len(job.get("warnings") or [])
                current = next((s for s in job.get("stages") or [] if s["name"] == job.get("stage")), None)
                amounts = (current or {}).get("progress") or job.get("progress") or {}
                total = amounts.get("total") or None
                eta = f"ETA {_duration(job['eta_s'])}" if job.get("eta_s") is not None else ""
                progress.update(
                    task, description=f"job {job_id} {job.get('state')}: {job.get('stage') or '-'}",
                    total=total, completed=amounts.get("done", 0), eta=eta,
                )  # fmt: skip
    except KeyboardInterrupt:
        console.print(f"stopped watching job {job_id}; it goes on (distill remote cancel {job_id} stops it)")
        return 130
    assert job is not None  # follow yields until the job has finished
    for stage in job.get("stages") or []:
        if stage["name"] not in printed:
            console.print(_stage_line(stage))
    return _outcome(console, job)


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """A line per stage that scored or decided something (AP in percent, the calibration, the promotion);
    a stage's other numbers (training losses, ...) and metrics of unknown shape as compact JSON, cut at 200
    characters. ``GET /v1/jobs/{id}`` has them all."""
    lines = []
    for stage, value in metrics.items():
        if not isinstance(value, dict):
            lines.append(f"{stage}: {json.dumps(value)}"[:200])
        elif "primary" in value and isinstance(value["primary"], dict):
            p = value["primary"]
            verdict = "promoted" if value.get("promoted") else "not promoted"
            lines.append(
                f"{stage}: {p.get('metric')} teacher {_percent(p.get('teacher'))}, "
                f"student {_percent(p.get('student'))} -> {verdict}"
            )
        elif scored := [
            f"{task} AP {_percent(value[task].get('AP'))}"
            for task in ("bbox", "segm", "keypoints")
            if isinstance(value.get(task), dict)
        ]:
            lines.append(f"{stage}: {', '.join(scored)}")
        elif "kept_per_image" in value:
            lines.append(
                f"{stage}: threshold {value.get('threshold')}, {value['kept_per_image']:.2f} "
                f"pseudo-instances per image (labeled: {value.get('labeled_per_image', 0):.2f})"
            )
        elif "final_loss" not in value:
            lines.append(f"{stage}: {json.dumps(value, separators=(', ', ': '))}"[:200])
    return lines


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"


def _outcome(console: Console, job: Job) -> int:
    skipped = job.get("skipped") or []
    if skipped:
        shown = ", ".join(f"{s.get('name')} ({s.get('reason')})" for s in skipped[:5] if isinstance(s, dict))
        more = " ..." if len(skipped) > 5 else ""
        console.print(f"  skipped {_plural(len(skipped), 'image')}: {shown}{more}", markup=False)
    for line in _metric_lines(job.get("metrics") or {}):
        console.print(f"  {line}", markup=False)
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        start, end = (dt.datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
        took = f" in {_duration((end - start).total_seconds())}"
    state = job.get("state")
    if state == "succeeded":
        console.print(f"job {job['id']} succeeded{took}", markup=False)
        return 0
    if state == "cancelled":
        console.print(f"job {job['id']} cancelled{took}", markup=False)
        return 130
    console.print(f"job {job['id']} failed{took}: {job.get('error') or 'no error recorded'}", markup=False)
    return 1


@app.command()
def watch(job: JobId, url: Url = None, token: Token = None) -> None:
    """Follow a job's progress until it ends: exit 0 succeeded, 1 failed (with its error), 130 cancelled."""
    with _client(url, token) as client:
        code = _watch(client, job)
    raise typer.Exit(code)


@app.command()
def jobs(
    state: Annotated[
        str | None, typer.Option(help="queued | running | succeeded | failed | cancelled")
    ] = None,
    type: Annotated[str | None, typer.Option("--type", help="pipeline | distill | train | evaluate")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="at most this many, newest first")] = 50,
    url: Url = None,
    token: Token = None,
) -> None:
    """The service's jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    with _client(url, token) as client:
        page = client.list_jobs(state=state, type=type, limit=limit)
    table = Table("id", "type", "state", "stage", "progress", "ETA", "created")
    for j in page["data"]:
        amounts = j.get("progress") or {}
        done = f"{amounts.get('done', 0)}/{amounts.get('total', 0)}" if amounts.get("total") else ""
        table.add_row(str(j["id"]), j["type"], j["state"], j.get("stage") or "", done,
                      _duration(j.get("eta_s")), _when(j.get("created_at")))  # fmt: skip
    console = Console()
    console.print(table)
    if page["count"] > len(page["data"]):
        console.print(f"{len(page['data'])} of {page['count']} jobs (--limit)")


@app.command()
def cancel(job: JobId, url: Url = None, token: Token = None) -> None:
    """Ask a job to stop (a queued job is cancelled at once, a running one at its next check)."""
    with _client(url, token) as client:
        found = client.cancel_job(job)
    if found["state"] == "cancelled":
        typer.echo(f"job {job} cancelled")
    else:
        typer.echo(f"job {job}: cancel requested; it stops at its next check (now {found['state']})")


@app.command()
def retry(job: JobId, url: Url = None, token: Token = None) -> None:
    """Queue a failed or cancelled job again where it stopped (finished work is kept)."""
    with _client(url, token) as client:
        found = client.retry_job(job)
    typer.echo(f"job {job} {found['state']} again, from stage {found.get('stage') or '-'}")


def _destination(out: Path, name: str) -> Path:
    """Where artifact ``name`` goes under ``out`` (a name that would leave ``out`` is refused)."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or not relative.parts or any(p in ("", ".", "..") for p in relative.parts):
        _fail(f"artifact {name!r}: not a relative path; not written", 1)
    return out.joinpath(*relative.parts)


@app.command()
def download(
    job: JobId,
    artifact: Annotated[
        str | None, typer.Argument(help="one artifact, e.g. pseudo.json (default: all of them)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="folder to write into (default: ./job-JOB)")] = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Download a job's artifacts (streamed to disk; each file appears complete or not at all)."""
    out = out if out is not None else Path(f"job-{job}")
    with _client(url, token) as client:
        listing = client.list_artifacts(job)
        chosen = [a for a in listing if artifact is None or a["name"] == artifact]
        if not chosen:
            if artifact is None:
                _fail(f"job {job} has no artifacts yet", 1)
            names = ", ".join(a["name"] for a in listing[:20]) or "none yet"
            _fail(f"job {job} has no artifact {artifact!r} (it has: {names})")
        targets = [(a, _destination(out, a["name"])) for a in chosen]
        console = _err_console()
        with _bytes_progress(console) as progress:
            task = progress.add_task(f"job {job}", total=sum(a.get("size", 0) for a in chosen))
            for item, dest in targets:
                client.download_artifact(
                    job, item["name"], dest, on_bytes=lambda n: progress.advance(task, n)
                )
    for _item, dest in targets:
        typer.echo(str(dest))
    partial = [a["name"] for a in chosen if a.get("partial")]
    if partial:
        _note(f"partial (the job did not succeed, or a stream in progress): {', '.join(partial[:10])}")


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------


def _resolve_schedule(client: Client, ref: str) -> dict[str, Any]:
    """The schedule called ``ref``, or with the id ``ref``."""
    found = client.schedules()
    for schedule in found:
        if schedule.get("name") == ref:
            return dict(schedule)
    for schedule in found:
        if ref.isdigit() and schedule.get("id") == int(ref):
            return dict(schedule)
    _fail(f"no schedule {ref!r} on {client.url} (`distill remote schedule list` lists them)")


def _slot(stamp: str | None, timezone: str | None = None) -> str:
    """``2025-01-02 03:00+01:00``: an ISO time to the minute, in ``timezone`` (default: its own offset)."""
    if not stamp:
        return ""
    try:
        moment = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            moment = moment.astimezone(ZoneInfo(timezone))
    return moment.isoformat(sep=" ", timespec="minutes")


def _schedule_pipeline(path: Path | None) -> dict[str, Any]:
    """A schedule's ``pipeline`` from a config: its ``pipeline:`` section, else (and under it) its top-level
    inference, calibration, student, rounds, seed, shard_size (other sections left out, with a note)."""
    sections = _config_sections(path, (*SCHEDULE_KEYS, "pipeline"), "scheduled pipeline")
    nested = sections.pop("pipeline", None)
    if nested is None:
        return sections
    if not isinstance(nested, dict):
        _fail(f"{path}: pipeline: expected a mapping ({', '.join(SCHEDULE_KEYS)})")
    return {**sections, **nested}


ScheduleRef = Annotated[
    str, typer.Argument(metavar="SCHEDULE", help="a schedule's id or name (`distill remote schedule list`)")
]


@schedule_app.command("create")
def schedule_create(
    name: Annotated[str, typer.Argument(help="the schedule's name (letters, digits, '.', '_', '-')")],
    cron: Annotated[
        str, typer.Option(help="5 fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *'")
    ],
    model: Annotated[
        str, typer.Option(help="a model name: its promoted version is each run's teacher")
    ],
    labeled: Labeled,
    unlabeled: Annotated[str, typer.Option(help="the unlabeled dataset new images arrive in (name or id)")],
    eval: Annotated[
        str, typer.Option("--eval", help="the dataset the promotion gate scores on (name or id)")
    ],
    timezone: Annotated[str, typer.Option(help="the IANA time zone the cron is read in")] = "UTC",
    min_new_images: Annotated[
        int, typer.Option(min=0, help="skip a slot with fewer new unlabeled images since the last run")
    ] = 0,
    metric: Annotated[
        str, typer.Option(help="the promotion gate's metric on the eval dataset, IOU_TYPE/METRIC")
    ] = "bbox/AP",
    min_gain: Annotated[
        float, typer.Option(min=0, max=1, help="how much the student must beat the teacher by (AP: 0..1)")
    ] = 0.0,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", exists=True, dir_okay=False,
            help="YAML / JSON of the pipeline each run starts: a pipeline: section, or top-level "
            "inference, calibration, student, rounds, seed, shard_size",
        ),
    ] = None,
    url: Url = None,
    token: Token = None,
) -> None:  # fmt: skip
    """A retraining schedule: at each cron time a pipeline job — the model's promoted version as teacher,
    the student promoted when it beats it on the eval dataset by --min-gain.

    Prints the schedule's id, then (on stderr) its next run times in its time zone."""
    pipeline = _schedule_pipeline(config)
    with _client(url, token) as client:
        body: dict[str, Any] = {
            "name": name, "cron": cron, "timezone": timezone, "model": model,
            "labeled": _resolve_dataset(client, labeled)["id"],
            "unlabeled": _resolve_dataset(client, unlabeled)["id"],
            "eval": _resolve_dataset(client, eval)["id"], "pipeline": pipeline,
            "min_new_images": min_new_images, "promotion": {"metric": metric, "min_gain": min_gain},
        }  # fmt: skip
        created = client.create_schedule(body)
    typer.echo(created["id"])
    _note(f"schedule {created['name']!r} (id {created['id']}): {created['cron']} in {created['timezone']}")
    for when in created.get("next_runs") or []:
        _note(f"  next run {_slot(when)}")


@schedule_app.command("list")
def schedule_list(url: Url = None, token: Token = None) -> None:
    """The service's schedules (`next run`: in the schedule's time zone; none while paused)."""
    from rich.console import Console
    from rich.table import Table

    with _client(url, token) as client:
        rows = client.schedules()
    table = Table("id", "name", "cron", "timezone", "model", "paused", "next run")
    for sc in rows:
        upcoming = sc.get("next_runs") or []
        table.add_row(str(sc["id"]), sc["name"], sc["cron"], sc["timezone"], sc["model"],
                      _yes(sc.get("paused")), _slot(upcoming[0]) if upcoming else "")  # fmt: skip
    Console().print(table)


def _set_paused(ref: str, paused: bool, url: str | None, token: str | None) -> None:
    with _client(url, token) as client:
        found = client.update_schedule(_resolve_schedule(client, ref)["id"], paused=paused)
    upcoming = found.get("next_runs") or []
    then = f"; next run {_slot(upcoming[0])}" if upcoming else ""
    state = "paused" if found.get("paused") else "resumed"
    typer.echo(f"schedule {found['name']} (id {found['id']}) {state}{then}")


@schedule_app.command("pause")
def schedule_pause(schedule: ScheduleRef, url: Url = None, token: Token = None) -> None:
    """Stop starting runs (a run in progress goes on)."""
    _set_paused(schedule, True, url, token)


@schedule_app.command("resume")
def schedule_resume(schedule: ScheduleRef, url: Url = None, token: Token = None) -> None:
    """Start runs again, from the next cron time (the slots missed while paused do not run)."""
    _set_paused(schedule, False, url, token)


def _run_primary(decision: dict[str, Any] | None) -> str:
    primary = (decision or {}).get("primary")
    if not isinstance(primary, dict):
        return ""
    return f"{primary.get('metric')} {_percent(primary.get('teacher'))} -> {_percent(primary.get('student'))}"


@schedule_app.command("runs")
def schedule_runs(
    schedule: ScheduleRef,
    limit: Annotated[int, typer.Option(min=1, max=500, help="at most this many, newest first")] = 50,
    url: Url = None,
    token: Token = None,
) -> None:
    """A schedule's runs, the newest first: the job each started (or why its slot was skipped), the teacher
    version, the unlabeled images (all / new), the primary metric teacher -> student, and whether (and why)
    the student was promoted."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    with _client(url, token) as client:
        found = _resolve_schedule(client, schedule)
        page = client.list_schedule_runs(found["id"], limit=limit)
    console = Console()
    if not page["data"]:
        console.print(f"schedule {found['name']} (id {found['id']}): no runs yet", markup=False)
        return
    table = Table("slot", "state", "job", "job state", "teacher", "images/new", "primary", "promoted",
                  "reason")  # fmt: skip
    for run in page["data"]:
        promotion = run.get("promotion") or {}
        promoted = "" if not promotion else _yes(promotion.get("promoted"))
        if promotion.get("promoted") and promotion.get("version") is not None:
            promoted = f"yes: v{promotion['version']}"
        job = run.get("job_id")
        table.add_row(
            _slot(run.get("slot"), found.get("timezone")), run["state"], "" if job is None else str(job),
            run.get("job_state") or "", _version(run.get("teacher")),
            f"{run.get('images', 0)}/{run.get('new_images', 0)}", _run_primary(run.get("decision")), promoted,
            Text(run.get("reason") or promotion.get("reason") or ""),
        )  # fmt: skip
    console.print(table)
    if page["count"] > len(page["data"]):
        console.print(f"{len(page['data'])} of {page['count']} runs (--limit)")


@schedule_app.command("delete")
def schedule_delete(schedule: ScheduleRef, url: Url = None, token: Token = None) -> None:
    """Delete a schedule and its run history (the jobs it started and their models stay)."""
    with _client(url, token) as client:
        found = _resolve_schedule(client, schedule)
        client.delete_schedule(found["id"])
    typer.echo(f"deleted schedule {found['name']} (id {found['id']})")
