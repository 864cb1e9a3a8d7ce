"""Fuzz image loading: an input is image bytes given to load_image (as bytes, and as a base64 data: URI), or,
when it starts with `data:`, a data: URI as given. Seeds: small PNG/JPEG/GIF/WebP/TIFF/BMP files written by
Pillow with alpha, palettes, animation, EXIF orientation, 16-bit and CMYK. Raw Pillow warnings are findings
too (issue 23 item 12: the user gets our one-line warnings).

    bin/fuzz image --minutes 5                # or: .venv/bin/python -m fuzz.fuzz_image FILE (reproduce)"""
from __future__ import annotations

import base64
import random

import atheris

from fuzz.harness import main, mixed_mutator
from fuzz.mutate import apply, image_slots, random_steps

with atheris.instrument_imports(include=["llava_gguf", "PIL"]):
    import PIL.BmpImagePlugin  # noqa: F401  (Pillow registers its plugins lazily: import the ones seeded)
    import PIL.GifImagePlugin  # noqa: F401
    import PIL.JpegImagePlugin  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import PIL.TiffImagePlugin  # noqa: F401
    import PIL.WebPImagePlugin  # noqa: F401
    from llava_gguf.errors import LlavaGgufError
    from llava_gguf.runtime.images import load_image


def target(data: bytes) -> None:
    if data.startswith(b"data:"):
        load_image(data.decode("utf-8", "replace"))
        return
    try:
        load_image(data)
    finally:  # the same bytes through the data: URI route
        try:
            load_image("data:image/png;base64," + base64.b64encode(data).decode())
        except LlavaGgufError:
            pass


def structured(data: bytes, rng: random.Random) -> bytes:
    return apply(data, random_steps(rng), *image_slots(data))


if __name__ == "__main__":
    main("image", target, mixed_mutator(structured, share=0.5))
