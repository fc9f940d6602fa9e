"""Image discovery and safe decoding."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from distill.data.images import ImageRef, decode_images, iter_image_refs, load_image
from distill.errors import CocoFormatError, ImageDecodeError, InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real test data not present at {SHARED_DATA} (a clone without shared/)"
)


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` (1-bit grey) whose pixel data is a few bytes only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8))


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any pixel decoding fail loudly; returns the list of decode attempts."""
    calls: list[str] = []

    def forbidden_load(self: ImageFile.ImageFile) -> None:
        calls.append(str(self.size))
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)
    return calls


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------ failures


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found") as caught:
        load_image(tmp_path / "nope.jpg")
    assert caught.value.path == str(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(tmp_path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    _noise(96, 64).save(path, quality=90)
    data = path.read_bytes()
    assert load_image(path).size == (96, 64)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode pixel data") as caught:
        load_image(path)
    assert "truncated" in caught.value.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    _noise(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError):
        load_image(path)


def test_too_many_pixels_refused_before_decoding(tmp_path: Path, no_pixel_decoding: list[str]) -> None:
    path = tmp_path / "big.png"
    Image.new("1", (5000, 5000)).save(path)  # 25 Mpx, a few kB on disk
    with pytest.raises(ImageDecodeError, match=r"image too large: 5000x5000 = 25000000 pixels"):
        load_image(path, max_pixels=1_000_000)
    assert no_pixel_decoding == []


def test_fake_header_refused_before_decoding(tmp_path: Path, no_pixel_decoding: list[str]) -> None:
    path = tmp_path / "liar.png"
    path.write_bytes(_png_header(9000, 9000))  # 81 Mpx claimed, 8 bytes of data
    with pytest.raises(ImageDecodeError, match="image too large: 9000x9000"):
        load_image(path, max_pixels=1_000_000)
    assert no_pixel_decoding == []


def test_decompression_bomb_header_with_default_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(200_000, 200_000))  # far above twice Pillow's own limit
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="image too large"):
        load_image(path)
    assert before == Image.MAX_IMAGE_PIXELS


def test_larger_limit_applies_to_this_call_only(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(_png_header(20_000, 20_000))  # 400 Mpx: over Pillow's 2 x 89 Mpx error threshold
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="image too large"):
        load_image(path)
    # with a larger limit the header passes, and decoding then fails on the missing data
    with pytest.raises(ImageDecodeError, match="cannot decode pixel data"):
        load_image(path, max_pixels=10**9)
    assert before == Image.MAX_IMAGE_PIXELS


# ------------------------------------------------------------------------------------------------ orientation


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 tall
    array[:, :20] = (255, 0, 0)  # left half red
    array[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array, "RGB").save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[0x0112] == 6

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 40)  # transposed
    pixels = np.asarray(image).astype(int)
    top, bottom = pixels[5, 10], pixels[35, 10]  # clockwise: the stored left edge becomes the top
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom

    unrotated = load_image(path, apply_exif_orientation=False)
    assert unrotated.size == (40, 20)


# ------------------------------------------------------------------------------------------------ modes


def _grey(path: Path) -> None:
    Image.new("L", (8, 6), 128).save(path)


def _bilevel(path: Path) -> None:
    Image.new("1", (8, 6), 1).save(path)


def _rgba_transparent(path: Path) -> None:
    Image.new("RGBA", (8, 6), (0, 0, 0, 0)).save(path)  # transparent black -> white


def _rgba_half(path: Path) -> None:
    Image.new("RGBA", (8, 6), (255, 0, 0, 128)).save(path)  # half red over white


def _grey_alpha(path: Path) -> None:
    Image.new("LA", (8, 6), (0, 255)).save(path)


