"""Seed corpora from real files: tiny checkpoints saved by transformers, their conversions by our converter,
safetensors files written by the safetensors library and images written by Pillow.

    python -m fuzz.seeds OUTDIR     # OUTDIR/seeds/<target>/ and OUTDIR/base/ (files the harnesses read)

bin/fuzz runs this once into out/fuzz/ (gitignored). The image and safetensors builders are also what the
property tests mutate; they need neither torch nor a model."""
from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

TARGETS = ("safetensors", "config", "gguf", "gguf-native", "image")


# ---------------------------------------------------------------------------------------------- images
def sample_images() -> dict[str, bytes]:
    """Small real images in every format load_image is meant to read, with the features that take their
    own code paths: alpha, palettes with transparency, animation, EXIF orientation, 16-bit, CMYK."""
    from PIL import Image

    base = Image.new("RGB", (20, 14))
    base.putdata([((x * 13) % 256, (y * 17) % 256, ((x + y) * 7) % 256) for y in range(14) for x in range(20)])
    out: dict[str, bytes] = {}

    def save(name: str, img, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("rgb.png", base, "PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba, "PNG")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save("palette-transparent.png", pal, "PNG", transparency=0)
    save("gray16.png", base.convert("I;16"), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    save("exif.jpg", base, "JPEG", exif=exif.tobytes(), quality=80)
    save("progressive.jpg", base, "JPEG", progressive=True)
    save("cmyk.jpg", base.convert("CMYK"), "JPEG")
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    save("transparent.gif", pal, "GIF", transparency=0)
    save("lossy.webp", base, "WEBP", quality=50)
    save("lossless-alpha.webp", rgba, "WEBP", lossless=True)
    save("raw.tiff", base, "TIFF")
    save("lzw.tiff", base, "TIFF", compression="tiff_lzw")
    save("rgb.bmp", base, "BMP")
    save("gray.bmp", base.convert("L"), "BMP")
    return out


# ----------------------------------------------------------------------------------------- safetensors
def sample_safetensors() -> dict[str, bytes]:
    """Small safetensors files written by the safetensors library: each dtype the reader knows, scalars,
    empty tensors, metadata."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return {
        "floats.safetensors": save({"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
                                    "a.bias": rng.standard_normal(3).astype(np.float16),
                                    "b.weight": rng.standard_normal((2, 2, 2)).astype(np.float64)}),
        "ints.safetensors": save({"ids": np.arange(6, dtype=np.int64).reshape(2, 3), "mask": np.ones(3, dtype=bool),
                                  "small": np.arange(4, dtype=np.int8), "u": np.arange(3, dtype=np.uint8),
                                  "h": np.arange(2, dtype=np.int16), "i": np.arange(2, dtype=np.int32)}),
        "scalar-empty.safetensors": save({"s": np.array(1.5, dtype=np.float32), "e": np.zeros((0, 4), np.float32)},
                                         metadata={"format": "pt"}),
    }


def bf16_safetensors() -> bytes:
    """A BF16 tensor (numpy has no bfloat16: the header is written by hand, as safetensors lays it out)."""
    import struct

    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                         "__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes([0, 0x3F, 0, 0x40, 0x80, 0x3F, 0, 0xC0])


def header_only(path: Path, keep: int = 0) -> bytes:
    """A real safetensors file's header (and `keep` bytes of its data): every tensor then lies past the end."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data[:8 + n + keep]


# ------------------------------------------------------------------------------------------ everything
def build(outdir: Path) -> None:
    """Seeds for every target, and the real base files the harnesses need, into `outdir`."""
    from dataclasses import replace

    from llava_gguf.convert import convert_checkpoint
    from devkit.tiny import TinySpec, make_tiny_liuhaotian, make_tiny_llava

    outdir = Path(outdir)
    seeds = {t: outdir / "seeds" / t for t in TARGETS}
    for d in seeds.values():
        d.mkdir(parents=True, exist_ok=True)
    work = outdir / "work"
    specs = {"llava15": TinySpec(), "mistral": replace(TinySpec(), text_model="mistral"),
             "anyres": replace(TinySpec(), anyres=True), "f16-sharded": replace(TinySpec(), dtype="float16", shards=2)}
    ckpts = {}
    for name, spec in specs.items():
        ckpt = work / "ckpt" / name
        if not (ckpt / "config.json").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            make_tiny_llava(ckpt, spec)
        ckpts[name] = ckpt
        (seeds["config"] / f"{name}.json").write_bytes((ckpt / "config.json").read_bytes())
        for i, st in enumerate(sorted(ckpt.glob("*.safetensors"))):
            (seeds["safetensors"] / f"{name}-{i}-header.safetensors").write_bytes(header_only(st, keep=64))
    liu = work / "ckpt" / "liuhaotian"
    if not (liu / "config.json").is_file():
        shutil.rmtree(liu, ignore_errors=True)
        shutil.rmtree(work / "ckpt" / "liuhaotian-clip", ignore_errors=True)
        clip = work / "ckpt" / "liuhaotian-clip"
        # mm_vision_tower names the local CLIP directory, so open_llava finds the tower without --clip
        make_tiny_liuhaotian(ckpts["llava15"], liu, clip, tower_name=str(clip.resolve()))
    (seeds["config"] / "liuhaotian.json").write_bytes((liu / "config.json").read_bytes())
    for name, data in {**sample_safetensors(), "bf16.safetensors": bf16_safetensors()}.items():
        (seeds["safetensors"] / name).write_bytes(data)
    for name, data in sample_images().items():
        (seeds["image"] / name).write_bytes(data)
    # a data: URI (the image harness takes an input that starts with "data:" as a URI)
    (seeds["image"] / "png.datauri").write_bytes(b"data:image/png;base64," + base64.b64encode(sample_images()["rgb.png"]))

    # GGUF seeds: a conversion at the smallest geometry that still converts and loads (parse time grows
    # with the token list, and every input is written out once per execution), the anyres mmproj (its
    # pinpoints) and a Q8_0 quantization of the small LLM (quantized tensor types)
    small = work / "ckpt" / "small"
    if not (small / "config.json").is_file():
        shutil.rmtree(small, ignore_errors=True)
        make_tiny_llava(small, replace(TinySpec(), sp_vocab=330, vocab_size=384, text_hidden=64, text_ff=128,
                                       text_heads=2, text_kv_heads=1, vision_hidden=32, vision_layers=2,
                                       vision_heads=2, image_size=28))
    ckpts["small"] = small
    for name in ("small", "anyres"):
        gguf_dir = work / "gguf" / name
        if not any(gguf_dir.glob("mmproj-*.gguf")):
            shutil.rmtree(gguf_dir, ignore_errors=True)
            convert_checkpoint(ckpts[name], gguf_dir, outtype="f16", name=name)
    from llava_gguf.quantize import quantize_gguf

    q8 = work / "gguf" / "small-Q8_0.gguf"
    if not q8.is_file():
        quantize_gguf(work / "gguf" / "small" / "small-F16.gguf", "Q8_0", q8)
    for f in [*sorted((work / "gguf" / "small").glob("*.gguf")), work / "gguf" / "anyres" / "mmproj-anyres-F16.gguf", q8]:
        for target in ("gguf", "gguf-native"):
            (seeds[target] / f.name).write_bytes(f.read_bytes())
    # what the harnesses read besides their input: a checkpoint whose config.json the config harness replaces,
    # and the pair the native harness completes (a mutated LLM is loaded with the real mmproj, and vice versa)
    base = outdir / "base"
    base.mkdir(exist_ok=True)
    (base / "checkpoint").unlink(missing_ok=True)
    (base / "checkpoint").symlink_to(ckpts["llava15"].resolve())
    (base / "pair").unlink(missing_ok=True)
    (base / "pair").symlink_to((work / "gguf" / "small").resolve())
    print(f"seeds in {outdir / 'seeds'}: " + ", ".join(f"{t} {len(list(d.iterdir()))}" for t, d in seeds.items()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fuzz.seeds OUTDIR")
    build(Path(sys.argv[1]))
