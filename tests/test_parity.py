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
import torch

from llava_gguf.reference import image_features, load_hf_model, mean_cosine, pixel_values
from llava_gguf.tiny import LAYOUT_NAMES, sample_image

N_GREEDY = 12


def _prompt_ids(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    before = [tok.bos_token_id] + tok.encode("USER: ", add_special_tokens=False)
    after = tok.encode("\nWhat is in the image? ASSISTANT:", add_special_tokens=False)
    return before, after


def hf_reference(ckpt, image, n_greedy, model=None):
    """Image rows, first-step logits and greedy tokens from transformers (fp32); `model`: a loaded (and
    possibly altered) model of `ckpt` instead of the checkpoint as saved."""
    model = model if model is not None else load_hf_model(ckpt)
    pixels = pixel_values(ckpt, image)
    feats = image_features(model, pixels)
    before, after = _prompt_ids(ckpt)
    ids = before + [model.config.image_token_id] * feats.shape[0] + after
    first_logits, tokens = hf_greedy(model, ids, n_greedy, pixel_values=pixels)
    return feats, first_logits, tokens, (before, after)


def hf_greedy(model, ids, n_greedy, **image_inputs):
    """transformers' first-step logits and greedy tokens for prompt `ids` with the image inputs."""
    tokens, first_logits = [], None
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **image_inputs, use_cache=True)
        for step in range(n_greedy):
            logits = out.logits[0, -1].float()
            if step == 0:
                first_logits = logits.numpy()
            nxt = int(logits.argmax())
            tokens.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return first_logits, tokens


def ours(llm, mmproj, image, before, after, n_greedy):
    from llava_gguf import LLaVA

    with LLaVA(llm, mmproj, n_threads=2) as m:
        feats = m.embed_image(image)
        first, tokens = ours_greedy(m, image, before, after, n_greedy)
    return feats, first, tokens


def ours_greedy(m, image, before, after, n_greedy):
    """Our runtime's first-step logits and greedy tokens for `before` + image + `after`, from an empty cache."""
    m.reset()
    m.eval_tokens(before)
    m.eval_image(image)
    m.eval_tokens(after)
    first = m.last_logits()
    tokens = []
    logits = first
    for _ in range(n_greedy):
        nxt = int(np.argmax(logits))
        tokens.append(nxt)
        m.eval_tokens([nxt])
        logits = m.last_logits()
    return first, tokens


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
        "from llava_gguf.reference import mean_cosine\n"
        "from llava_gguf.tiny import sample_image\n"
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
    from llava_gguf.convert.families import find_family
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
    from llava_gguf.inspection import inspect_path
    from llava_gguf.tiny import TinySpec, make_tiny_llava

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
