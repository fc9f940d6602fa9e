"""``/v1/models`` on a real uvicorn: a trained model uploaded as an archive, read back with its info,
downloaded and uploaded again as the next version; bad archives (a member leaving the archive, an extra
file, truncated or foreign weights, a pickle that would run code) refused with a 422 that names the
problem and nothing stored; the detectron2 route without detectron2; listing, paging and lineage. The
upload logic itself (limits, bombs, remote storage, a failed registration) is tested in-process."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from distill.errors import InputError
from distill.models.files import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from distill.storage import Storage
from service import auth, model_upload
from service.db import make_engine, session_factory, transaction, upgrade
from service.models import Model
from service.registry import register_model
from tests.service.conftest import free_port
from tests.service.test_workers import _stop

FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    """A class of this module: not a tensor, so weights_only refuses it."""


def _files(model_dir: Path) -> dict[str, bytes]:
    return {name: (model_dir / name).read_bytes() for name in FILES}


def _tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _in_folder(files: dict[str, bytes], folder: str = "tiny") -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in files.items()}


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Server:
    """A real uvicorn over a fresh SQLite database and storage folder (no broker needed for models)."""

    def __init__(self, root: Path) -> None:
        self.storage = root / "storage"
        self.storage.mkdir()
        self.database = f"sqlite:///{root / 'distill.db'}"
        upgrade(self.database)
        self.engine = make_engine(self.database)
        self.sessions = session_factory(self.engine)
        with transaction(self.sessions) as session:
            self.writer = auth.create_token(session, scope="write")
            self.reader = auth.create_token(session, scope="read")
        env = {
            **os.environ,
            "DISTILL_DATABASE_URL": self.database,
            "DISTILL_STORAGE_URL": str(self.storage),
            "DISTILL_REDIS_URL": "redis://127.0.0.1:9/0",  # never used: model routes enqueue nothing
            "OMP_NUM_THREADS": "2",
        }
        port = free_port()
        self.log_path = root / "api.log"
        self.log = self.log_path.open("w")
        command = [sys.executable, "-m", "uvicorn", "service.api.main:app", "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert self.proc.poll() is None, self.log_path.read_text()
                time.sleep(0.1)
        self.client = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.writer}"}, timeout=120
        )

    def upload(self, name: str, filename: str, data: bytes, **fields) -> httpx.Response:
        return self.client.post(
            "/v1/models", data={"name": name, **fields}, files={"archive": (filename, data)}
        )

    def model_rows(self) -> int:
        with self.sessions() as session:
            return session.query(Model).count()

    def stored(self) -> list[str]:
        """Every file under storage (the staging folder included)."""
        return sorted(str(p.relative_to(self.storage)) for p in self.storage.rglob("*") if p.is_file())

    def close(self) -> None:
        self.client.close()
        _stop(self.proc)
        self.log.close()
        self.engine.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("models_api"))
    try:
        yield server
    finally:
        server.close()


def test_an_uploaded_model_reads_back_downloads_and_uploads_again_as_version_2(
    server: Server, trained_tiny_model: Path, tiny_data: Path
) -> None:
    files = _files(trained_tiny_model)
    created = server.upload("tiny", "tiny.tar.gz", _tar_gz(_in_folder(files)))
    assert created.status_code == 201, created.text
    model = created.json()
    assert (model["name"], model["version"], model["backend"]) == ("tiny", 1, "torchvision")
    assert (model["source"], model["role"], model["job_id"], model["parent_id"]) == (
        "upload",
        "imported",
        None,
        None,
    )
    assert model["lineage"] == [] and model["key"].startswith("models/") and len(model["key"]) == 7 + 32
    categories = json.loads((tiny_data / "labeled.json").read_text())["categories"]
    info = model["info"]
    assert info["class_names"] == [c["name"] for c in categories]
    assert info["masks"] is True and info["test_size"] == 160 and info["backbone"] == "resnet18"
    assert info["keypoints"] == next(c["keypoints"] for c in categories if c.get("keypoints"))
    meta = json.loads(files[META_FILE])
    assert info["weights_sha256"] == meta["weights_sha256"] and info["iterations"] == 60
    assert info["uploaded"] == {"archive": "tiny.tar.gz"}

    # the directory is in storage, byte for byte; the staging folder is empty again
    folder = server.storage / model["key"]
    assert {name: (folder / name).read_bytes() for name in FILES} == files
    assert [p for p in server.stored() if p.startswith("models/.staging")] == []
    read = httpx.get(
        f"{server.base}/v1/models/{model['id']}", headers={"Authorization": f"Bearer {server.reader}"}
    )
    assert read.status_code == 200 and read.json() == model

    # the download is a .tar.gz of the loading files in one folder, which uploads again as version 2
    download = server.client.get(f"/v1/models/{model['id']}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    assert 'filename="tiny-v1.tar.gz"' in download.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == sorted(f"tiny-v1/{name}" for name in FILES)
        assert archive.extractfile(f"tiny-v1/{WEIGHTS_FILE}").read() == files[WEIGHTS_FILE]
    again = server.upload("tiny", "tiny-v1.tar.gz", download.content)
    assert again.status_code == 201, again.text
    second = again.json()
    assert (second["name"], second["version"]) == ("tiny", 2) and second["key"] != model["key"]
    assert second["info"]["weights_sha256"] == info["weights_sha256"]

    # a zip with the files at the top is a third version
    third = server.upload("tiny", "tiny.zip", _zip(files))
    assert third.status_code == 201 and third.json()["version"] == 3, third.text


def test_bad_uploads_are_refused_naming_the_problem_and_store_nothing(
    server: Server, trained_tiny_model: Path, tmp_path: Path
) -> None:
    files = _files(trained_tiny_model)
    weights = files[WEIGHTS_FILE]
    marker = tmp_path / "pwned"
    state = torch.load(trained_tiny_model / WEIGHTS_FILE, weights_only=True)
    altered = _torch_bytes({k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    wider = files[CONFIG_FILE].decode().replace("fpn_channels: 32", "fpn_channels: 48").encode()
    assert wider != files[CONFIG_FILE]
    rows, stored = server.model_rows(), server.stored()

    cases = [
        # (file name, archive bytes, what the 422 says)
        (
            "t.tar.gz",
            _tar_gz({**_in_folder(files), "../config.yaml": b"x"}),
            "archive member '../config.yaml': path with '..'",
        ),
        ("t.zip", _zip({**files, "/etc/passwd": b"x"}), "archive member '/etc/passwd': absolute path"),
        (
            "t.tar.gz",
            _tar_gz({**_in_folder(files), "tiny/notes.txt": b"hi"}),
            "archive member 'tiny/notes.txt': not a model file",
        ),
        (
            "t.tar.gz",
            _tar_gz(_in_folder(files), links={"tiny/detectron2.yaml": "/etc/passwd"}),
            "archive member 'tiny/detectron2.yaml': symbolic link",
        ),
        (
            "t.tar.gz",
            _tar_gz({**_in_folder(files), "other/meta.json": b"{}"}),
            "archive member 'other/meta.json': the other model files are in folder 'tiny'",
        ),
        ("t.zip", _zip({CONFIG_FILE: files[CONFIG_FILE], META_FILE: files[META_FILE]}), "no weights.pt"),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: weights[: len(weights) // 2]}),
            "weights.pt: cannot read weights",
        ),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: b"not a checkpoint\n" * 64}),
            "weights.pt: cannot read weights",
        ),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: _torch_bytes([1, 2, 3])}),
            "weights.pt: expected a state dict",
        ),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: _torch_bytes({**state, "x": Evil(marker)})}),
            "weights.pt: refused: its pickle names",
        ),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: pickle.dumps(Evil(marker), protocol=2)}),
            "weights.pt: refused",
        ),
        (
            "t.tar.gz",
            _tar_gz({**files, WEIGHTS_FILE: _torch_bytes({"x": Custom()})}),
            "tests.service.test_models.Custom",
        ),
        ("t.tar.gz", _tar_gz({**files, WEIGHTS_FILE: altered}), "differs from meta.json's weights_sha256"),
        ("t.tar.gz", _tar_gz({**files, CONFIG_FILE: wider}), "weights.pt: weights do not match the config"),
        ("t.tar.gz", _tar_gz({**files, CONFIG_FILE: b"backbone: [unclosed"}), "config.yaml: not valid YAML"),
        ("t.tar.gz", _tar_gz({**files, META_FILE: b"[1, 2]"}), "meta.json: expected a JSON object"),
        ("t.tar.gz", b"\x1f\x8b" + os.urandom(256), "not a readable tar archive"),
        ("t.rar", b"Rar!", "archive: 't.rar' is not a .zip, .tar, .tar.gz, .tgz archive"),
    ]
    for filename, data, expected in cases:
        answer = server.upload("bad", filename, data)
        assert answer.status_code == 422, (expected, answer.text)
        assert expected in answer.json()["detail"], (expected, answer.json()["detail"])
    assert not marker.exists()  # the pickles' command never ran

    def detail(answer: httpx.Response) -> str:
        assert answer.status_code == 422, answer.text
        return json.dumps(answer.json()["detail"])

    # fields: the name's pattern, unknown fields, archive with detectron2 parts, neither
    assert "name" in detail(server.upload("no spaces", "t.zip", _zip(files)))
    assert "wieghts" in detail(server.upload("x", "t.zip", _zip(files), wieghts="1"))
    both = server.client.post(
        "/v1/models",
        data={"name": "x"},
        files={"archive": ("t.zip", _zip(files)), "weights": ("w.pth", b"1")},
    )
    assert "weights: give either archive" in detail(both)
    assert "archive: give an archive" in detail(server.client.post("/v1/models", data={"name": "x"}))
    half = server.client.post("/v1/models", data={"name": "x"}, files={"config": ("c.yaml", b"MODEL: {}")})
    assert "weights: give an archive" in detail(half)

    assert server.model_rows() == rows and server.stored() == stored  # nothing in the database or storage
    assert server.client.get("/v1/models", params={"name": "bad"}).json() == {"data": [], "count": 0}


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_a_detectron2_upload_without_detectron2_is_a_clean_422(server: Server, tmp_path: Path) -> None:
    rows, stored = server.model_rows(), server.stored()
    answer = server.client.post(
        "/v1/models",
        data={"name": "d2"},
        files={
            "config": ("mask_rcnn.yaml", b"MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n"),
            "weights": ("model_final.pth", _torch_bytes({"w": torch.zeros(1)})),
            "categories": ("labeled.json", b'{"categories": [{"id": 1, "name": "a"}]}'),
        },
    )
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("detectron2 is not installed on this server")
    wrong = server.client.post(
        "/v1/models", data={"name": "d2"}, files={"config": ("c.txt", b"x"), "weights": ("w.pth", b"x")}
    )
    assert wrong.status_code == 422 and wrong.json()["detail"].startswith(
        "config: 'c.txt' is not a detectron2 config"
    )
    assert server.model_rows() == rows and server.stored() == stored


def test_listing_filters_and_pages_and_a_model_shows_its_lineage(server: Server) -> None:
    with transaction(server.sessions) as session:
        root = register_model(
            session,
            name="chain",
            key="jobs/1/round_1/teacher",
            backend="torchvision",
            source="job",
            role="teacher",
        )
        child = register_model(
            session,
            name="chain",
            key="jobs/1/round_1/student",
            backend="torchvision",
            source="job",
            role="student",
            parent_id=root.id,
            datasets={"labeled": 3},
        )
        grandchild = register_model(
            session,
            name="chain",
            key="jobs/1/round_2/student",
            backend="torchvision",
            source="job",
            role="student",
            parent_id=child.id,
        )
        other = register_model(
            session, name="other", key="jobs/2/model", backend="torchvision", source="job", role="trained"
        )
        ids = root.id, child.id, grandchild.id, other.id
    as_reader = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {server.reader}"})
    anonymous = httpx.Client(base_url=server.base)
    try:
        model = as_reader.get(f"/v1/models/{ids[2]}").json()
        assert (model["name"], model["version"], model["role"], model["parent_id"]) == (
            "chain",
            3,
            "student",
            ids[1],
        )
        assert model["lineage"] == [
            {"id": ids[1], "name": "chain", "version": 2, "role": "student"},
            {"id": ids[0], "name": "chain", "version": 1, "role": "teacher"},
        ]
        assert as_reader.get(f"/v1/models/{ids[1]}").json()["datasets"] == {"labeled": 3}
        assert as_reader.get(f"/v1/models/{ids[0]}").json()["lineage"] == []

        listed = as_reader.get("/v1/models", params={"name": "chain"}).json()
        assert listed["count"] == 3 and [m["id"] for m in listed["data"]] == [ids[2], ids[1], ids[0]]
        assert listed["data"][0]["lineage"][0]["id"] == ids[1]
        page = as_reader.get("/v1/models", params={"name": "chain", "offset": 1, "limit": 1}).json()
        assert page["count"] == 3 and [m["id"] for m in page["data"]] == [ids[1]]
        everything = as_reader.get("/v1/models").json()
        assert everything["count"] >= 4 and everything["data"][0]["id"] == ids[3]
        assert as_reader.get("/v1/models", params={"limit": 0}).status_code == 422

        assert as_reader.get("/v1/models/999999").status_code == 404
        missing = as_reader.get(f"/v1/models/{ids[3]}/download")  # a row whose files are not in storage
        assert missing.status_code == 404 and "not in storage" in missing.json()["detail"]
        refused = as_reader.post("/v1/models", data={"name": "x"}, files={"archive": ("t.zip", b"x")})
        assert refused.status_code == 403
        for method, url in (
            ("GET", "/v1/models"),
            ("GET", f"/v1/models/{ids[0]}"),
            ("GET", f"/v1/models/{ids[0]}/download"),
            ("POST", "/v1/models"),
        ):
            assert anonymous.request(method, url).status_code == 401, url
    finally:
        as_reader.close()
        anonymous.close()


# ---- the upload logic in-process ----------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def test_limits_and_bombs_are_refused_naming_the_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_upload, "MAX_TEXT_BYTES", 1000)
    folders = iter(range(100))

    def unpack(filename: str, data: bytes) -> dict[str, str]:
        folder = tmp_path / f"out{next(folders)}"  # a fresh staging folder, as every upload gets
        folder.mkdir()
        return model_upload.unpack_archive(filename, io.BytesIO(data), folder)

    big = _tar_gz({"m/config.yaml": b"x" * 1001})
    with pytest.raises(InputError, match=r"member 'm/config.yaml': larger than the limit of 1000 bytes"):
        unpack("m.tar.gz", big)
    with pytest.raises(InputError, match=r"'config.yaml': larger than the limit"):
        unpack("m.zip", _zip({"config.yaml": b"x" * 1001}))
    bomb = bytes(8 * 2**20)
    with pytest.raises(InputError, match=r"archive member 'weights.pt': compression ratio \d+:1"):
        unpack("m.zip", _zip({"weights.pt": bomb}))
    with pytest.raises(InputError, match=r"compression ratio above the limit"):
        unpack("m.tgz", _tar_gz({"weights.pt": bomb}))
    with pytest.raises(InputError, match=r"'m/a/config.yaml': nested folders"):
        unpack("m.tar", _tar_gz({"m/a/config.yaml": b"x"}))
    with pytest.raises(InputError, match=r"a second weights.pt"):
        unpack("m.zip", _zip({"weights.pt": b"1", "./weights.pt": b"2"}))
    with pytest.raises(InputError, match=r"archive 'm.zip': no config.yaml, meta.json"):
        unpack("m.zip", _zip({"weights.pt": b"1"}))
    assert set(unpack("m.tar", _tar_gz({"m/": b"", **_in_folder(dict.fromkeys(FILES, b"1"), "m")}))) == set(
        FILES
    )


def test_detectron2_weights_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_final.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": Evil(marker)}}, protocol=2))
    with pytest.raises(InputError, match=r"weights: refused: .*posix.system"):
        model_upload.check_detectron2_weights(evil, "weights")
    evil_pth = tmp_path / "model_final.pth"
    evil_pth.write_bytes(_torch_bytes({"model": {"w": Evil(marker)}}))
    with pytest.raises(InputError, match=r"weights: refused"):
        model_upload.check_detectron2_weights(evil_pth, "weights")
    assert not marker.exists()
    fine = tmp_path / "fine.pkl"  # a Detectron / detectron2 model-zoo .pkl: numpy arrays in dicts
    fine.write_bytes(
        pickle.dumps({"model": {"w": np.zeros((2, 3), np.float32)}, "__author__": "zoo"}, protocol=2)
    )
    model_upload.check_detectron2_weights(fine, "weights")
    checkpoint = tmp_path / "fine.pth"
    checkpoint.write_bytes(_torch_bytes({"model": {"w": torch.zeros(2)}, "iteration": 10}))
    model_upload.check_detectron2_weights(checkpoint, "weights")


def test_a_remote_storage_upload_and_a_failed_registration(
    sessions, trained_tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = Storage(f"memory://distill-models-{os.getpid()}", cache_dir=tmp_path / "cache")
    archive = _tar_gz(_in_folder(_files(trained_tiny_model)))
    model = model_upload.upload_archive(
        sessions, remote, name="m", filename="m.tgz", source=io.BytesIO(archive)
    )
    assert model.version == 1 and remote.exists(f"{model.key}/{META_FILE}")
    assert (
        remote.fs.cat(remote.path(f"{model.key}/{WEIGHTS_FILE}"))
        == (trained_tiny_model / WEIGHTS_FILE).read_bytes()
    )
    assert not list((tmp_path / "cache" / "models" / ".staging").iterdir())
    out = model_upload.write_model_archive(remote, model)
    try:
        with tarfile.open(out) as tar:
            assert sorted(tar.getnames()) == sorted(f"m-v1/{name}" for name in FILES)
    finally:
        out.unlink()

    local = Storage(tmp_path / "storage")

    def fail(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(model_upload, "register_model", fail)
    with pytest.raises(RuntimeError, match="database down"):
        model_upload.upload_archive(sessions, local, name="m", filename="m.tgz", source=io.BytesIO(archive))
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []  # unpublished again
    with sessions() as session:
        assert session.query(Model).count() == 1
