"""A client of the distill service's HTTP API (``/v1``): one method per call, over one ``httpx.Client``.

Light on purpose — httpx and the standard library only (no torch, no SQLAlchemy, nothing of ``distill``):
``distill remote`` runs it on machines that only talk to a service. Every failure is a :class:`RemoteError`
with the HTTP status (``0`` when no answer came: the server is unreachable or the connection dropped) and
the server's ``{detail}`` as text.

Uploads and downloads stream: request bodies are read from the files in 64 KiB chunks as they are sent,
responses are written to a temporary file next to their destination and renamed into place once complete.

::

    with Client("http://127.0.0.1:8000", token) as client:
        dataset = client.create_dataset("street", "unlabeled")
        report = client.upload_images(dataset["id"], [("a.jpg", Path("photos/a.jpg"))])
        job = client.create_job({"type": "distill", "labeled": 1, "unlabeled": dataset["id"], "teacher": 3})
        for state in client.follow(job["id"]):
            print(state["stage"], state["progress"])
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypedDict
from urllib.parse import quote

import httpx

FINISHED = ("succeeded", "failed", "cancelled")
"""The end states of a job."""
RETRYABLE = (0, 502, 503, 504)
"""Statuses :meth:`Client.follow` rides out (no answer, or a proxy / restarting server in front)."""
CHUNK = 64 * 1024

Progress = Callable[[int], None]
"""Called with the number of bytes just sent or received."""


class RemoteError(Exception):
    """A failed call: ``status`` is the HTTP status (``0``: no answer), ``detail`` the server's reason."""

    def __init__(self, status: int, detail: str, *, call: str = "", body: Any = None) -> None:
        self.status = status
        self.detail = detail
        self.call = call
        self.body = body  # the answer's JSON, when it had one
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{detail}" if status == 0 else f"{where}HTTP {status}: {detail}")


class Stage(TypedDict):
    name: str
    state: str  # queued | running | done | failed
    units: int
    done_units: int
    progress: dict[str, int]


class Job(TypedDict, total=False):
    id: int
    type: str
    state: str  # queued | running | succeeded | failed | cancelled
    stage: str
    progress: dict[str, int]  # {done, total} of the current stage
    eta_s: float | None
    stages: list[Stage]
    warnings: list[Any]
    skipped: list[Any]
    metrics: dict[str, Any]
    datasets: dict[str, Any]
    cancel_requested: bool
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class Dataset(TypedDict, total=False):
    id: int
    name: str
    kind: str  # labeled | unlabeled | eval
    annotations: bool
    stats: dict[str, Any]
    created_at: str


class Promotion(TypedDict, total=False):
    id: int
    name: str
    action: str  # promote | rollback
    model: dict[str, Any]  # {id, name, version, role}: the version this action promoted
    previous: dict[str, Any] | None  # the version promoted before it
    reason: str
    created_by: int | None  # the API token's id (None: a schedule, or the name's first version)
    job_id: int | None  # the job whose promotion gate did it
    undone: bool
    created_at: str


class Schedule(TypedDict, total=False):
    id: int
    name: str
    cron: str
    timezone: str
    model: str  # a model name: its promoted version is each run's teacher
    labeled: int
    unlabeled: int
    eval: int
    pipeline: dict[str, Any]  # inference, calibration, student, rounds, seed, shard_size
    min_new_images: int
    promotion: dict[str, Any]  # {metric, min_gain}
    paused: bool
    next_runs: list[str]  # ISO times in the schedule's zone (none when paused)
    created_at: str
    updated_at: str


class ScheduleRun(TypedDict, total=False):
    id: int
    slot: str  # UTC
    state: str  # started | skipped
    reason: str
    job_id: int | None
    job_state: str | None
    teacher: dict[str, Any] | None  # {id, name, version}
    images: int
    new_images: int
    decision: dict[str, Any] | None  # {promoted, teacher, student, health, primary, metrics}
    promotion: dict[str, Any] | None  # {promoted, name, model_id, version, reason}
    created_at: str


class UploadReport(TypedDict):
    accepted: list[dict[str, Any]]  # {name, sha256, duplicate, uploaded_as, part}
    rejected: list[dict[str, Any]]  # {name, reason, part}


class Artifact(TypedDict, total=False):
    name: str
    size: int
    content_type: str
    partial: bool