def _palette(path: Path) -> None:
    image = Image.new("P", (8, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.save(path)


def _palette_transparent(path: Path) -> None:
    image = Image.new("P", (8, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.save(path, transparency=1)


def _cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)


def _cmyk_tiff(path: Path) -> None:
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path)


def _sixteen_bit(path: Path) -> None:
    Image.new("I;16", (8, 6), 32896).save(path)  # 32896 / 257 = 128


def _webp(path: Path) -> None:
    Image.new("RGB", (8, 6), (0, 128, 255)).save(path, lossless=True)


MODES: list[tuple[str, Callable[[Path], None], str, tuple[int, int, int], int]] = [
    ("grey", _grey, "png", (128, 128, 128), 0),
    ("1-bit", _bilevel, "png", (255, 255, 255), 0),
    ("rgba-transparent", _rgba_transparent, "png", (255, 255, 255), 0),
    ("rgba-half", _rgba_half, "png", (255, 127, 127), 1),
    ("grey-alpha", _grey_alpha, "png", (0, 0, 0), 0),
    ("palette", _palette, "png", (10, 200, 30), 0),
    ("palette-transparent", _palette_transparent, "png", (255, 255, 255), 0),
    ("cmyk-jpeg", _cmyk_jpeg, "jpg", (255, 0, 0), 8),
    ("cmyk-tiff", _cmyk_tiff, "tif", (255, 0, 0), 0),
    ("16-bit", _sixteen_bit, "png", (128, 128, 128), 0),
    ("webp", _webp, "webp", (0, 128, 255), 0),
]


@pytest.mark.parametrize(
    ("make", "ext", "expected", "tolerance"), [m[1:] for m in MODES], ids=[m[0] for m in MODES]
)
def test_modes_become_rgb(
    tmp_path: Path, make: Callable[[Path], None], ext: str, expected: tuple[int, int, int], tolerance: int
) -> None:
    path = tmp_path / f"image.{ext}"
    make(path)
    image = load_image(path)
    assert image.mode == "RGB"
    pixel = np.asarray(image)[3, 4].astype(int)
    assert np.abs(pixel - np.array(expected)).max() <= tolerance, (pixel, expected)


@needs_shared
def test_real_photos_decode_at_their_coco_size() -> None:
    annotations = json.loads(
        (SHARED_DATA / "tiny_coco" / "annotations" / "instances_val2017.json").read_text()
    )
    images = sorted(annotations["images"], key=lambda image: image["id"])[:5]
    for entry in images:
        image = load_image(SHARED_DATA / "tiny_coco" / "val2017" / entry["file_name"])
        assert image.mode == "RGB"
        assert image.size == (entry["width"], entry["height"])
        assert np.asarray(image).std() > 5  # a photograph, not a blank


# ------------------------------------------------------------------------------------------------ refs


def _write_images(directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()]
        Image.new("RGB", (4 + i, 3), (i * 20, 0, 0)).save(directory / name, format=fmt)


def test_refs_from_directory(tmp_path: Path) -> None:
    _write_images(tmp_path, ["b.PNG", "a.jpg", "c.JPEG", "d.bmp"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"junk")
    _write_images(tmp_path / "nested", ["e.jpg"])
    refs = iter_image_refs(tmp_path)
    assert [r.file_name for r in refs] == ["a.jpg", "b.PNG", "c.JPEG", "d.bmp"]
    assert [r.image_id for r in refs] == [1, 2, 3, 4]
    assert refs[0] == ImageRef(image_id=1, path=str(tmp_path / "a.jpg"), file_name="a.jpg")
    assert refs[0].width is None and refs[0].height is None


def test_refs_from_list_file(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", ["x.png", "y.png"])
    absolute = tmp_path / "imgs" / "y.png"
    list_file = tmp_path / "lists" / "inputs.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"# my inputs\n\n../imgs/x.png\n   \n{absolute}\n# end\n")
    refs = iter_image_refs(list_file)
    assert [(r.image_id, r.file_name) for r in refs] == [(1, "../imgs/x.png"), (2, str(absolute))]
    assert Path(refs[0].path).resolve() == (tmp_path / "imgs" / "x.png").resolve()
    assert refs[1].path == str(absolute)
    assert [err for _, _, err in decode_images(refs)] == [None, None]

    with_dir = iter_image_refs(list_file, images_dir=tmp_path / "imgs")
    assert Path(with_dir[0].path) == tmp_path / "imgs" / "../imgs/x.png"


def test_refs_from_coco_json(tmp_path: Path) -> None:
    _write_images(tmp_path / "pictures", ["p1.jpg", "p2.jpg"])
    coco = {
        "images": [
            {"id": 10, "file_name": "p2.jpg", "width": 5, "height": 3},
            {"id": 4, "file_name": "p1.jpg", "width": 4, "height": 3},
        ]
    }
    json_path = tmp_path / "ann" / "unlabeled.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps(coco))
    refs = iter_image_refs(json_path, images_dir=tmp_path / "pictures")
    assert refs == [
        ImageRef(10, str(tmp_path / "pictures" / "p2.jpg"), "p2.jpg", 5, 3),
        ImageRef(4, str(tmp_path / "pictures" / "p1.jpg"), "p1.jpg", 4, 3),
    ]
    decoded = [(ref.image_id, image.size if image else None) for ref, image, _ in decode_images(refs)]
    assert decoded == [(10, (5, 3)), (4, (4, 3))]

    # without images_dir, file names resolve against the JSON's folder
    default = iter_image_refs(json_path)
    assert default[0].path == str(tmp_path / "ann" / "p2.jpg")

    json_path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 3}]}))
    with pytest.raises(CocoFormatError, match=r"images\[0\]\.width"):
        iter_image_refs(json_path)


def test_refs_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory"):
        iter_image_refs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        iter_image_refs(tmp_path / "empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no images"):
        iter_image_refs(blank)
    _write_images(tmp_path / "d", ["a.png"])
    with pytest.raises(InputError, match="images_dir"):
        iter_image_refs(tmp_path / "d", images_dir=tmp_path)


def test_decode_images_continues_past_bad_files(tmp_path: Path) -> None:
    _write_images(tmp_path, ["1.png", "3.png"])
    (tmp_path / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    big = tmp_path / "4.png"
    big.write_bytes(_png_header(3000, 3000))
    refs = iter_image_refs(tmp_path)
    refs.append(ImageRef(image_id=99, path=str(tmp_path / "gone.png"), file_name="gone.png"))

    outcomes = list(decode_images(refs, max_pixels=1_000_000))
    assert [ref.file_name for ref, _, _ in outcomes] == ["1.png", "2.jpg", "3.png", "4.png", "gone.png"]
    good = {ref.file_name: image for ref, image, error in outcomes if error is None}
    assert sorted(good) == ["1.png", "3.png"]
    assert all(image is not None and image.mode == "RGB" for image in good.values())
    errors = {ref.file_name: error for ref, image, error in outcomes if image is None}
    assert errors["2.jpg"].startswith("cannot read the image header")
    assert "too large" in errors["4.png"]
    assert errors["gone.png"] == "file not found"
