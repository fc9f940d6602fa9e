"""Image inputs: finding them (a folder, a list file or a COCO file) and decoding them safely to RGB.

Decoding never trusts the file: the pixel count is checked from the header before any pixel data is
decoded, truncated or corrupt data raises :class:`~distill.errors.ImageDecodeError` (Pillow's global
``LOAD_TRUNCATED_IMAGES`` is never touched), EXIF orientation is applied, and every mode ends up RGB.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from distill.errors import ImageDecodeError, InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageRef",
    "decode_images",
    "iter_image_refs",
    "load_image",
]

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own default decompression-bomb limit (about 0.25 GiB of RGBA)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""Extensions (lower case) picked up when the source is a directory."""

_PIL_LIMIT_LOCK = threading.Lock()
_WHITE = (255, 255, 255)


@contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let ``Image.open`` accept headers up to ``max_pixels`` for this call only.

    Pillow raises ``DecompressionBombError`` in ``open`` above ``2 * MAX_IMAGE_PIXELS`` and warns above
    ``MAX_IMAGE_PIXELS``. The warning is silenced here (our own check refuses what is too large); the
    global limit is raised temporarily, and restored, only when ``max_pixels`` exceeds it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        current = Image.MAX_IMAGE_PIXELS
        if current is None or max_pixels <= current:
            yield
            return
        with _PIL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = current


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey, scaled instead of Pillow's clipping at 255.

    ``I;16*`` images (and ``I`` images whose values exceed 255) are taken as 16-bit: value / 257.
    ``F`` images with values within [0, 1] are scaled by 255, otherwise clipped to [0, 255].
    """
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.size and array.max() > 255):
        array = array / 257.0
    elif image.mode == "F" and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        array = array * 255.0
    array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (new image only where needed); transparency goes onto white."""
    mode = image.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode in ("LA", "La", "RGBa", "RGBA") or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, apply_exif_orientation: bool = True
) -> Image.Image:
    """Decode an image file to an RGB ``PIL.Image``, raising :class:`ImageDecodeError` on any failure.

    The EXIF orientation is applied unless ``apply_exif_orientation`` is false (COCO annotations of an
    image with an orientation tag may refer to the stored, unrotated pixels). Grey, palette, CMYK, 16-bit
    and float images are converted to RGB; transparent pixels are composited onto white (not simply
    dropped, which would expose whatever colour the transparent pixels happen to store). Images with
    more than ``max_pixels`` pixels are refused from their header, before any pixel data is decoded.
    """
    name = str(path)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    file = Path(path)
    if not file.exists():
        raise ImageDecodeError(name, "file not found")
    if not file.is_file():
        raise ImageDecodeError(name, "not a regular file")
    try:
        with _pil_pixel_limit(max_pixels):
            opened = Image.open(file)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(name, f"image too large: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(name, "not a recognised image (corrupt file or unsupported format)") from error
    except OSError as error:
        raise ImageDecodeError(name, f"cannot read the image header: {error.strerror or error}") from error
    except Exception as error:  # Pillow plugins raise assorted errors on malformed headers
        raise ImageDecodeError(name, f"malformed image header: {error}") from error
    with opened as image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(name, f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                name,
                f"image too large: {width}x{height} = {width * height} pixels, above the limit {max_pixels}",
            )
        try:
            image.load()
        except Exception as error:  # truncated data (OSError), bad codestreams (ValueError, SyntaxError, ...)
            raise ImageDecodeError(name, f"cannot decode pixel data: {error}") from error
        try:
            # Both give a new image, detached from the file that the ``with`` block closes.
            oriented = ImageOps.exif_transpose(image) if apply_exif_orientation else image.copy()
        except Exception as error:
            raise ImageDecodeError(name, f"cannot apply the EXIF orientation: {error}") from error
        try:
            return _to_rgb(oriented)
        except Exception as error:
            raise ImageDecodeError(name, f"cannot convert mode {image.mode!r} to RGB: {error}") from error


def image_size(path: str | os.PathLike[str], *, apply_exif_orientation: bool = True) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (no pixel decoding), after EXIF rotation."""
    name = str(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1) if apply_exif_orientation else 1
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except Exception as error:  # Pillow raises assorted errors on malformed headers
        raise ImageDecodeError(name, f"cannot read the image header: {error}") from error
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@dataclass(frozen=True)
class ImageRef:
    """One input image: where it is and, when it comes from a COCO file, its id and declared size."""

    image_id: int | None
    path: str
    file_name: str
    width: int | None = None
    height: int | None = None


def _refs_from_directory(directory: Path) -> list[ImageRef]:
    files = sorted(
        entry
        for entry in directory.iterdir()
        if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".") and entry.is_file()
    )
    if not files:
        raise InputError(
            f"{directory}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files directly "
            "in this folder, not in subfolders)"
        )
    return [ImageRef(image_id=i + 1, path=str(f), file_name=f.name) for i, f in enumerate(files)]


def _refs_from_list(list_file: Path, images_dir: Path | None) -> list[ImageRef]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{list_file}: cannot read the image list: {error}") from error
    base = images_dir if images_dir is not None else list_file.parent
    refs: list[ImageRef] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        resolved = path if path.is_absolute() else base / path
        refs.append(ImageRef(image_id=len(refs) + 1, path=str(resolved), file_name=entry))
    if not refs:
        raise InputError(
            f"{list_file}: the image list names no images (blank lines and # comments are skipped)"
        )
    return refs


def _refs_from_coco(coco_file: Path, images_dir: Path | None) -> list[ImageRef]:
    from distill.data.coco import load_coco

    dataset = load_coco(coco_file)
    base = images_dir if images_dir is not None else coco_file.parent
    refs = [
        ImageRef(
            image_id=image["id"],
            path=str(base / image["file_name"]),
            file_name=image["file_name"],
            width=image["width"],
            height=image["height"],
        )
        for image in dataset.images
    ]
    if not refs:
        raise InputError(f"{coco_file}: the COCO file lists no images")
    return refs


def _looks_like_json(file: Path) -> bool:
    if file.suffix.lower() == ".json":
        return True
    try:
        with file.open("rb") as handle:
            head = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False
    return head.startswith(b"{")


def iter_image_refs(
    source: str | os.PathLike[str], *, images_dir: str | os.PathLike[str] | None = None
) -> list[ImageRef]:
    """List the images of ``source``.

    * a directory: its image files (extensions in :data:`IMAGE_EXTENSIONS`, any case; not recursive;
      dot-files skipped), sorted by name, with ``image_id`` = position + 1;
    * a COCO JSON file (``.json`` or content starting with ``{``): its ``images`` in file order, with their
      ids and sizes; ``file_name`` is resolved against ``images_dir`` if given, else the JSON's folder;
    * any other file: a list of paths, one per line (blank lines and ``#`` comments skipped); relative
      paths are resolved against ``images_dir`` if given, else the list file's folder; ``file_name`` is
      the entry as written and ``image_id`` its position + 1.

    Files are not opened here: missing or bad images are reported by :func:`decode_images`.
    """
    root = Path(source)
    base = Path(images_dir) if images_dir is not None else None
    if not root.exists():
        raise InputError(
            f"{root}: no such file or directory (expected an image folder, a list file or a COCO JSON)"
        )
    if root.is_dir():
        if base is not None:
            raise InputError(
                f"{root}: images_dir only applies to a list file or a COCO JSON source, not a folder"
            )
        return _refs_from_directory(root)
    if base is not None and not base.is_dir():
        raise InputError(f"{base}: images_dir is not a directory")
    if _looks_like_json(root):
        return _refs_from_coco(root, base)
    return _refs_from_list(root, base)


def decode_images(
    refs: Iterable[ImageRef], *, max_pixels: int = DEFAULT_MAX_PIXELS, apply_exif_orientation: bool = True
) -> Iterator[tuple[ImageRef, Image.Image | None, str | None]]:
    """Decode each ref in turn, yielding ``(ref, rgb_image, None)`` or ``(ref, None, reason)``.

    A bad file never stops the batch: its :class:`ImageDecodeError` reason is yielded instead.
    """
    for ref in refs:
        try:
            image = load_image(ref.path, max_pixels=max_pixels, apply_exif_orientation=apply_exif_orientation)
        except ImageDecodeError as error:
            yield ref, None, error.reason
        else:
            yield ref, image, None