@dataclass(frozen=True)
class ServerEvent:
    """One ``text/event-stream`` event."""

    event: str
    data: str
    id: str | None = None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    """The server's reason, as one line: ``{detail}`` (a string, or FastAPI's list of field errors)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase or "no reason given"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and all(isinstance(e, dict) and "msg" in e for e in detail):
        parts = []
        for error in detail:
            loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc)}: {error['msg']}" if loc else str(error["msg"]))
        return "; ".join(parts)
    return json.dumps(detail)


class _CountingReader:
    """A binary file that reports the bytes read from it (once each, however often httpx rewinds it)."""

    def __init__(self, file: IO[bytes], on_bytes: Progress | None) -> None:
        self._file = file
        self._on_bytes = on_bytes
        self._reported = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        position = self._file.tell()
        if self._on_bytes is not None and position > self._reported:
            self._on_bytes(position - self._reported)
            self._reported = position
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:  # httpx learns the part's length from fstat: Content-Length, not chunked
        return self._file.fileno()


def parse_events(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """The events of a ``text/event-stream`` body given line by line (comments — pings — skipped)."""
    event, data, event_id = "", [], None
    for line in lines:
        if not line:
            if data:
                yield ServerEvent(event or "message", "\n".join(data), event_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield ServerEvent(event or "message", "\n".join(data), event_id)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Client:
    """The service at ``url`` (e.g. ``http://127.0.0.1:8000``) with the API token ``token``."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport, follow_redirects=False,
        )  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ----

    def _unreachable(self, call: str, exc: httpx.HTTPError) -> RemoteError:
        reason = str(exc) or type(exc).__name__
        return RemoteError(0, f"no answer from {self.url}: {reason}", call=call)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        call = f"{method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(call, exc) from None
        if response.is_error:
            raise RemoteError(response.status_code, _detail(response), call=call, body=_body(response))
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise RemoteError(
                response.status_code, f"expected JSON, got {response.text[:200]!r}", call=f"{method} {path}"
            ) from None

    def _all(self, path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every item of a paged ``{data, count}`` listing."""
        items: list[dict[str, Any]] = []
        while True:
            page = self._json("GET", path, params={**(params or {}), "offset": len(items), "limit": 500})
            if isinstance(page, list):  # an unpaged listing
                return page
            items += page["data"]
            if not page["data"] or len(items) >= page["count"]:
                return items

    # ---- health ----

    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def readyz(self) -> dict[str, Any]:
        """``{database: ok, storage: ok}``; a 503 (something unreachable) raises with the checks as detail.
        Needs a valid token of any scope: the way to check one."""
        call = "GET /readyz"
        try:
            response = self._http.get("/readyz")
        except httpx.HTTPError as exc:
            raise self._unreachable(call, exc) from None
        if response.status_code == 503:
            with contextlib.suppress(ValueError):
                checks = response.json()
                failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
                raise RemoteError(503, f"the service is not ready ({failing})", call=call)
        if response.is_error:
            raise RemoteError(response.status_code, _detail(response), call=call)
        return response.json()

    # ---- datasets ----

    def list_datasets(self, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return self._json("GET", "/v1/datasets", params={"offset": offset, "limit": limit})

    def datasets(self) -> list[Dataset]:
        """Every dataset (all pages)."""
        return self._all("/v1/datasets")  # type: ignore[return-value]

    def get_dataset(self, dataset_id: int) -> Dataset:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def find_dataset(self, name: str) -> Dataset | None:
        """The dataset called ``name``, or ``None``."""
        found = self._json("GET", "/v1/datasets", params={"name": name, "limit": 1})["data"]
        return found[0] if found else None

    def create_dataset(self, name: str, kind: str) -> Dataset:
        return self._json("POST", "/v1/datasets", json={"name": name, "kind": kind})

    def delete_dataset(self, dataset_id: int) -> None:
        self._json("DELETE", f"/v1/datasets/{dataset_id}")

    def list_images(self, dataset_id: int, *, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._json(
            "GET", f"/v1/datasets/{dataset_id}/images", params={"offset": offset, "limit": limit}
        )

    def upload_images(
        self,
        dataset_id: int,
        files: Sequence[tuple[str, Path]],
        *,
        on_bytes: Progress | None = None,
        timeout: float | None = 600.0,
    ) -> UploadReport:
        """One request with a ``files`` part per ``(name, path)`` — an image or an archive of images, read
        from disk as it is sent. ``name`` is the name the image gets (the COCO ``file_name``). The report
        also when every file was rejected (the server's 422 carries it)."""
        with contextlib.ExitStack() as stack:
            parts = []
            for name, path in files:
                handle = stack.enter_context(Path(path).open("rb"))
                parts.append(("files", (name, _CountingReader(handle, on_bytes), "application/octet-stream")))
            try:
                return self._json(
                    "POST", f"/v1/datasets/{dataset_id}/images", files=parts,
                    timeout=httpx.Timeout(timeout, connect=10.0),
                )  # fmt: skip
            except RemoteError as error:  # every file rejected: a 422 that still carries the report
                if error.status == 422 and isinstance(error.body, dict) and "rejected" in error.body:
                    return {"accepted": error.body["accepted"], "rejected": error.body["rejected"]}
                raise

    def put_annotations(
        self, dataset_id: int, path: Path, *, name: str | None = None, on_bytes: Progress | None = None
    ) -> Dataset:
        """Put the COCO json at ``path`` as the dataset's annotations (its ``file_name`` s must be
        uploaded images of the dataset)."""
        path = Path(path)
        with path.open("rb") as handle:
            part = (name or path.name, _CountingReader(handle, on_bytes), "application/json")
            return self._json(
                "PUT", f"/v1/datasets/{dataset_id}/annotations", files={"file": part},
                timeout=httpx.Timeout(None, connect=10.0),
            )  # fmt: skip

    # ---- models ----

    def models(self, *, name: str | None = None) -> list[dict[str, Any]]:
        """Every registered model (all pages), the newest first; ``name``: only that name's versions."""
        return self._all("/v1/models", None if name is None else {"name": name})

    def get_model(self, model_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{model_id}")

    def upload_model(self, name: str, archive: Path, *, on_bytes: Progress | None = None) -> dict[str, Any]:
        """Register a model from an archive of a model directory (multipart ``name`` + ``archive``)."""
        archive = Path(archive)
        with archive.open("rb") as handle:
            part = (archive.name, _CountingReader(handle, on_bytes), "application/octet-stream")
            return self._json(
                "POST", "/v1/models", data={"name": name}, files={"archive": part},
                timeout=httpx.Timeout(None, connect=10.0),
            )  # fmt: skip

    def upload_detectron2_model(
        self, name: str, config: Path, weights: Path, *, categories: Path | None = None,
        on_bytes: Progress | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Register a detectron2 model from its ``.yaml`` config and weights (+ a COCO json of categories)."""
        given = {"config": config, "weights": weights, "categories": categories}
        with contextlib.ExitStack() as stack:
            files = {}
            for field, path in given.items():
                if path is not None:
                    handle = stack.enter_context(Path(path).open("rb"))
                    files[field] = (
                        Path(path).name,
                        _CountingReader(handle, on_bytes),
                        "application/octet-stream",
                    )
            return self._json(
                "POST",
                "/v1/models",
                data={"name": name},
                files=files,
                timeout=httpx.Timeout(None, connect=10.0),
            )

    def promote_model(self, name: str, version: int, reason: str = "") -> Promotion:
        """Make ``version`` the promoted version of ``name`` (what jobs and schedules naming it use); 409
        when it already is, 404 for an unknown name or version."""
        return self._json(
            "POST", f"/v1/models/{quote(name, safe='')}/promote", json={"version": version, "reason": reason}
        )

    def rollback_model(self, name: str, reason: str = "") -> Promotion:
        """Promote again the version promoted before the current one (its ``model``); 409 when there is
        none."""
        return self._json("POST", f"/v1/models/{quote(name, safe='')}/rollback", json={"reason": reason})

    def promotions(self, name: str) -> dict[str, Any]:
        """``{name, promoted: model | None, history: [promotion, ...]}``, the newest first."""
        return self._json("GET", f"/v1/models/{quote(name, safe='')}/promotions")

    # ---- schedules ----

    def create_schedule(self, body: dict[str, Any]) -> Schedule:
        """A schedule (``{name, cron, timezone, model, labeled, unlabeled, eval, pipeline, min_new_images,
        promotion}``), with its next run times; 422 naming a bad field, 409 for a name in use."""
        return self._json("POST", "/v1/schedules", json=body)

    def schedules(self) -> list[Schedule]:
        """Every schedule (all pages)."""
        return self._all("/v1/schedules")  # type: ignore[return-value]

    def get_schedule(self, schedule_id: int) -> Schedule:
        return self._json("GET", f"/v1/schedules/{schedule_id}")

    def update_schedule(self, schedule_id: int, **fields: Any) -> Schedule:
        """Change any of the schedule's fields, or ``paused`` (``paused=True`` pauses it, ``False`` resumes
        it: slots that passed meanwhile do not run)."""
        return self._json("PATCH", f"/v1/schedules/{schedule_id}", json=fields)

    def delete_schedule(self, schedule_id: int) -> None:
        """Delete the schedule and its run history (the jobs it started and their models stay)."""
        self._json("DELETE", f"/v1/schedules/{schedule_id}")

    def list_schedule_runs(self, schedule_id: int, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """``{data: [run, ...], count}``, the newest first."""
        return self._json(
            "GET", f"/v1/schedules/{schedule_id}/runs", params={"offset": offset, "limit": limit}
        )

    def schedule_runs(self, schedule_id: int) -> list[ScheduleRun]:
        """Every run of the schedule (all pages), the newest first."""
        return self._all(f"/v1/schedules/{schedule_id}/runs")  # type: ignore[return-value]

    # ---- jobs ----

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit a job (``{type: pipeline|distill|train|evaluate, ...}``): ``{id, state: "queued"}``."""
        return self._json("POST", "/v1/jobs", json=body)

    def list_jobs(
        self, *, state: str | None = None, type: str | None = None, offset: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        """``{data: [job, ...], count}``, newest first."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        params |= {k: v for k, v in (("state", state), ("type", type)) if v is not None}
        return self._json("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: int) -> Job:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: int) -> Job:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def retry_job(self, job_id: int) -> Job:
        return self._json("POST", f"/v1/jobs/{job_id}/retry")

    def events(self, job_id: int, *, read_timeout: float = 60.0) -> Iterator[ServerEvent]:
        """The job's event stream (``job`` events, then ``end``) over one connection; a dropped connection
        raises :class:`RemoteError` with status 0. The server pings every 15 s: ``read_timeout`` above
        that notices a dead connection."""
        path = f"/v1/jobs/{job_id}/events"
        call = f"GET {path}"
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self._http.stream(
                "GET", path, headers={"Accept": "text/event-stream"}, timeout=timeout
            ) as response:
                if response.is_error:
                    response.read()
                    raise RemoteError(response.status_code, _detail(response), call=call)
                yield from parse_events(response.iter_lines())
        except httpx.HTTPError as exc:
            raise self._unreachable(call, exc) from None

    def follow(
        self,
        job_id: int,
        *,
        retry_seconds: float = 1.0,
        give_up_after: float = 300.0,
        read_timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[Job]:
        """The job each time it changes, until it has finished (the last one yielded is finished).

        Reads the event stream; when the connection drops (or the stream ends without ``end``) it reads
        ``GET /v1/jobs/{id}`` instead — so a job that ended meanwhile is seen — and reconnects, waiting
        ``retry_seconds`` doubling up to 10 s. Raises :class:`RemoteError` on an error that retrying cannot
        fix (404, 401, ...) or after ``give_up_after`` seconds without an answer."""
        last_answer = time.monotonic()
        delay = retry_seconds
        lost: RemoteError | None = None
        while True:
            try:
                with contextlib.closing(self.events(job_id, read_timeout=read_timeout)) as stream:
                    for event in stream:
                        last_answer, delay, lost = time.monotonic(), retry_seconds, None
                        if event.event not in ("job", "end"):
                            continue
                        job: Job = json.loads(event.data)
                        yield job
                        if event.event == "end" or job.get("state") in FINISHED:
                            return
            except RemoteError as exc:
                if exc.status not in RETRYABLE:
                    raise
                lost = exc
            try:  # the stream dropped or ended early: the job as it is now, then reconnect
                job = self.get_job(job_id)
                last_answer = time.monotonic()
                yield job
                if job.get("state") in FINISHED:
                    return
            except RemoteError as exc:
                if exc.status not in RETRYABLE:
                    raise
                lost = exc
            if time.monotonic() - last_answer > give_up_after:
                reason = f": {lost.detail}" if lost is not None else ""
                raise RemoteError(
                    0, f"lost job {job_id}'s events for {give_up_after:.0f} s{reason}", call=f"watch {job_id}"
                )
            sleep(delay)
            delay = min(delay * 2, 10.0)

    # ---- artifacts ----

    def list_artifacts(self, job_id: int) -> list[Artifact]:
        """Every file the job wrote: ``{name, size, content_type, partial}``."""
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")

    def download_artifact(
        self, job_id: int, name: str, dest: Path, *, on_bytes: Progress | None = None
    ) -> Path:
        """Stream artifact ``name`` to the file ``dest`` (written to a temporary file beside it, renamed
        into place when complete: ``dest`` is never half-written); returns ``dest``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"/v1/jobs/{job_id}/artifacts/{quote(name)}"
        call = f"GET {path}"
        fd, temp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                with self._http.stream("GET", path, timeout=httpx.Timeout(60.0, connect=10.0)) as response:
                    if response.is_error:
                        response.read()
                        raise RemoteError(response.status_code, _detail(response), call=call)
                    encoded = response.headers.get("content-encoding", "identity") != "identity"
                    expected = None if encoded else response.headers.get("content-length")
                    written = 0
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                if expected is not None and written != int(expected):
                    raise RemoteError(0, f"{name}: got {written} of {expected} bytes", call=call)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary file only
            os.replace(temp, dest)
        except httpx.HTTPError as exc:
            raise self._unreachable(call, exc) from None
        finally:
            Path(temp).unlink(missing_ok=True)
        return dest
