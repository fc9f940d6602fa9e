"""The bad-input corpus: each case is one request a careless or hostile client could send — broken, mislabeled
and bomb images, unsafe and bomb archives, broken COCO json, bad API bodies and parameters, bad model uploads
— sent to a real uvicorn (SQLite, a storage folder). Every case must be answered 4xx with a message naming
the problem, must leave the database and the storage exactly as they were, and the service must still serve
the next request. Formats distill decided to accept (16-bit PNG, CMYK JPEG, EXIF-rotated JPEG, WebP) are
checked at the end."""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from service.db import transaction, upgrade
from service.models import ApiToken, Dataset, Image, Job, Model, Schedule
from tests.service.test_api import check_routes_need_a_token
from tests.service.test_datasets import Api, jpeg, mark_encrypted, png, symlink, tar_of, zip_of

# ---- files --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def encoded(image: PILImage.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [PILImage.new("P", (8, 8), i) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def zip_bomb() -> bytes:
    out = io.BytesIO()
    with (
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("bomb.png", "w") as member,
    ):
        for _ in range(8):
            member.write(bytes(2**20))  # 8 MiB of zeros: about 8 KiB deflated
    return out.getvalue()


def tar_member(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def non_utf8_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        data = png(6, 6)
        info = tarfile.TarInfo("caf\xe9.png")  # latin-1 é: not valid UTF-8 in the archive
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def zip_symlink(name: str, target: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        link = zipfile.ZipInfo(name)
        link.external_attr = 0o120777 << 16  # S_IFLNK: unzip would make a link to ``target``
        archive.writestr(link, target)
    return out.getvalue()


def duplicate_members_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("twice.png", png(5, 5, (1, 1, 1)))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("twice.png", png(5, 5, (2, 2, 2)))
    return out.getvalue()


# ---- the server -------------------------------------------------------------------------------------


@dataclass
class Corpus:
    api: Api
    labeled: int
    unlabeled: int

    def snapshot(self) -> tuple[Any, ...]:
        """The database's rows (counts per table) and every file in the storage, staging included."""
        root = self.api.storage_root
        files = sorted(
            (p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file()
        )
        with transaction(self.api.sessions) as session:
            counts = tuple(
                session.scalar(select(func.count()).select_from(table))
                for table in (Dataset, Image, Job, Model, Schedule, ApiToken)
            )
            annotated = session.scalar(select(Dataset.annotations_key).where(Dataset.id == self.labeled))
        return counts, annotated, tuple(files)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("bad-input")
    url = f"sqlite:///{root / 'distill.db'}"
    upgrade(url)
    api = Api(url, root)
    try:
        labeled, unlabeled = api.create("lab", kind="labeled"), api.create("pile")
        api.upload(labeled, ("a.png", png(32, 24)), ("b.png", png(20, 20, (0, 0, 200))))
        api.upload(unlabeled, ("u.png", png(16, 16)))
        yield Corpus(api, labeled, unlabeled)
    finally:
        api.close()


# ---- the cases ----------------------------------------------------------------------------------------

Request = Callable[[Corpus], httpx.Response]


def upload(name: str, data: bytes) -> Request:
    return lambda c: c.api.writer.post(f"/v1/datasets/{c.unlabeled}/images", files=[("files", (name, data))])


CATEGORIES = [{"id": 1, "name": "person", "keypoints": ["l_eye", "r_eye"], "skeleton": [[1, 2]]}]
IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]


def coco(*, raw: bytes | None = None, **change: Any) -> Request:
    """A PUT of annotations: ``raw`` bytes, or a valid COCO document with ``change`` applied (a key set to
    ``...`` is removed; ``annotation`` replaces the one annotation's fields)."""
    if raw is None:
        annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0,
                      "iscrowd": 0, "keypoints": [2, 2, 2, 4, 2, 2], "num_keypoints": 2}  # fmt: skip
        annotation.update(change.pop("annotation", {}))
        document = {"images": IMAGES, "annotations": [annotation], "categories": CATEGORIES, **change}
        document = {k: v for k, v in document.items() if v is not ...}
        raw = json.dumps(
            document
        ).encode()  # NaN / Infinity are written as such: invalid JSON for strict readers
    body = raw
    return lambda c: c.api.writer.put(
        f"/v1/datasets/{c.labeled}/annotations", files={"file": ("coco.json", body, "application/json")}
    )


def post_json(path: str, body: Any) -> Request:
    return lambda c: c.api.writer.post(path, json=body(c) if callable(body) else body)


def job(**change: Any) -> Request:
    def body(c: Corpus) -> dict[str, Any]:
        base = {"type": "pipeline", "labeled": c.labeled, "unlabeled": c.unlabeled,
                "teacher": {"recipe": "tiny", "iterations": 5}}  # fmt: skip
        return {k: v for k, v in {**base, **change}.items() if v is not ...}

    return post_json("/v1/jobs", body)


def schedule(**change: Any) -> Request:
    def body(c: Corpus) -> dict[str, Any]:
        base = {"name": "nightly", "cron": "0 3 * * *", "model": "tiny", "labeled": c.labeled,
                "unlabeled": c.unlabeled, "eval": c.labeled}  # fmt: skip
        return {**base, **change}

    return post_json("/v1/schedules", body)


def model_upload(name: str, filename: str, data: bytes) -> Request:
    return lambda c: c.api.writer.post("/v1/models", data={"name": name}, files={"archive": (filename, data)})


def raw_request(method: str, path: str, **kwargs: Any) -> Request:
    return lambda c: c.api.writer.request(method, path, **kwargs)


def chunked(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        yield b" " * 65536
        sent += 65536


BIG = 2**20 + 10
# (id, request, status, what the detail says)
CASES: list[tuple[str, Request, int, str]] = [
    # images: each alone in an upload, so the whole upload is refused (422) and says why
    ("zero-byte png", upload("zero.png", b""), 422, "zero.png: empty file"),
    ("truncated png", upload("cut.png", png(64, 48)[:-40]), 422, "cut.png: "),
    ("text named .jpg", upload("x.jpg", b"this is text, not a JPEG"), 422, "not a recognised image"),
    ("png header then garbage", upload("g.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 9), 422, "g.png: "),
    ("jpeg cut in half", upload("half.jpg", jpeg(64, 64)[:200]), 422, "half.jpg: "),
    ("garbage named .webp", upload("w.webp", b"RIFF\x00\x00\x00\x00WEBPnope"), 422, "w.webp: "),
    ("decompression bomb", upload("bomb.png", huge_png()), 422, "bomb.png: "),
    ("animated gif", upload("anim.gif", animated_gif()), 422, "unsupported extension ('.gif')"),
    (
        "svg",
        upload("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        422,
        "unsupported extension ('.svg')",
    ),
    ("text file", upload("notes.txt", b"hello"), 422, "unsupported extension ('.txt')"),
    ("name with ..", upload("../up.png", png(4, 4)), 422, "'..'"),
    ("absolute name", upload("/etc/x.png", png(4, 4)), 422, "absolute path"),
    ("name too long", upload("n" * 500 + ".png", png(4, 4)), 422, "long"),
    # archives
    ("zip member ../", upload("a.zip", zip_of([("../evil.png", png(8, 8))])), 422, "'..'"),
    ("zip member absolute", upload("a.zip", zip_of([("/etc/abs.png", png(5, 5))])), 422, "absolute path"),
    ("zip symlink", upload("a.zip", zip_symlink("link.png", "/etc/passwd")), 422, "symbolic link"),
    ("tar symlink", upload("a.tar.gz", tar_of([symlink("t/link.png", "/etc/passwd")])), 422, "symbolic link"),
    (
        "tar hard link",
        upload("a.tar", tar_of([tar_member("t/h.png", tarfile.LNKTYPE, "/etc/passwd")], "w")),
        422,
        "hard link",
    ),
    ("tar device", upload("a.tar", tar_of([tar_member("t/d.png", tarfile.CHRTYPE)], "w")), 422, "device"),
    ("zip bomb", upload("a.zip", zip_bomb()), 422, "zip bomb"),
    (
        "tar.gz bomb",
        upload("b.tar.gz", tar_of([("t/zeros.png", bytes(8 * 2**20))])),
        422,
        "compression ratio",
    ),
    (
        "nested zip",
        upload("a.zip", zip_of([("inner.zip", zip_of([("x.png", png(4, 4))]))])),
        422,
        "nested archive",
    ),
    (
        "encrypted member",
        upload("e.zip", mark_encrypted(zip_of([("locked.png", png(6, 6))]), "locked.png")),
        422,
        "encrypted",
    ),
    ("not a zip", upload("junk.zip", b"PK\x03\x04 not really"), 422, "junk.zip: "),
    ("not a tar", upload("junk.tgz", b"not a tar at all"), 422, "not a readable tar archive"),
    (
        "duplicate member names",
        upload("d.zip", duplicate_members_zip()),
        422,
        "2 members of the archive have this name",
    ),
    ("non-UTF-8 member name", upload("n.tar", non_utf8_tar()), 422, "not valid UTF-8"),
    ("empty zip", upload("empty.zip", zip_of([])), 422, "empty.zip: the archive holds no files"),
    # COCO json
    ("coco not json", coco(raw=b"{nope"), 422, "coco.json: invalid JSON at line 1"),
    ("coco empty file", coco(raw=b""), 422, "coco.json: "),
    ("coco not UTF-8", coco(raw=b'{"images": "\xff\xfe"}'), 422, "coco.json: "),
    ("coco a list", coco(raw=b"[1, 2, 3]"), 422, "coco.json: "),
    ("coco without images", coco(images=...), 422, "images"),
    ("coco images not a list", coco(images="a.png"), 422, "images"),
    ("coco without categories", coco(categories=...), 422, "categories"),
    ("coco bbox a string", coco(annotation={"bbox": "1,1,5,5"}), 422, "bbox"),
    ("coco bbox NaN", coco(annotation={"bbox": [1, 1, float("nan"), 5]}), 422, "coco.json: "),
    ("coco bbox Infinity", coco(annotation={"bbox": [1, 1, float("inf"), 5]}), 422, "coco.json: "),
    ("coco bbox negative", coco(annotation={"bbox": [1, 1, -5, 5]}), 422, "bbox"),
    ("coco bbox of 3", coco(annotation={"bbox": [1, 1, 5]}), 422, "bbox"),
    ("coco dangling image_id", coco(annotation={"image_id": 7}), 422, "no image with id 7"),
    ("coco dangling category_id", coco(annotation={"category_id": 9}), 422, "category"),
    ("coco keypoints wrong length", coco(annotation={"keypoints": [2, 2, 2, 4]}), 422, "keypoints"),
    ("coco file not uploaded", coco(images=[*IMAGES, {"id": 3, "file_name": "never.png"}]), 422, "never.png"),
    ("coco duplicate image id", coco(images=[IMAGES[0], {**IMAGES[1], "id": 1}]), 422, "id"),
    ("coco wrong size", coco(images=[{**IMAGES[0], "width": 99, "height": 99}, IMAGES[1]]), 422, "a.png"),
    ("coco id a string", coco(annotation={"id": "one"}), 422, "id"),
    # API bodies and parameters
    (
        "body not json",
        raw_request("POST", "/v1/datasets", content=b"name=x", headers={"content-type": "text/plain"}),
        422,
        "valid dictionary",
    ),
    (
        "body malformed json",
        raw_request(
            "POST", "/v1/datasets", content=b'{"name": ', headers={"content-type": "application/json"}
        ),
        422,
        "JSON",
    ),
    (
        "unknown field",
        post_json("/v1/datasets", {"name": "x", "kind": "eval", "colour": "red"}),
        422,
        "colour",
    ),
    ("bad kind", post_json("/v1/datasets", {"name": "x", "kind": "weird"}), 422, "kind"),
    ("name with a slash", post_json("/v1/datasets", {"name": "../up", "kind": "eval"}), 422, "name"),
    (
        "body over the limit",
        post_json("/v1/datasets", {"name": "x", "kind": "eval", "pad": "x" * BIG}),
        413,
        "request body above the limit",
    ),
    (
        "chunked body over the limit",
        raw_request("POST", "/v1/jobs", content=chunked(BIG), headers={"content-type": "application/json"}),
        413,
        "limit",
    ),
    ("negative limit", raw_request("GET", "/v1/datasets", params={"limit": -1}), 422, "limit"),
    ("huge limit", raw_request("GET", "/v1/datasets", params={"limit": 10**12}), 422, "limit"),
    ("negative offset", raw_request("GET", "/v1/jobs", params={"offset": -5}), 422, "offset"),
    ("id beyond int64", raw_request("GET", "/v1/datasets/99999999999999999999"), 422, "out of range"),
    ("unknown job type", job(type="magic"), 422, "type"),
    ("unknown recipe", job(teacher={"recipe": "../../etc/passwd"}), 422, "unknown recipe"),
    ("negative iterations", job(teacher={"recipe": "tiny", "iterations": -3}), 422, "iterations"),
    ("huge iterations", job(teacher={"recipe": "tiny", "iterations": 10**12}), 422, "iterations"),
    ("unknown inference field", job(inference={"viewz": "paper"}), 422, "viewz"),
    ("labeled missing", job(labeled=...), 422, "labeled"),
    (
        "dataset of the wrong kind",
        post_json(
            "/v1/jobs", lambda c: {"type": "pipeline", "labeled": c.unlabeled, "unlabeled": c.unlabeled}
        ),
        422,
        "labeled: dataset",
    ),
    ("invalid cron", schedule(cron="61 * * * *"), 422, "is not a cron expression"),
    ("cron that never fires", schedule(cron="0 3 30 2 *"), 422, "never fires"),
    ("unknown time zone", schedule(timezone="Mars/Olympus"), 422, "not an IANA time zone"),
    ("cron a number", schedule(cron=5), 422, "cron"),
    # models
    ("model not an archive", model_upload("m", "m.rar", b"Rar!"), 422, "is not a .zip, .tar"),
    ("model archive junk", model_upload("m", "m.tar.gz", b"\x1f\x8b" + bytes(64)), 422, "tar"),
    ("model name with spaces", model_upload("no spaces", "m.zip", zip_of([])), 422, "name"),
    ("model without weights", model_upload("m", "m.zip", zip_of([("config.yaml", b"a: 1")])), 422, "weights"),
]


@pytest.mark.parametrize(("request_of", "status", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_problem_and_leaves_nothing(
    corpus: Corpus, request_of: Request, status: int, says: str
) -> None:
    before = corpus.snapshot()
    answer = request_of(corpus)
    assert answer.status_code == status, answer.text[:500]
    detail = answer.json()["detail"]
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert says in text, text[:500]
    assert corpus.snapshot() == before  # no row, no file, no staging leftover
    assert corpus.api.reader.get("/healthz").status_code == 200


def test_the_corpus_is_the_size_the_readme_claims() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    claimed = re.search(r"`tests/service/test_bad_input.py`: \*\*(\d+) requests\*\*", readme)
    assert claimed is not None and int(claimed.group(1)) == len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def test_formats_distill_accepts_are_stored_with_their_training_size(corpus: Corpus) -> None:
    """16-bit PNG (read as value / 257), CMYK JPEG (converted to RGB), EXIF-rotated JPEG (stored as sent,
    sized as trained: rotated), WebP."""
    sixteen = encoded(PILImage.new("I;16", (12, 10), 40000), "PNG")
    cmyk = encoded(PILImage.new("CMYK", (14, 9), (0, 50, 100, 0)), "JPEG")
    webp = encoded(PILImage.new("RGB", (11, 13), (5, 200, 5)), "WEBP")
    files = [("sixteen.png", sixteen), ("cmyk.jpg", cmyk), ("rotated.jpg", jpeg(40, 30, orientation=6)),
             ("leaf.webp", webp)]  # fmt: skip
    report = corpus.api.upload(corpus.unlabeled, *files)
    assert {a["name"] for a in report["accepted"]} == {n for n, _ in files} and report["rejected"] == []
    rows = corpus.api.rows(corpus.unlabeled)
    sizes = {name: (rows[name].width, rows[name].height) for name, _ in files}
    assert sizes == {
        "sixteen.png": (12, 10),
        "cmyk.jpg": (14, 9),
        "rotated.jpg": (30, 40),
        "leaf.webp": (11, 13),
    }
    stored = Path(corpus.api.storage_root) / f"datasets/{corpus.unlabeled}/images"
    assert all((stored / name).read_bytes() == data for name, data in files)  # the bytes as sent


def test_every_route_needs_a_token_and_a_read_token_changes_nothing(corpus: Corpus) -> None:
    """Generated from the OpenAPI document, so a new route cannot slip by: no token → 401; a read token → 403
    on every route that changes state, never 401/403 on one that reads; the dashboard's forms need a write
    session (tests/ui)."""
    operations = check_routes_need_a_token(corpus.api.anonymous)
    paths = corpus.api.anonymous.get("/openapi.json").json()["paths"]
    before = corpus.snapshot()
    writes = reads = 0
    for path, methods in paths.items():
        url = path.replace("{name}", "x.json")
        for key in ("job_id", "dataset_id", "image_id", "model_id", "schedule_id"):
            url = url.replace(f"{{{key}}}", "1")
        for method in methods:
            if path == "/healthz":
                continue
            answer = corpus.api.reader.request(method, url)
            if method == "get":
                reads += 1
                assert answer.status_code not in (401, 403), (method, path, answer.text)
            else:
                writes += 1
                assert answer.status_code == 403 and "needs a write token" in answer.text, (method, path)
    assert writes >= 10 and reads >= 10 and {"create_job", "upload_images", "promote_model"} <= operations
    assert corpus.snapshot() == before
