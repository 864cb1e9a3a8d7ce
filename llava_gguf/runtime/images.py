"""Turning whatever the user has into RGB pixels: a path, pathlib.Path, PIL image, bytes, numpy array,
`data:` URI or `file://` URL; any format Pillow reads, EXIF orientation applied, alpha flattened."""
from __future__ import annotations

import base64
import hashlib
import io
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Union

from ..errors import LlavaGgufError

ImageInput = Union[str, Path, bytes, Any]


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}  # not mif1/msf1: AVIF uses them too


def _heif_opener(what: str) -> None:
    """HEIC/HEIF (iPhone photos) through the optional `pillow-heif` (pip install 'llava-gguf[heic]')."""
    try:
        import pillow_heif
    except ImportError:
        raise LlavaGgufError(f"{what} is a HEIC/HEIF image, which needs the optional extra 'heic'",
                             "pip install 'llava-gguf[heic]' (pillow-heif), or convert it to JPEG") from None
    pillow_heif.register_heif_opener()


def _open_bytes(data: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        _heif_opener(what)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise LlavaGgufError(f"{what} is not an image Pillow can read",
                             "use JPEG, PNG, WebP, GIF, BMP or TIFF") from None
    except Image.DecompressionBombError as e:
        raise LlavaGgufError(f"{what} is too large to decode safely ({e})"[:300],
                             "scale it down first (Pillow's decompression-bomb limit)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise LlavaGgufError(f"{what} is a damaged image ({e})") from None
    return img


def load_image(image: ImageInput):
    """A PIL RGB image, upright (EXIF orientation applied) with any alpha flattened onto white."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = _open_bytes(bytes(image), "the image bytes")
    elif isinstance(image, (str, Path)):
        s = str(image)
        if s.startswith("data:"):
            header, _, payload = s.partition(",")
            try:
                data = base64.b64decode(payload) if header.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
            except ValueError:
                raise LlavaGgufError("the data: URI is not valid base64") from None
            img = _open_bytes(data, "the data: URI")
        else:
            if s.startswith("file://"):
                s = urllib.request.url2pathname(urllib.parse.urlparse(s).path)
            elif "://" in s:
                raise LlavaGgufError(f"cannot open {s}", "give a local path, a file:// URL or a data: URI")
            path = Path(s).expanduser()
            if not path.is_file():
                raise LlavaGgufError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise LlavaGgufError(f"cannot read image {path}: {e.strerror}") from None
            img = _open_bytes(data, f"{path}")
    elif hasattr(image, "__array_interface__"):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        else:
            raise LlavaGgufError(f"an image array must be HxW, HxWx3 or HxWx4, not {arr.shape}")
    else:
        raise LlavaGgufError(f"cannot use a {type(image).__name__} as an image",
                             "give a path, bytes, a PIL image, a numpy array or a data: URI")
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.width < 1 or img.height < 1:
        raise LlavaGgufError("the image is empty")
    return img


def content_hash(img, data: bytes | None = None) -> str:
    """SHA-256 of a normalised image's size and RGB pixels: the identity of an image for every cache
    and transcript (`data`: img.tobytes(), when the caller has it already)."""
    return hashlib.sha256(f"{img.width}x{img.height}:".encode() + (img.tobytes() if data is None else data)).hexdigest()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(directory: Path | str, option: str = "--images") -> list[Path]:
    """The image files of a directory given as `option`, sorted; a one-line error when there are none."""
    d = Path(directory)
    if not d.is_dir():
        raise LlavaGgufError(f"{option} {d} is not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LlavaGgufError(f"no images in {d}", f"it should hold {', '.join(IMAGE_SUFFIXES)} files")
    return files
