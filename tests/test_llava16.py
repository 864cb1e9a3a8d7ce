"""LLaVA-1.6 (LlavaNext, "anyres"): conversion, and image rows equal to transformers' on non-square images
of several aspect ratios — same count, same order (base tile, unpadded tile grid, one image_newline per
row), cosine >= 0.9999 — then the same greedy answer, through the API and a chat session."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from llava_gguf import LLaVA
from llava_gguf.checks.metrics import mean_cosine
from support import assert_clean_failure, crop_image, hf_greedy, hf_next, hf_rows, ours_greedy, prompt_ids, run_cli

N_GREEDY = 8
SIZES = [(112, 112), (200, 112), (112, 200), (300, 170), (90, 260), (500, 300)]  # (w, h)


@pytest.mark.parametrize("layout,text_model", [("transformers<4.52", "llama"), ("transformers-4.52", "llama"),
                                               ("transformers-5", "llama"), ("transformers<4.52", "mistral")])
def test_llava16_rows_and_answers_match_transformers(tiny, converted, layout, text_model):
    """Vicuna (LLaMA) in every layout, and llava-v1.6-mistral's Mistral text model."""
    ckpt = tiny(anyres=True, layout=layout, text_model=text_model)
    llm, mmproj = converted(ckpt, "f32")
    r = gguf.GGUFReader(mmproj)
    assert r.fields["clip.vision.image_grid_pinpoints"].contents() == [112, 224, 224, 112, 224, 224, 336, 112, 112, 336]
    assert r.fields["clip.vision.mm_patch_merge_type"].contents() == "spatial_unpad"
    assert "model.image_newline" in [t.name for t in r.tensors]
    model, proc = hf_next(ckpt)
    sizes = SIZES if layout == "transformers-5" else SIZES[1:2]
    before, after = prompt_ids(ckpt)
    with LLaVA(llm, mmproj, n_threads=2) as m:
        for w, h in sizes:
            img = crop_image(w, h)
            ref, inp = hf_rows(model, proc, img)
            rows = m.embed_image(img)
            assert rows.shape == ref.shape, (w, h)
            assert mean_cosine(rows, ref) >= 0.9999, (w, h)
        # the answer: transformers greedy against ours on the same ids
        img = crop_image(200, 112)
        ref, inp = hf_rows(model, proc, img)
        ids = before + [model.config.image_token_id] * ref.shape[0] + after
        first_hf, tokens_hf = hf_greedy(model, ids, N_GREEDY, pixel_values=inp["pixel_values"],
                                        image_sizes=inp["image_sizes"])
        first, tokens = ours_greedy(m, img, before, after, N_GREEDY)
    assert float(np.abs(first - first_hf).max()) <= 2e-3 * float(np.abs(first_hf).max())
    assert tokens == tokens_hf


def test_llava16_chat_session(tiny, converted):
    """A conversation about a non-square image: the anyres rows go through the chat path too, are cached,
    and a follow-up reuses them."""
    llm, mmproj = converted(tiny(anyres=True), "f16")
    greedy = dict(temperature=0.0, max_tokens=6)
    img = crop_image(300, 170)
    with LLaVA(llm, mmproj, n_threads=2) as m:
        s = m.chat()
        s.ask("What is in the image?", [img], **greedy)
        t1 = m.last
        s.ask("And the colours?", **greedy)
        t2 = m.last
        rows = m.embed_image(img)
        # an image the embedding cache has already dropped, again later in the same prompt
        from llava_gguf.runtime.prompt import Message

        m.IMAGE_CACHE_BYTES = 0
        a, b = crop_image(200, 112), crop_image(112, 200)
        text = "".join(m.stream_messages([Message("user", "Compare them.", n_images=3)], [a, b, a], **greedy))
        assert m.last.images == 3 and isinstance(text, str)
    assert t1.images == 1 and t1.images_encoded == 1
    assert t2.images_encoded == 0 and t2.reused_tokens >= t1.prompt_tokens
    # the image took as many positions as its anyres rows
    assert t1.prompt_tokens > rows.shape[0] == 234


def test_llava16_inspect_and_bad_pinpoints(tiny, converted, tmp_path):
    ckpt = tiny(anyres=True)
    llm, mmproj = converted(ckpt, "f16")
    r = json.loads(run_cli("inspect", str(ckpt), "--json").stdout.strip().splitlines()[-1])
    assert (r["family"], r["architecture"]) == ("llava-1.6", "LlavaNextForConditionalGeneration")
    model, _ = hf_next(ckpt)  # every stored tensor counted, image_newline included
    assert r["parameters"]["total"] == sum(t.numel() for t in model.state_dict().values())
    r = json.loads(run_cli("inspect", str(mmproj), "--json").stdout.strip().splitlines()[-1])
    assert r["anyres"] and r["defects"] == [] and r["metadata"]["clip.vision.image_grid_pinpoints"] == \
        [112, 224, 224, 112, 224, 224, 336, 112, 112, 336]
    import shutil

    bad = shutil.copytree(ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    for pins in ([[112, 200]], [[112]], "336x672", []):
        cfg["image_grid_pinpoints"] = pins
        (bad / "config.json").write_text(json.dumps(cfg))
        out = tmp_path / "out"
        assert_clean_failure(run_cli("convert", str(bad), "-o", str(out)), out, "image_grid_pinpoints")


def test_llava16_verify(tiny, converted, tmp_path):
    """`verify` on a 1.6 pair: the built-in samples include a wide and a tall image; a user's image is
    taken as it is (anyres tiles any shape)."""
    ckpt = tiny(anyres=True)
    llm, mmproj = converted(ckpt, "f16")
    images = tmp_path / "images"
    images.mkdir()
    crop_image(500, 300).save(images / "wide.png")
    for extra in ([], ["--images", str(images)]):
        p = run_cli("verify", str(ckpt), str(llm.parent), "--tokens", "6", "--json", *extra)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert r["passed"] and r["cosine_min"] >= 0.9999 and r["greedy_identical"] == len(r["images"]) and r["top1"] == 1.0


def test_llava16_imatrix_images_refused(tiny, converted, tmp_path):
    """llama-imatrix would feed libmtmd's own 1.6 tiling: refused with one line, nothing written."""
    llm, mmproj = converted(tiny(anyres=True), "f16")
    images = tmp_path / "images"
    images.mkdir()
    crop_image(200, 112).save(images / "a.png")
    out = tmp_path / "imatrix.gguf"
    p = run_cli("imatrix", str(llm), "-o", str(out), "--images", str(images))
    assert p.returncode == 1 and "not supported for LLaVA-1.6" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
