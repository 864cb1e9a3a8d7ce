"""Turning whatever the user has into RGB pixels: a path, pathlib.Path, PIL image, bytes, numpy array,
`data:` URI or `file://` URL; any format Pillow reads, EXIF orientation applied, alpha flattened, and
a very large image reduced as early as possible (see KEEP_SIDE)."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import threading
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from llava_gguf.errors import LlavaGgufError, LlavaGgufWarning, warn

ImageInput = Union[str, Path, bytes, Any]


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}  # not mif1/msf1: AVIF uses them too


def _heif_opener(what: str) -> None:
    """HEIC/HEIF (iPhone photos) through the optional `pillow-heif` (pip install 'llava-gguf[heic]')."""
    try:
        import pillow_heif  # optional (the 'heic' extra), and only for HEIC files
    except ImportError:
        raise LlavaGgufError(f"{what} is a HEIC/HEIF image, which needs the optional extra 'heic'",
                             "pip install 'llava-gguf[heic]' (pillow-heif), or convert it to JPEG") from None
    pillow_heif.register_heif_opener()


# The largest input a LLaVA vision tower takes is LLaVA-1.6's largest grid pinpoint (1008 pixels a side
# for 336-pixel tiles; LLaVA-1.5 pads to a square and resizes it to 336). An image is reduced by a whole
# factor (a box average), and only so far that its longer side keeps at least KEEP_SIDE pixels, twice
# that largest input: every photo below 4096 pixels a side (12-megapixel phones: 4032x3024) reaches the
# model untouched, and a 12000x12000 image costs 2400x2400 pixels downstream (hashing, libmtmd's copy,
# its resize) instead of 12000x12000.
KEEP_SIDE = 2048


_said: OrderedDict[str, None] = OrderedDict()  # warnings already given about an image (the latest 256)


def _warn_once(message: str, hint: str | None = None) -> None:
    """A warning about an image, once per process: the same file is often loaded twice (the CLI checks
    images before the model loads; a chat turn loads them again)."""
    key = f"{message} {hint}"
    if key in _said:
        return
    _said[key] = None
    if len(_said) > 256:
        _said.popitem(last=False)
    warn(message, hint, stacklevel=5)


def _reduction(size: tuple[int, int]) -> int:
    """The whole factor an image of `size` is reduced by (1: kept as it is)."""
    return max(1, max(size) // KEEP_SIDE)


_WARNINGS_LOCK = threading.Lock()  # catch_warnings swaps process-wide state: one image at a time (the server)


@contextlib.contextmanager
def _pillow_warnings(what: str) -> Iterator[None]:
    """Pillow's own warnings while reading an image (a decompression-bomb size, damaged EXIF data) become
    our one-line warnings naming the image, instead of Python's multi-line warning with a source line.
    warnings.catch_warnings is not thread-safe (it replaces the module's filters and restores them): images
    read in several threads at once take turns, or one thread's restore would drop another's recording."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        text = " ".join(str(w.message).split())
        if issubclass(w.category, LlavaGgufWarning):
            warnings.warn(w.message, stacklevel=4)  # ours (said inside the block): as they are
        elif issubclass(w.category, Image.DecompressionBombWarning) or text in seen:
            continue  # the size is said by _warn_large, with the numbers that matter here
        elif issubclass(w.category, UserWarning):  # Pillow's way of saying a file is damaged but readable
            seen.add(text)
            if "exif" in text.lower():
                _warn_once(f"{what} has damaged EXIF metadata ({text.rstrip('.')})",
                           "its orientation may not be applied")
            else:
                _warn_once(f"{what}: {text}")
        else:  # not about the file (a deprecation, ...): as it was, under the caller's filters
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn_large(img, what: str) -> None:
    """Pillow warns (DecompressionBombWarning) above Image.MAX_IMAGE_PIXELS and refuses above twice
    that; in between the image is decoded, at a cost worth saying."""
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        f = _reduction(img.size)
        _warn_once(f"{what} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels, above Pillow's "
                   f"{limit / 1e6:.0f}-megapixel decompression-bomb warning limit): it is decoded and reduced to "
                   f"{-(-w // f)}x{-(-h // f)}", "scale it down first to save memory and time")


def _draft(img) -> None:
    """JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the reduction's target size), so a
    huge photo is never held at full size."""
    f = _reduction(img.size)
    if f > 1 and getattr(img, "format", None) in ("JPEG", "MPO"):
        img.draft(img.mode, (img.size[0] // f, img.size[1] // f))


def _reduce(img):
    """`img` reduced by its whole factor (a box average), before any full-size copy is made."""
    f = _reduction(img.size)
    if f == 1:
        return img
    if img.mode == "1":  # modes Image.reduce does not take; "1" -> "L" keeps one byte a pixel
        img = img.convert("L")
    elif img.mode in ("P", "PA") or img.mode.startswith("I;16"):  # converted as load_image would anyway
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img.reduce(f)


_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(img, what: str) -> int:
    """The EXIF orientation (1: upright), read before the image is reduced (a reduced copy keeps no
    TIFF tags). Damaged EXIF data is a warning, not a failure: the pixels are still good."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception as e:  # noqa: BLE001 - Pillow's EXIF parser raises many types on damaged data
        _warn_once(f"{what} has damaged EXIF metadata ({type(e).__name__})", "its orientation is not applied")
        return 1


def _open_bytes(data: bytes, what: str):
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        _heif_opener(what)
    try:
        img = Image.open(io.BytesIO(data))
        _warn_large(img, what)
        _draft(img)
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
    """A PIL RGB image, upright (EXIF orientation applied) with any alpha flattened onto white; an image
    with a side of 2 * KEEP_SIDE pixels or more reduced by a whole factor (to at least KEEP_SIDE)."""
    what = ("the data: URI" if str(image).startswith("data:") else str(image)) if isinstance(image, (str, Path)) \
        else "the image bytes" if isinstance(image, (bytes, bytearray, memoryview)) else "the image"
    with _pillow_warnings(what[:200]):
        try:
            return _load_image(image, what[:200])
        except LlavaGgufError:
            raise
        except Image.DecompressionBombError as e:  # a frame or tile past the limit, found while decoding
            raise LlavaGgufError(f"{what[:200]} is too large to decode safely ({e})"[:300],
                                 "scale it down first (Pillow's decompression-bomb limit)") from None
        except MemoryError:
            raise LlavaGgufError(f"{what[:200]} is too large to decode in the memory available") from None
        except Exception as e:  # noqa: BLE001 - Pillow decodes lazily (seek, convert, reduce, transpose) and its
            # plugins raise any type on damaged data (IndexError, KeyError, TypeError, struct.error, ...)
            raise LlavaGgufError(f"{what[:200]} is a damaged image ({type(e).__name__}: {str(e)[:150]})") from None


def _load_image(image: ImageInput, what: str):
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
    orientation = _orientation(img, what)
    img = _reduce(img)
    if orientation in _TRANSPOSE:
        img = img.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.width < 1 or img.height < 1:
        raise LlavaGgufError("the image is empty")
    if img is not image:
        # the pixels are upright now: an image loaded again (the model loads what a session loaded) must
        # not be turned again, nor its damaged EXIF reported again
        for key in ("exif", "XML:com.adobe.xmp", "xmp"):
            img.info.pop(key, None)
    return img


def content_hash(img, data: bytes | None = None) -> str:
    """SHA-256 of a normalised image's size and RGB pixels: the identity of an image for every cache
    and transcript (`data`: img.tobytes(), when the caller has it already)."""
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes() if data is None else data)  # not prefix + data: that would copy the pixels once more
    return h.hexdigest()


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
