"""The original liuhaotian layout (LlavaLlamaForCausalLM / LlavaMistralForCausalLM: LLaVA's own code,
LLaVA-Med, most fine-tunes) with its vision tower in a separate CLIP checkpoint: built from a tiny
llava-hf checkpoint (same fp16 weights), converted, run in llama.cpp and compared with transformers'
LlavaForConditionalGeneration on the llava-hf original."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from support import run_cli
from llava_gguf.checks.metrics import mean_cosine
from devkit.tiny import make_tiny_liuhaotian, sample_image
from support import assert_clean_failure
from support import hf_reference, ours

N_GREEDY = 8


def _json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def _parity(hf_dir, llm, mmproj, seed=3):
    image = sample_image(112, seed=seed)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(hf_dir, image, N_GREEDY)
    feats, logits, tokens = ours(llm, mmproj, image, before, after, N_GREEDY)
    assert feats.shape == ref_feats.shape
    assert mean_cosine(feats, ref_feats) >= 0.9999
    assert float(np.abs(logits - ref_logits).max()) <= 2e-3 * float(np.abs(ref_logits).max())
    assert tokens == ref_tokens


CASES = [  # CLIP checkpoint kind, LLaVA weights format, shards
    ("vision", "bin", 1),  # a single pytorch_model.bin without an index
    ("full", "bin", 2),  # sharded .bin with an index; CLIPModel with its text tower, as OpenAI ships it
    ("vision", "safetensors", 1),
]


@pytest.mark.parametrize("clip_kind,fmt,shards", CASES)
def test_liuhaotian_with_clip(tiny, tmp_path, clip_kind, fmt, shards):
    hf = tiny(dtype="float16")
    lh = make_tiny_liuhaotian(hf, tmp_path / "llava-v1.5-tiny", tmp_path / "clip", clip_kind=clip_kind,
                              weights_format=fmt, shards=shards)
    from llava_gguf.convert.checkpoint import read_checkpoint

    names = list(read_checkpoint(lh).tensors)
    assert "model.mm_projector.0.weight" in names and not any("vision" in n for n in names)  # the tower is elsewhere
    p = run_cli("convert", str(lh), "--clip", str(tmp_path / "clip"), "-o", str(tmp_path / "out"), "--outtype", "f32",
                "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert (r["family"], r["layout"]) == ("llava-original", "liuhaotian")
    _parity(hf, r["llm"], r["mmproj"])
    info = _json(run_cli("inspect", str(lh), "--clip", str(tmp_path / "clip"), "--json"))
    assert info["vision_from"] == str(tmp_path / "clip") and info["convert_writes"]["clip.vision.feature_layer"] == [2]


def test_liuhaotian_mistral_from_the_hf_cache(tiny, tmp_path):
    """LLaVA-Med's layout (LlavaMistralForCausalLM); the tower found in the Hugging Face cache by the
    name mm_vision_tower gives, as the original code would load it; a tower saved inside the
    checkpoint wins over the cached one."""
    hf = tiny(dtype="float16", text_model="mistral")
    lh = make_tiny_liuhaotian(hf, tmp_path / "llava-med-tiny", tmp_path / "clip", weights_format="safetensors")
    hub = tmp_path / "hub"
    snap = hub / "models--openai--clip-vit-tiny-test" / "snapshots" / "0123abcd"
    shutil.copytree(tmp_path / "clip", snap)
    (hub / "models--openai--clip-vit-tiny-test" / "refs").mkdir()
    (hub / "models--openai--clip-vit-tiny-test" / "refs" / "main").write_text("0123abcd")

    out = tmp_path / "out"
    missing = run_cli("convert", str(lh), "-o", str(out), env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_clean_failure(missing, out, "openai/clip-vit-tiny-test", "--clip")

    p = run_cli("convert", str(lh), "-o", str(out), "--outtype", "f32", "--json", env={"HF_HUB_CACHE": str(hub)})
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert (r["family"], r["layout"]) == ("llava-original-mistral", "liuhaotian")
    _parity(hf, r["llm"], r["mmproj"], seed=4)

    # the tower inside the checkpoint is used, not the cached one (made different here)
    inside = make_tiny_liuhaotian(hf, tmp_path / "with-tower", None, weights_format="safetensors", with_tower=True)
    other = tiny(dtype="float16", text_model="mistral", seed=1)
    make_tiny_liuhaotian(other, tmp_path / "unused", tmp_path / "other-clip", weights_format="safetensors")
    p = run_cli("convert", str(inside), "--clip", str(tmp_path / "other-clip"), "-o", str(tmp_path / "out2"),
                "--outtype", "f32", "--json")
    assert p.returncode == 0, p.stderr
    _parity(hf, _json(p)["llm"], _json(p)["mmproj"], seed=4)


def _edit(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_liuhaotian_bad_input(tiny, tmp_path):
    hf = tiny(dtype="float16")
    lh = make_tiny_liuhaotian(hf, tmp_path / "lh", tmp_path / "clip", weights_format="safetensors")
    clip = str(tmp_path / "clip")
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(lh), "--clip", str(hf), "-o", str(out)), out, "is not a CLIP checkpoint")
    assert_clean_failure(run_cli("convert", str(hf), "--clip", clip, "-o", str(out)), out,
                         "--clip applies to checkpoints without a vision tower")
    for changes, words in [
        (dict(mm_projector_type="mlp3x_gelu"), ("mm_projector_type 'mlp3x_gelu'", "not supported")),
        (dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad"), ("anyres",)),
        (dict(mm_use_im_start_end=True), ("mm_use_im_start_end",)),
    ]:
        bad = shutil.copytree(lh, tmp_path / f"bad-{len(list(tmp_path.iterdir()))}")
        _edit(bad, **changes)
        assert_clean_failure(run_cli("convert", str(bad), "--clip", clip, "-o", str(out)), out, *words)
    # the tower's weights inside the checkpoint, its configuration nowhere
    inside = make_tiny_liuhaotian(hf, tmp_path / "inside", None, weights_format="safetensors", with_tower=True)
    p = run_cli("convert", str(inside), "-o", str(out), env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert_clean_failure(p, out, "carries its vision tower's weights but not its configuration", "--clip")
    # a .bin that holds more than tensors
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lh / "config.json", pickled / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "args": argparse_like()}, pickled / "pytorch_model.bin")
    assert_clean_failure(run_cli("convert", str(pickled), "--clip", clip, "-o", str(out)), out,
                         "holds more than tensors", "weights_only")


class _Args:  # stands for the training arguments some checkpoints pickle next to their weights
    lr = 2e-5


def argparse_like():
    return _Args()


def test_llava_v1_linear_projector(tiny, tmp_path):
    """LLaVA v1: one nn.Linear projector (no mm_projector_type in its config). libmtmd's mlp projector
    always applies GELU after mm.0; the converter writes the linear map as an exact GELU pair (see
    convert/projector.py linear_as_gelu_pair). Reference: transformers' LLaVA with its projector replaced by the
    checkpoint's nn.Linear, i.e. LLaVA v1's computation."""
    import gguf
    from safetensors.torch import load_file

    from llava_gguf.checks.reference import load_hf_model

    hf = tiny(dtype="float16")
    lh = make_tiny_liuhaotian(hf, tmp_path / "llava-v1-tiny", tmp_path / "clip", weights_format="safetensors",
                              linear_projector=True)
    assert "mm_projector_type" not in json.loads((lh / "config.json").read_text())
    p = run_cli("convert", str(lh), "--clip", str(tmp_path / "clip"), "-o", str(tmp_path / "out"), "--outtype", "f32",
                "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    mm = {t.name: t for t in gguf.GGUFReader(r["mmproj"]).tensors}
    assert tuple(mm["mm.0.weight"].shape) == (64, 512) and tuple(mm["mm.2.weight"].shape) == (512, 256)

    weights = load_file(str(lh / "model.safetensors"))
    model = load_hf_model(hf)
    linear = torch.nn.Linear(64, 256)
    with torch.no_grad():
        linear.weight.copy_(weights["model.mm_projector.weight"].float())
        linear.bias.copy_(weights["model.mm_projector.bias"].float())
    model.model.multi_modal_projector = linear
    image = sample_image(112, seed=8)
    ref_feats, ref_logits, ref_tokens, (before, after) = hf_reference(hf, image, N_GREEDY, model=model)
    feats, logits, tokens = ours(r["llm"], r["mmproj"], image, before, after, N_GREEDY)
    cosine = mean_cosine(feats, ref_feats)
    rel = float(np.abs(feats - ref_feats).max() / np.abs(ref_feats).max())
    print(f"LLaVA v1 linear projector as a GELU pair: cosine {cosine:.8f}, max relative error {rel:.2e}")
    assert cosine >= 0.99999
    assert float(np.abs(logits - ref_logits).max()) <= 2e-3 * float(np.abs(ref_logits).max())
    assert tokens == ref_tokens
