"""`demo`: a small LLaVA built here (or one you name), converted, asked one question about an image,
with the image features measured against the Hugging Face reference."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .errors import LlavaGgufError

DEMO_IMAGE = Path(__file__).parent / "data" / "demo.jpg"


def cache_dir() -> Path:
    base = os.environ.get("LLAVA_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llava-gguf")
    return Path(base)


def tiny_checkpoint(spec=None) -> Path:
    """The built-in demo model, built once and cached."""
    from .tiny import TinySpec, make_tiny_llava

    spec = spec or TinySpec()
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "demo" / f"tiny-llava-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        make_tiny_llava(tmp / "ckpt", spec)
        os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_demo(model: Path | None, image: Path | None, prompt: str, echo: Callable[[str], None] = print) -> dict:
    from .convert import convert_checkpoint, output_names
    from .reference import image_features, load_hf_model, mean_cosine, pixel_values
    from .runtime.images import load_image
    from .runtime.model import LLaVA

    t0 = time.perf_counter()
    if model is None:
        echo("building the tiny demo LLaVA (random weights; cached) ...")
        ckpt = tiny_checkpoint()
    else:
        ckpt = Path(model)
    name = ckpt.resolve().name
    outdir = cache_dir() / "demo" / f"gguf-{name}-{hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:8]}"
    llm_name, mm_name = output_names(name, "f16", "f16")
    if not ((outdir / llm_name).is_file() and (outdir / mm_name).is_file()):
        echo(f"converting {ckpt} ...")
        convert_checkpoint(ckpt, outdir, outtype="f16", force=True)
    llm_path, mm_path = outdir / llm_name, outdir / mm_name

    hf = load_hf_model(ckpt)
    size = int(hf.config.vision_config.image_size)
    # A square image at the model's resolution: libmtmd pads to square where HF's processor
    # centre-crops, so only such an image is pre-processed identically by both.
    img = load_image(image or DEMO_IMAGE).resize((size, size), resample=3)
    reference = image_features(hf, pixel_values(ckpt, img))
    with LLaVA(llm_path, mm_path) as llava:
        ours = llava.embed_image(img)
        cosine = mean_cosine(ours, reference)
        answer = llava.generate_from_image(img, prompt, temperature=0, max_tokens=24, seed=0)
    echo(f"model:   {llm_path}")
    echo(f"mmproj:  {mm_path}")
    echo(f"image:   {image or DEMO_IMAGE} ({size}x{size})")
    echo(f"prompt:  {prompt}")
    echo(f"answer:  {answer.strip()!r}" + ("  (random weights: noise is expected)" if model is None else ""))
    echo(f"image-feature cosine vs Hugging Face: {cosine:.7f} ({ours.shape[0]} tokens x {ours.shape[1]})")
    if cosine < 0.999:
        raise LlavaGgufError(f"image features differ from the reference (cosine {cosine:.4f})",
                             "run `llava-gguf doctor`: is llava_fix true?")
    return {"model": str(llm_path), "mmproj": str(mm_path), "answer": answer, "cosine": cosine,
            "image_tokens": int(ours.shape[0]), "seconds": round(time.perf_counter() - t0, 2)}
