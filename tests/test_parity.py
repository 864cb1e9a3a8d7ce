"""Our GGUF runtime against Hugging Face transformers fp32, same square image at the model's
resolution (libmtmd pads non-square images to square where HF's processor centre-crops, so only a
square image at the model's size is pre-processed identically) and the same token ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llava_gguf.checks.metrics import mean_cosine

from llava_gguf.checks.reference import image_features, load_hf_model, pixel_values
from devkit.tiny import LAYOUT_NAMES, sample_image
from support import hf_reference, ours

N_GREEDY = 12


CASES = [(layout, dtype) for layout in LAYOUT_NAMES for dtype in ("float32", "float16", "bfloat16")]


@pytest.mark.parametrize("layout,dtype", CASES)
def test_matches_hugging_face(tiny, converted, layout, dtype):
    shards = 3 if layout == "transformers-4.52" else 1
    ckpt = tiny(layout=layout, dtype=dtype, shards=shards)
    outtype = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    llm, mmproj = converted(ckpt, outtype)
    image = sample_image(112, seed=3)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(ckpt, image, N_GREEDY)
    feats, logits, tokens = ours(llm, mmproj, image, before, after, N_GREEDY)
    cosine = mean_cosine(feats, ref_feats)
    print(f"{layout} {dtype} -> {outtype}: image cosine {cosine:.7f}")
    assert feats.shape == ref_feats.shape == (64, 256)
    if outtype == "f32":
        assert cosine >= 0.9999
        assert tokens == ref_tokens
        scale = float(np.abs(ref_logits).max())
        assert np.abs(logits - ref_logits).max() <= 2e-3 * scale
    else:
        assert cosine >= 0.999
        assert int(np.argmax(logits)) == int(np.argmax(ref_logits))


def test_stock_libmtmd_shows_the_defect(tiny, converted):
    """The same file through the unpatched libmtmd (upstream #25814): proof our patch makes the difference."""
    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f32")
    image = sample_image(112, seed=3)
    ref = image_features(load_hf_model(ckpt), pixel_values(ckpt, image))
    np.save(os.path.join(os.path.dirname(llm), "ref.npy"), ref)
    code = (
        "import json, sys, numpy as np\n"
        "from llava_gguf import LLaVA\n"
        "from llava_gguf.checks.metrics import mean_cosine\n"
        "from llava_gguf.checks.samples import sample_image\n"
        f"m = LLaVA({str(llm)!r}, {str(mmproj)!r})\n"
        "e = m.embed_image(sample_image(112, seed=3))\n"
        f"print(json.dumps({{'cos': mean_cosine(e, np.load({os.path.join(os.path.dirname(llm), 'ref.npy')!r}))}}))\n")
    cos = {}
    for variant in ("stock", "fixed"):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "LLAVA_GGUF_MTMD": variant}, timeout=120)
        assert p.returncode == 0, p.stderr
        cos[variant] = json.loads(p.stdout.strip().splitlines()[-1])["cos"]
    print(cos)
    assert cos["stock"] < 0.99
    assert cos["fixed"] >= 0.9999


