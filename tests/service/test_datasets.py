"""Datasets through a real uvicorn on a free loopback port (SQLite and PostgreSQL): uploads of images and
archives where each bad file or member is rejected alone with its reason and leaves nothing behind,
de-duplication by content, annotations matched to the uploaded files, paging, deletion refused while a job
uses the dataset, and the job snapshot that distill's COCO layer reads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from distill.data.coco import load_coco
from distill.errors import InputError
from distill.storage import Storage
from service import auth
from service.datasets import snapshot_inputs
from service.db import make_engine, session_factory, transaction
from service.models import Dataset, Image, Job
from tests.service.conftest import free_port
from tests.service.test_workers import _stop


def app_factory():
    """The app for ``uvicorn --factory``: the environment's settings, no broker (nothing is enqueued)."""
    from service.api.main import create_app

    return create_app(enqueue=lambda *args: None)


class Api:
    """A uvicorn serving :func:`app_factory` over ``db_url`` and a storage folder; clients with tokens."""

    def __init__(self, db_url: str, tmp_path: Path) -> None:
        self.storage_root = tmp_path / "storage"
        self.engine = make_engine(db_url)
        self.sessions = session_factory(self.engine)
        with transaction(self.sessions) as session:
            writer = auth.create_token(session, scope="write")
            reader = auth.create_token(session, scope="read")
        env = {
            **os.environ, "DISTILL_DATABASE_URL": db_url, "DISTILL_STORAGE_URL": str(self.storage_root),
            "DISTILL_DATA_DIR": str(tmp_path / "var"), "DISTILL_REDIS_URL": "redis://127.0.0.1:1/0",
        }  # fmt: skip
        port = free_port()
        self.log_path = tmp_path / "api.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "tests.service.test_datasets:app_factory",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"the API did not start: {self.log_path.read_text()[-3000:]}")
        self.writer = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {writer}"}, timeout=120)
        self.reader = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {reader}"}, timeout=120)
        self.anonymous = httpx.Client(base_url=base)

    def create(self, name: str, kind: str = "unlabeled") -> int:
        answer = self.writer.post("/v1/datasets", json={"name": name, "kind": kind})
        assert answer.status_code == 201, answer.text
        return answer.json()["id"]

    def upload(self, dataset_id: int, *files: tuple[str, bytes], status: int = 200) -> dict:
        parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
        answer = self.writer.post(f"/v1/datasets/{dataset_id}/images", files=parts)
        assert answer.status_code == status, answer.text
        return answer.json()

    def rows(self, dataset_id: int) -> dict[str, Image]:
        with transaction(self.sessions) as session:
            images = session.query(Image).filter_by(dataset_id=dataset_id).all()
        return {image.name: image for image in images}

    def files(self, dataset_id: int) -> set[str]:
        """Every file under the dataset's storage folder, relative to it (staging included)."""
        root = self.storage_root / "datasets" / str(dataset_id)
        return (
            {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
            if root.exists()
            else set()
        )

    def close(self) -> None:
        for client in (self.writer, self.reader, self.anonymous):
            client.close()
        _stop(self.proc)
        self.log.close()
        self.engine.dispose()


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    server = Api(db_url, tmp_path)
    try:
        yield server
    finally:
        server.close()


sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# ---- test files -----------------------------------------------------------------------------------


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def jpeg(
    width: int, height: int, colour: tuple[int, int, int] = (20, 90, 200), orientation: int = 1
) -> bytes:
    out = io.BytesIO()
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    PILImage.new("RGB", (width, height), colour).save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def zip_of(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def tar_of(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def mark_encrypted(data: bytes, name: str) -> bytes:
    """Set the 'encrypted' flag of ``name``'s central directory entry (zipfile does not write one)."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        length = int.from_bytes(out[at + 28 : at + 30], "little")
        if out[at + 46 : at + 46 + length] == name.encode():
            out[at + 8] |= 0x1
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def reasons(report: dict) -> dict[str, str]:
    return {r["name"]: r["reason"] for r in report["rejected"]}


# ---- tests ----------------------------------------------------------------------------------------


def test_an_upload_keeps_the_good_images_rejects_each_bad_one_alone_and_repeats_identically(api: Api) -> None:
    dataset = api.create("street-1")
    red, blue = png(32, 24), jpeg(40, 30, orientation=6)  # EXIF 6: training sees 30 x 40
    truncated = png(64, 48, (1, 2, 3))[:-40]
    archive = zip_of([("zipped/a.png", png(16, 16, (0, 255, 0))), ("zipped/broken.png", truncated)])
    tarball = tar_of([
        ("tarred/b.png", png(20, 10, (9, 9, 9))), ("../evil.png", png(8, 8)),
        symlink("tarred/link.png", "b.png"), ("tarred/empty.png", b""),
        ("tarred/x.jpg", b"this is text, not a JPEG"),
    ])  # fmt: skip
    files = [("red.png", red), ("blue.jpg", blue), ("batch.zip", archive), ("more.tar.gz", tarball),
             ("zero.png", b""), ("notes.txt", b"hello")]  # fmt: skip
    report = api.upload(dataset, *files)

    good = {"red.png", "blue.jpg", "zipped/a.png", "tarred/b.png"}
    assert {a["name"] for a in report["accepted"]} == good
    assert not any(a["duplicate"] for a in report["accepted"])
    bad = reasons(report)
    assert set(bad) == {"zipped/broken.png", "../evil.png", "tarred/link.png", "tarred/empty.png",
                        "tarred/x.jpg", "zero.png", "notes.txt"}  # fmt: skip
    assert "cannot decode" in bad["zipped/broken.png"] or "corrupt" in bad["zipped/broken.png"]
    assert "'..'" in bad["../evil.png"]
    assert "symbolic link" in bad["tarred/link.png"]
    assert "empty file" in bad["tarred/empty.png"] and "empty file" in bad["zero.png"]
    assert "not a recognised image" in bad["tarred/x.jpg"]
    assert "unsupported extension ('.txt')" in bad["notes.txt"]
    assert {r["part"] for r in report["rejected"] if r["name"].startswith("tarred/")} == {"more.tar.gz"}

    # exactly the accepted files are stored, each with its row; nothing of a reject, no staging left
    rows = api.rows(dataset)
    assert set(rows) == good
    assert api.files(dataset) == {f"images/{name}" for name in good}
    assert (rows["blue.jpg"].width, rows["blue.jpg"].height) == (30, 40)
    assert (rows["red.png"].width, rows["red.png"].height, rows["red.png"].size) == (32, 24, len(red))
    sha = {a["name"]: a["sha256"] for a in report["accepted"]}
    assert sha["red.png"] == hashlib.sha256(red).hexdigest() == rows["red.png"].sha256
    got = api.reader.get(f"/v1/datasets/{dataset}").json()
    assert got["stats"]["images"] == 4 and got["stats"]["bytes"] == sum(r.size for r in rows.values())

    # the same upload again: the same names and hashes, flagged duplicate, nothing new stored
    again = api.upload(dataset, *files)
    assert {(a["name"], a["sha256"]) for a in again["accepted"]} == set(sha.items())
    assert all(a["duplicate"] for a in again["accepted"])
    assert reasons(again) == bad
    assert set(api.rows(dataset)) == good and api.files(dataset) == {f"images/{n}" for n in good}

    # known content under a new name: a duplicate of the existing name; a known name with new content: refused
    renamed = api.upload(dataset, ("copy-of-red.png", red), ("red.png", png(32, 24, (0, 0, 0))))
    assert renamed["accepted"] == [
        {"name": "red.png", "sha256": sha["red.png"], "duplicate": True, "uploaded_as": "copy-of-red.png",
         "part": "copy-of-red.png"}
    ]  # fmt: skip
    assert reasons(renamed) == {"red.png": "name exists with different content"}
    assert (api.storage_root / f"datasets/{dataset}/images/red.png").read_bytes() == red
    assert len(api.rows(dataset)) == 4

    # paged image listing and the image bytes
    page = api.reader.get(f"/v1/datasets/{dataset}/images", params={"offset": 1, "limit": 2}).json()
    assert page["count"] == 4 and [i["name"] for i in page["data"]] == ["blue.jpg", "zipped/a.png"]
    first = api.reader.get(f"/v1/datasets/{dataset}/images").json()["data"][0]
    assert first == {"id": first["id"], "name": "red.png", "sha256": sha["red.png"], "width": 32,
                     "height": 24, "size": len(red)}  # fmt: skip
    body = api.reader.get(f"/v1/datasets/{dataset}/images/{first['id']}/file")
    assert body.status_code == 200 and body.content == red and body.headers["content-type"] == "image/png"
    assert api.reader.get(f"/v1/datasets/{dataset}/images/999999/file").status_code == 404
    assert (
        api.reader.post(f"/v1/datasets/{dataset}/images", files=[("files", ("r.png", red))]).status_code
        == 403
    )


@sqlite_only
def test_archive_limits_zip_bombs_and_unsafe_members_are_refused(api: Api) -> None:
    dataset = api.create("limits")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.png", "w") as member:  # 8 MiB of zeros: about 8 KiB deflated
            for _ in range(8):
                member.write(bytes(2**20))
        archive.writestr("fine.png", png(12, 12))
        archive.writestr("/etc/abs.png", png(5, 5))
        archive.writestr("inner.zip", zip_of([("x.png", png(4, 4))]))
        archive.writestr("dir/", b"")
        archive.writestr("locked.png", png(6, 6))  # marked encrypted below
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "fine.png")
    report = api.upload(dataset, ("bombs.zip", mark_encrypted(bomb.getvalue(), "locked.png")))
    assert [a["name"] for a in report["accepted"]] == ["fine.png"]
    bad = reasons(report)
    assert set(bad) == {"bomb.png", "/etc/abs.png", "inner.zip", "locked.png", "link.png"}
    assert "compression ratio" in bad["bomb.png"] and "zip bomb" in bad["bomb.png"]
    assert "absolute path" in bad["/etc/abs.png"]
    assert "nested archive" in bad["inner.zip"]
    assert "encrypted" in bad["locked.png"]
    assert "symbolic link" in bad["link.png"]

    # a compressed tar that expands more than 100:1 is refused whole: nothing of it stored
    gz_bomb = tar_of([("t/ok.png", png(9, 9, (5, 6, 7))), ("t/zeros.png", bytes(8 * 2**20))])
    report = api.upload(dataset, ("bomb.tar.gz", gz_bomb), ("junk.tgz", b"not a tar at all"), status=422)
    assert report["accepted"] == []  # nothing accepted: a 422 naming each file, with the same report
    assert report["detail"].startswith("no file of this upload was accepted — bomb.tar.gz: compression")
    assert "junk.tgz: not a readable tar archive" in report["detail"]
    bad = reasons(report)
    assert "compression ratio above the limit of 100:1" in bad["bomb.tar.gz"]
    assert "nothing of this archive was stored" in bad["bomb.tar.gz"]
    assert "not a readable tar archive" in bad["junk.tgz"]
    # a plain tar (no compression) is read too, hard links and devices refused
    hard = tarfile.TarInfo("t/hard.png")
    hard.type = tarfile.LNKTYPE
    hard.linkname = "t/ok.png"
    device = tarfile.TarInfo("t/dev.png")
    device.type = tarfile.CHRTYPE
    report = api.upload(
        dataset, ("plain.tar", tar_of([("t/ok.png", png(9, 9, (5, 6, 7))), hard, device], "w"))
    )
    assert [a["name"] for a in report["accepted"]] == ["t/ok.png"]
    assert "hard link" in reasons(report)["t/hard.png"] and "device" in reasons(report)["t/dev.png"]
    assert set(api.rows(dataset)) == {"fine.png", "t/ok.png"}
    assert api.files(dataset) == {"images/fine.png", "images/t/ok.png"}


def test_annotations_are_matched_to_the_uploaded_images_and_give_statistics(api: Api) -> None:
    dataset = api.create("cars", kind="labeled")
    api.upload(
        dataset, ("a.png", png(32, 24)), ("b.jpg", jpeg(40, 30, orientation=6)), ("c.png", png(10, 10))
    )

    def put(coco: dict, status: int) -> dict:
        data = json.dumps(coco).encode()
        answer = api.writer.put(f"/v1/datasets/{dataset}/annotations", files={"file": ("coco.json", data)})
        assert answer.status_code == status, answer.text
        return answer.json()

    cats = [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.jpg", "width": 30, "height": 40}]
    boxes = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [2, 2, 5, 5]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [3, 3, 5, 5]},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 1},
    ]
    unknown = [*images, *({"id": 10 + i, "file_name": f"never-{i}.png"} for i in range(12))]
    detail = put({"images": unknown, "annotations": [], "categories": cats}, 422)["detail"]
    assert "12 file_name(s) are not images of dataset" in detail and "never-0.png" in detail
    assert "and 2 more" in detail and "a.png" not in detail
    rotated = [images[0], {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}]
    detail = put({"images": rotated, "annotations": [], "categories": cats}, 422)["detail"]
    assert "b.jpg (40x30, the image is 30x40)" in detail and "EXIF" in detail
    detail = put({"images": images, "annotations": []}, 422)["detail"]
    assert "categories" in detail and "labeled dataset" in detail
    dangling = [{"id": 1, "image_id": 7, "category_id": 1}]
    detail = put({"images": images, "annotations": dangling, "categories": cats}, 422)["detail"]
    assert detail.startswith("coco.json: annotations[0].image_id: no image with id 7")
    bad_json = api.writer.put(f"/v1/datasets/{dataset}/annotations", files={"file": ("coco.json", b"{nope")})
    assert bad_json.status_code == 422 and "coco.json: invalid JSON at line 1" in bad_json.json()["detail"]
    assert not (api.storage_root / f"datasets/{dataset}/annotations.json").exists()

    got = put({"images": images, "annotations": boxes, "categories": cats}, 200)
    assert got["annotations"] is True
    stats = got["stats"]
    assert stats["images"] == 3 and stats["annotation_images"] == 2 and stats["annotated_images"] == 1
    assert stats["instances"] == 3 and stats["crowd"] == 1 and stats["instances_per_image"] == 1.5
    assert stats["per_class"] == {"car": 2, "bus": 1}
    assert api.reader.get(f"/v1/datasets/{dataset}").json()["stats"] == stats
    stored = json.loads((api.storage_root / f"datasets/{dataset}/annotations.json").read_text())
    assert stored["images"][0] == {"id": 1, "file_name": "a.png", "width": 32, "height": 24}  # filled in

    # the job snapshot: a copy of the annotations, read by distill's COCO layer, images beside it
    storage = Storage(api.storage_root)
    with transaction(api.sessions) as session:
        json_key, images_key = snapshot_inputs(session, storage, dataset, "jobs/1/inputs/labeled.json")
    assert (json_key, images_key) == ("jobs/1/inputs/labeled.json", f"datasets/{dataset}/images")
    snapshot = load_coco(storage.local(json_key))
    assert snapshot.data == stored
    assert all((storage.local(images_key) / image["file_name"]).is_file() for image in snapshot.images)


@sqlite_only
def test_bad_requests_are_4xx_naming_the_problem(api: Api) -> None:
    for name in ("has space", "", "x" * 129, "../up", "ünï"):
        answer = api.writer.post("/v1/datasets", json={"name": name, "kind": "labeled"})
        assert answer.status_code == 422 and "name" in answer.text, name
    assert api.writer.post("/v1/datasets", json={"name": "a", "kind": "weird"}).status_code == 422
    extra = api.writer.post("/v1/datasets", json={"name": "a", "kind": "eval", "colour": "red"})
    assert extra.status_code == 422 and "colour" in extra.text
    api.create("taken", "eval")
    taken = api.writer.post("/v1/datasets", json={"name": "taken", "kind": "labeled"})
    assert taken.status_code == 409 and "'taken' exists" in taken.json()["detail"]
    assert api.reader.get("/v1/datasets/999").status_code == 404
    missing = api.writer.post("/v1/datasets/999/images", files=[("files", ("a.png", png(4, 4)))])
    assert missing.status_code == 404 and "dataset 999 does not exist" in missing.json()["detail"]
    assert (
        api.writer.put("/v1/datasets/999/annotations", files={"file": ("c.json", b"{}")}).status_code == 404
    )
    assert api.writer.post("/v1/datasets/1/images").status_code == 422  # no files part
    assert api.writer.delete("/v1/datasets/999").status_code == 404
    for method, path in [("POST", "/v1/datasets"), ("GET", "/v1/datasets"), ("GET", "/v1/datasets/1"),
                         ("DELETE", "/v1/datasets/1"), ("POST", "/v1/datasets/1/images"),
                         ("PUT", "/v1/datasets/1/annotations"), ("GET", "/v1/datasets/1/images"),
                         ("GET", "/v1/datasets/1/images/1/file")]:  # fmt: skip
        assert api.anonymous.request(method, path).status_code == 401, (method, path)
    paths = api.anonymous.get("/openapi.json").json()["paths"]
    ids = {op["operationId"] for ops in paths.values() for op in ops.values()}
    assert {"create_dataset", "list_datasets", "get_dataset", "delete_dataset", "upload_images",
            "put_annotations", "list_images", "get_image_file"} <= ids  # fmt: skip


def test_paging_delete_while_a_job_uses_it_and_the_unlabeled_snapshot(api: Api) -> None:
    ids = [api.create(f"set-{i}") for i in range(5)]
    page = api.reader.get("/v1/datasets", params={"offset": 1, "limit": 2}).json()
    assert page["count"] == 5 and [d["name"] for d in page["data"]] == ["set-1", "set-2"]
    dataset = ids[0]
    images = [(f"img-{i}.png", png(8 + i, 6, (i, i, i))) for i in range(5)]
    api.upload(dataset, ("pack.zip", zip_of(images[:3])), *images[3:])

    storage = Storage(api.storage_root)
    with transaction(api.sessions) as session:
        key, folder = snapshot_inputs(session, storage, dataset, "jobs/7/inputs/unlabeled.json")
        for missing, message in ((999, "dataset 999 does not exist"), (ids[1], "has no images")):
            with pytest.raises(InputError, match=message):
                snapshot_inputs(session, storage, missing, "jobs/7/x.json")
    coco = load_coco(storage.local(key))
    rows = api.rows(dataset)
    assert [i["file_name"] for i in coco.images] == [n for n, _ in images] and coco.annotations == []
    assert [i["id"] for i in coco.images] == [1, 2, 3, 4, 5]
    assert all((i["width"], i["height"]) == (rows[i["file_name"]].width, 6) for i in coco.images)
    assert all((storage.local(folder) / i["file_name"]).is_file() for i in coco.images)
    labeled = api.create("needs-annotations", kind="labeled")
    api.upload(labeled, images[0])
    with transaction(api.sessions) as session, pytest.raises(InputError, match="has no annotations yet"):
        snapshot_inputs(session, storage, labeled, "jobs/7/l.json")

    with transaction(api.sessions) as session:
        job = Job(
            type="pipeline", state="running", spec={"datasets": {"labeled": ids[2], "unlabeled": dataset}}
        )
        session.add(job)
        session.add(Job(type="pipeline", state="succeeded", spec={"datasets": {"unlabeled": ids[1]}}))
    refused = api.writer.delete(f"/v1/datasets/{dataset}")
    assert refused.status_code == 409 and f"active job(s) {job.id}" in refused.json()["detail"]
    assert len(api.rows(dataset)) == 5 and api.files(dataset)
    assert api.writer.delete(f"/v1/datasets/{ids[1]}").status_code == 204  # its job has ended
    with transaction(api.sessions) as session:
        session.get(Job, job.id).state = "cancelled"
    assert api.writer.delete(f"/v1/datasets/{dataset}").status_code == 204
    assert api.reader.get(f"/v1/datasets/{dataset}").status_code == 404
    assert api.rows(dataset) == {} and not (api.storage_root / f"datasets/{dataset}").exists()
    with transaction(api.sessions) as session:
        assert session.get(Dataset, dataset) is None
    assert api.reader.get("/v1/datasets").json()["count"] == 4


@sqlite_only
def test_ingestion_and_snapshots_on_a_remote_fsspec_store(db_url: str, tmp_path: Path) -> None:
    """The same functions over ``memory://`` (what S3 would be): staged locally, published by key."""
    from service import datasets

    storage = Storage("memory://distill-datasets-test", cache_dir=tmp_path / "cache")
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        dataset = datasets.create_dataset(session, storage, name="remote", kind="labeled").id
    parts = [
        ("a.png", io.BytesIO(png(12, 8))),
        ("pack.tar", io.BytesIO(tar_of([("s/b.png", png(7, 7))], "w"))),
    ]
    report = datasets.ingest(sessions, storage, dataset, parts)
    assert [a["name"] for a in report.accepted] == ["a.png", "s/b.png"] and report.rejected == []
    assert storage.fs.cat(storage.path(f"datasets/{dataset}/images/a.png")) == png(12, 8)
    assert not list((tmp_path / "cache" / "staging").iterdir())
    coco = {"images": [{"id": 1, "file_name": "s/b.png"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}  # fmt: skip
    source = io.BytesIO(json.dumps(coco).encode())
    assert datasets.put_annotations(sessions, storage, dataset, "c.json", source).stats["per_class"] == {
        "x": 1
    }
    with transaction(sessions) as session:
        key, folder = snapshot_inputs(session, storage, dataset, "jobs/3/labeled.json")
    assert load_coco(storage.local(key)).images[0] == {
        "id": 1,
        "file_name": "s/b.png",
        "width": 7,
        "height": 7,
    }
    assert (storage.local(folder, members=["s/b.png"]) / "s/b.png").read_bytes() == png(7, 7)
    datasets.delete_dataset(sessions, storage, dataset)
    assert not storage.exists(f"datasets/{dataset}")
    engine.dispose()


@sqlite_only
def test_archives_beyond_the_member_or_size_limits_are_refused_whole(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import datasets

    monkeypatch.setattr(datasets, "MAX_ARCHIVE_MEMBERS", 3)
    storage = Storage(tmp_path / "storage")
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        dataset = datasets.create_dataset(session, storage, name="limits", kind="unlabeled").id
    four = [(f"{i}.png", png(5 + i, 5)) for i in range(4)]
    report = datasets.ingest(
        sessions, storage, dataset,
        [("four.zip", io.BytesIO(zip_of(four))), ("four.tar", io.BytesIO(tar_of(four, "w"))),
         ("three.tgz", io.BytesIO(tar_of(four[:3])))],
    )  # fmt: skip
    assert reasons({"rejected": report.rejected}) == {
        "four.zip": "4 members, above the limit of 3; nothing of this archive was stored",
        "four.tar": "more than the limit of 3 members; nothing of this archive was stored",
    }
    assert [a["name"] for a in report.accepted] == ["0.png", "1.png", "2.png"]

    monkeypatch.setattr(datasets, "MAX_ARCHIVE_BYTES", 300)
    monkeypatch.setattr(datasets, "MAX_IMAGE_BYTES", 200)

    def padded(image: bytes, size: int) -> bytes:  # bytes after the PNG's end: still a valid PNG
        return image + bytes(size - len(image))

    big, small = padded(png(6, 6, (1, 1, 1)), 250), padded(png(6, 6, (2, 2, 2)), 180)
    pair = zip_of([("s1.png", small), ("s2.png", small[::-1])])
    report = datasets.ingest(
        sessions, storage, dataset, [("big.png", io.BytesIO(big)), ("sum.zip", io.BytesIO(pair))]
    )
    bad = reasons({"rejected": report.rejected})
    assert bad["big.png"] == "larger than the limit of 200 bytes" and report.accepted == []
    assert "above the limit of 300 bytes; nothing of this archive was stored" in bad["sum.zip"]
    assert {p.name for p in (tmp_path / f"storage/datasets/{dataset}/images").iterdir()} == {
        "0.png",
        "1.png",
        "2.png",
    }
    assert not list((tmp_path / f"storage/datasets/{dataset}/.staging").iterdir())
    engine.dispose()
