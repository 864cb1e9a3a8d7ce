"""Shared fixtures: tiny LLaVA checkpoints (built once per session, per spec) and their conversions.

Everything is real: checkpoints are saved by transformers-built models, conversions run our converter,
and models load in llama.cpp through our native libraries."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

# No test reaches the real Hugging Face Hub (a repo id, a tower `mm_vision_tower` names): huggingface_hub
# is pointed at a closed loopback port, refused at once; the Hub tests pass their stand-in's address.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


_ckpts: dict = {}  # TinySpec -> checkpoint
_converted: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="session")
def image_png(tmp_path_factory) -> Path:
    """A 112 x 112 sample image (devkit.tiny.sample_image, seed 5) as a PNG file, for what takes a path."""
    from devkit.tiny import sample_image

    path = tmp_path_factory.mktemp("img") / "img.png"
    sample_image(112, seed=5).save(path)
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llava")


@pytest.fixture(scope="session")
def tiny(workdir):
    """tiny(**spec_fields) -> checkpoint dir, cached per spec."""

    # imported here: devkit.tiny loads torch and transformers, which the unit tier never needs
    from devkit.tiny import TinySpec, make_tiny_llava

    def make(**fields) -> Path:
        spec = replace(TinySpec(), **fields)
        if spec not in _ckpts:
            name = "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(fields.items())) if fields else "tiny-default"
            name = name.replace("<", "lt").replace(".", "_")
            _ckpts[spec] = make_tiny_llava(workdir / "ckpt" / name, spec)
        return _ckpts[spec]

    return make


@pytest.fixture(scope="session")
def converted(workdir):
    """converted(ckpt, outtype, mmproj_type=None) -> (llm, mmproj), cached."""
    from llava_gguf.convert import convert_checkpoint

    def conv(ckpt: Path, outtype: str = "f16", mmproj_type: str | None = None) -> tuple[Path, Path]:
        key = (ckpt, outtype, mmproj_type)
        if key not in _converted:
            out = workdir / "gguf" / f"{ckpt.name}-{outtype}-{mmproj_type}"
            r = convert_checkpoint(ckpt, out, outtype=outtype, mmproj_type=mmproj_type)
            _converted[key] = (r.llm, r.mmproj)
        return _converted[key]

    return conv




@pytest.fixture(scope="session")
def shipped_gguf(workdir) -> Path:
    """The shipped model (llava_gguf/data/shapes-llava) converted to F16: a directory `serve`/`chat` take."""
    from llava_gguf.convert import convert_checkpoint
    from llava_gguf.demo.run import SHIPPED_MODEL

    out = workdir / "shipped-f16"
    if not out.is_dir():
        convert_checkpoint(SHIPPED_MODEL, out, outtype="f16", mmproj_type="f16", name="shapes")
    return out