GEOMETRIES = [
    # any CLIP geometry: image size, patch size, depth, width, heads, feature layer
    dict(image_size=224, patch_size=16, vision_hidden=128, vision_layers=5, vision_heads=8),
    dict(image_size=84, patch_size=14, vision_hidden=96, vision_layers=4, vision_heads=6, feature_layer=-1),
    dict(image_size=112, patch_size=14, vision_layers=4, feature_layer=2),
    dict(text_kv_heads=4, text_layers=3),  # multi-head (no GQA) text model
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_any_clip_geometry(tiny, converted, geometry):
    ckpt = tiny(**geometry)
    llm, mmproj = converted(ckpt, "f32")
    size = geometry.get("image_size", 112)
    image = sample_image(size, seed=4)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(ckpt, image, 4)
    feats, logits, tokens = ours(llm, mmproj, image, before, after, 4)
    n = (size // geometry.get("patch_size", 14)) ** 2
    assert feats.shape == ref_feats.shape == (n, 256)
    assert mean_cosine(feats, ref_feats) >= 0.9999
    assert tokens == ref_tokens


def test_q8_0_files(tiny, converted):
    """--outtype q8_0 --mmproj-type q8_0: the files load, the mmproj stays close to the f32 reference."""
    import gguf

    ckpt = tiny()
    llm, mmproj = converted(ckpt, "q8_0", "q8_0")
    r = gguf.GGUFReader(llm)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    m = {t.name: t.tensor_type for t in gguf.GGUFReader(mmproj).tensors}
    assert m["v.blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert m["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    image = sample_image(112, seed=3)
    ref_feats, ref_logits, _, (before, after) = hf_reference(ckpt, image, 1)
    feats, logits, _ = ours(llm, mmproj, image, before, after, 1)
    assert mean_cosine(feats, ref_feats) >= 0.99


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_checkpoints(tiny, converted, shards):
    """pytorch_model.bin (single, or sharded with an index), read with torch.load(weights_only=True, mmap=True)."""
    ckpt = tiny(layout="transformers<4.52", dtype="float16", weights_format="bin", shards=shards)
    llm, mmproj = converted(ckpt, "f16")
    image = sample_image(112, seed=3)
    ref_feats, ref_logits, _, (before, after) = hf_reference(ckpt, image, 1)
    feats, logits, _ = ours(llm, mmproj, image, before, after, 1)
    assert mean_cosine(feats, ref_feats) >= 0.999
    assert int(np.argmax(logits)) == int(np.argmax(ref_logits))


@pytest.mark.parametrize("layout", ["transformers<4.52", "transformers-5"])
def test_bakllava_mistral_text_model(tiny, converted, layout):
    """BakLLaVA: LLaVA-1.5 with a Mistral language model (its own family), the same parity as LLaVA-1.5."""
    from llava_gguf.families import find_family
    from llava_gguf.convert.checkpoint import read_config

    ckpt = tiny(text_model="mistral", layout=layout)
    assert read_config(ckpt)["text_config"]["model_type"] == "mistral"
    assert find_family(read_config(ckpt)).name == "bakllava"
    llm, mmproj = converted(ckpt, "f32")
    image = sample_image(112, seed=7)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(ckpt, image, N_GREEDY)
    feats, logits, tokens = ours(llm, mmproj, image, before, after, N_GREEDY)
    assert mean_cosine(feats, ref_feats) >= 0.9999
    scale = float(np.abs(ref_logits).max())
    assert float(np.abs(logits - ref_logits).max()) <= 2e-3 * scale
    assert tokens == ref_tokens


def test_head_dim_other_than_hidden_over_heads(tmp_path, monkeypatch):
    """A text config whose head_dim is not hidden_size / num_attention_heads (transformers allows it; the
    converter writes key_length / value_length): the file loads and answers as transformers does, and no
    command refuses it (the load checks once took the head size as n_embd / n_head and refused it)."""
    import functools

    import transformers

    from llava_gguf.convert import convert_checkpoint
    from llava_gguf.checks.inspect import inspect_path
    from devkit.tiny import TinySpec, make_tiny_llava

    init = transformers.LlamaConfig.__init__

    @functools.wraps(init)
    def with_head_dim(self, *args, **kwargs):
        kwargs.setdefault("head_dim", 32)
        init(self, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaConfig, "__init__", with_head_dim)
    ckpt = make_tiny_llava(tmp_path / "ckpt", TinySpec())
    monkeypatch.undo()
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    r = convert_checkpoint(ckpt, tmp_path / "out", outtype="f32")
    assert inspect_path(r.llm)["defects"] == [] and inspect_path(r.mmproj)["defects"] == []
    image = sample_image(112, seed=11)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(ckpt, image, N_GREEDY)
    feats, logits, tokens = ours(r.llm, r.mmproj, image, before, after, N_GREEDY)
    assert mean_cosine(feats, ref_feats) >= 0.9999
    assert tokens == ref_tokens
