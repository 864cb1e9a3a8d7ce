"""Our LLM file against what llama.cpp's own convert_hf_to_gguf.py (from the same sdist) writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from devkit.llama_cpp import llama_cpp_converter as reference_converter


@pytest.fixture(scope="session")
def llama_cpp_converter(workdir) -> Path:
    return reference_converter(workdir / "llama-cpp-converter")


def _fields(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("dtype,outtype", [("float16", "f16"), ("float32", "f32"), ("bfloat16", "bf16")])
def test_llm_gguf_matches_llama_cpp(tiny, converted, llama_cpp_converter, workdir, dtype, outtype):
    ckpt = tiny(layout="transformers<4.52", dtype=dtype)
    ours, _ = converted(ckpt, outtype)
    theirs = workdir / f"llama-cpp-{dtype}.gguf"
    p = subprocess.run([sys.executable, str(llama_cpp_converter), str(ckpt), "--outtype", outtype,
                        "--outfile", str(theirs)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta = {t.name: (tuple(t.shape), t.tensor_type) for t in a.tensors}
    tb = {t.name: (tuple(t.shape), t.tensor_type) for t in b.tensors}
    assert ta == tb
    for t in b.tensors:
        mine = next(x for x in a.tensors if x.name == t.name)
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name
    fa, fb = _fields(a), _fields(b)
    # our one deliberate difference: a checkpoint template llama.cpp's tools would reject gets a layout
    # comment (convert/template.py); llama.cpp's converter copies it as it is
    from llava_gguf.families.llava15 import VICUNA_TEMPLATE
    from llava_gguf.convert.template import for_llama_cpp

    fb["tokenizer.chat_template"] = for_llama_cpp(fb["tokenizer.chat_template"], VICUNA_TEMPLATE).template
    # general.* naming metadata is derived from the directory name and may legitimately differ
    keys = {k for k in fb if not k.startswith("general.") or k in ("general.architecture", "general.file_type",
                                                                   "general.type", "general.quantization_version")}
    assert {k: fa.get(k) for k in keys} == {k: fb[k] for k in keys}
    assert {k for k in fa if not k.startswith("general.")} == {k for k in fb if not k.startswith("general.")}


def test_sparse_config_defaults_match_llama_cpp(tiny, llama_cpp_converter, workdir):
    """llava-hf's config.json lists only what differs from transformers' defaults; our defaults
    table must fill in what llama.cpp's converter gets from transformers' config classes."""
    import json
    import shutil

    from llava_gguf.convert import convert_checkpoint

    ckpt = workdir / "sparse-config"
    if not ckpt.exists():
        shutil.copytree(tiny(layout="transformers<4.52", dtype="float16", text_kv_heads=4), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    keep_text = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "rms_norm_eps", "model_type", "architectures")
    keep_vision = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                   "patch_size", "model_type")
    cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k in keep_text}
    cfg["vision_config"] = {k: v for k, v in cfg["vision_config"].items() if k in keep_vision}
    for k in ("vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        cfg.pop(k, None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    ours = convert_checkpoint(ckpt, workdir / "sparse-ours", outtype="f16", force=True).llm
    theirs = workdir / "sparse-theirs.gguf"
    p = subprocess.run([sys.executable, str(llama_cpp_converter), str(ckpt), "--outtype", "f16",
                        "--outfile", str(theirs)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    fa, fb = _fields(gguf.GGUFReader(ours)), _fields(gguf.GGUFReader(theirs))
    model_keys = {k for k in fb if k.startswith("llama.")}
    assert model_keys == {k for k in fa if k.startswith("llama.")}
    assert {k: fa[k] for k in model_keys} == {k: fb[k] for k in model_keys}
