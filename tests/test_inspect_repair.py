"""`inspect` and `repair`: real checkpoints and GGUF files, and mmproj files laid out the way other
tools write them (built here with gguf-py directly, not with our code), checked in the real runtime
against transformers."""
from __future__ import annotations

import json
import shutil

import gguf

from llava_gguf.checks.metrics import mean_cosine

from llava_gguf.checks.reference import image_features, load_hf_model, pixel_values
from devkit.tiny import sample_image

from support import run_cli
from support import rewrite_gguf as rewrite

FEATURE = "clip.vision.feature_layer"


def _json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def legacy_mmproj(mmproj, dest):
    """What llama.cpp's legacy route (llava_surgery + convert_image_encoder_to_gguf.py) writes for a
    LLaVA-1.5 tower: the last layer left out, block_count = n - 1, no feature layer."""
    return rewrite(mmproj, dest, drop_keys=(FEATURE,),
                   set_keys={"clip.has_llava_projector": (True, gguf.GGUFValueType.BOOL, None),
                             "general.description": ("image encoder for LLaVA", gguf.GGUFValueType.STRING, None)})


def _cosine(llm, mmproj, ckpt, image) -> float:
    from llava_gguf import LLaVA

    ref = image_features(load_hf_model(ckpt), pixel_values(ckpt, image))
    with LLaVA(llm, mmproj, n_threads=2) as m:
        return mean_cosine(m.embed_image(image), ref)


def test_inspect_checkpoint(tiny, converted):
    ckpt = tiny()
    p = run_cli("inspect", str(ckpt), "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    model = load_hf_model(ckpt)
    assert r["kind"] == "checkpoint" and r["family"] == "llava-1.5" and r["layout"] == "transformers-5"
    assert r["architecture"] == "LlavaForConditionalGeneration" and r["text_model"] == "llama"
    assert r["parameters"]["total"] == sum(t.numel() for t in model.state_dict().values())
    assert r["parameters"]["projector"] == sum(t.numel() for t in model.model.multi_modal_projector.parameters())
    assert r["dtypes"] == {"F32": len(model.state_dict())}
    llm, mmproj = converted(ckpt, "f16")
    assert (r["convert_writes"]["llm"], r["convert_writes"]["mmproj"]) == (llm.name, mmproj.name)
    assert r["convert_writes"][FEATURE] == [2] and r["vision"]["image_tokens"] == 64
    text = run_cli("inspect", str(ckpt))
    assert text.returncode == 0 and "llava-1.5 checkpoint" in text.stdout


def test_inspect_gguf_pair(tiny, converted):
    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f16")
    p = run_cli("inspect", str(llm), "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    from transformers import AutoTokenizer

    assert r["role"] == "llm" and r["architecture"] == "llama" and r["chat_template"] is True
    assert r["block_count"] == 2 and r["embedding_length"] == 256 and r["vocab_size"] == 1024
    assert len(AutoTokenizer.from_pretrained(ckpt)) <= r["vocab_size"]
    assert sum(r["tensor_types"].values()) == r["tensors"] and set(r["tensor_types"]) == {"F16", "F32"}
    assert r["metadata"]["tokenizer.ggml.tokens"] == {"array": "STRING", "length": 1024}
    assert r["defects"] == []
    p = run_cli("inspect", str(mmproj), "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["role"] == "mmproj" and r["projector_type"] == "mlp" and r["image_tokens"] == 64
    assert r["metadata"][FEATURE] == [2] and r["feature_layer"] == [2]
    assert r["stored_blocks"] == r["layers_run"] == 2 and r["defects"] == []
    assert r["bytes"] == mmproj.stat().st_size


def test_legacy_mmproj_repaired(tiny, converted, tmp_path):
    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f32")
    legacy = legacy_mmproj(mmproj, tmp_path / "mmproj-legacy.gguf")
    image = sample_image(112, seed=5)

    p = run_cli("inspect", str(legacy), "--json")
    assert p.returncode == 1
    r = _json(p)
    assert [d["code"] for d in r["defects"]] == ["feature-layer-missing"] and r["defects"][0]["repairable"]
    assert FEATURE not in r["metadata"] and r["stored_blocks"] == 2 and r["layers_run"] == 1
    before = _cosine(llm, legacy, ckpt, image)
    assert before < 0.99  # one layer short

    fixed = tmp_path / "fixed" / "mmproj-fixed.gguf"
    fixed.parent.mkdir()
    p = run_cli("repair", str(legacy), "-o", str(fixed), "--json")
    assert p.returncode == 0, p.stderr
    assert _json(p)["fixed"] == ["feature-layer-missing"]
    assert sorted(x.name for x in fixed.parent.iterdir()) == ["mmproj-fixed.gguf"]  # no partial left
    r = _json(run_cli("inspect", str(fixed), "--json"))
    assert r["defects"] == [] and r["metadata"][FEATURE] == [2] and r["layers_run"] == 2
    after = _cosine(llm, fixed, ckpt, image)
    print(f"legacy mmproj: cosine {before:.5f} before repair, {after:.7f} after")
    assert after >= 0.9999
    # every tensor and every other key unchanged
    a, b = gguf.GGUFReader(legacy), gguf.GGUFReader(fixed)
    assert [(t.name, t.tensor_type, bytes(t.data)) for t in a.tensors] == \
        [(t.name, t.tensor_type, bytes(t.data)) for t in b.tensors]
    assert {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.") and k != FEATURE}

    # an existing output is not replaced without --force; in place needs no --force
    p = run_cli("repair", str(legacy), "-o", str(fixed))
    assert p.returncode == 1 and "already exists" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("repair", str(legacy))
    assert p.returncode == 0, p.stderr
    assert _json(run_cli("inspect", str(legacy), "--json"))["defects"] == []
    assert not list(tmp_path.glob("*.partial"))
    p = run_cli("repair", str(legacy))
    assert p.returncode == 0 and "nothing to repair" in p.stdout


def test_post_layernorm_and_key_type_repaired(tiny, converted, tmp_path):
    """An mmproj carrying CLIP's post-layernorm, and one whose feature layer is stored with a type
    clip.cpp refuses (a UINT32 scalar): both found, both fixed."""
    from safetensors.numpy import load_file

    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f32")
    weights = load_file(str(next(ckpt.glob("*.safetensors"))))
    post = {"v.post_ln.weight": weights["vision_tower.post_layernorm.weight"],
            "v.post_ln.bias": weights["vision_tower.post_layernorm.bias"] + 0.5}
    image = sample_image(112, seed=6)

    with_post = rewrite(mmproj, tmp_path / "mmproj-post.gguf", add_tensors=post)
    p = run_cli("inspect", str(with_post), "--json")
    assert p.returncode == 1 and [d["code"] for d in _json(p)["defects"]] == ["post-layernorm"]
    before = _cosine(llm, with_post, ckpt, image)
    assert before < 0.99
    assert run_cli("repair", str(with_post)).returncode == 0
    r = _json(run_cli("inspect", str(with_post), "--json"))
    assert r["defects"] == [] and "v.post_ln.weight" not in [t.name for t in gguf.GGUFReader(with_post).tensors]
    assert _cosine(llm, with_post, ckpt, image) >= 0.9999

    # HF's raw negative index: clip.cpp takes it as unset (runs block_count - 1); only an explicit layer fixes it
    negative = rewrite(mmproj, tmp_path / "mmproj-negative.gguf",
                       set_keys={FEATURE: ([-2], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)})
    r = _json(run_cli("inspect", str(negative), "--json"))
    assert [d["code"] for d in r["defects"]] == ["feature-layer-unset"] and r["layers_run"] == 1
    assert _cosine(llm, negative, ckpt, image) < 0.99
    p = run_cli("repair", str(negative))
    assert p.returncode == 1 and "cannot be repaired" in p.stderr and "--feature-layer" in p.stderr
    negative.chmod(0o640)
    assert run_cli("repair", str(negative), "--feature-layer", "2").returncode == 0
    assert _json(run_cli("inspect", str(negative), "--json"))["defects"] == []
    assert _cosine(llm, negative, ckpt, image) >= 0.9999
    assert negative.stat().st_mode & 0o777 == 0o640  # rewritten in place, permissions kept

    scalar = rewrite(mmproj, tmp_path / "mmproj-scalar.gguf",
                     set_keys={FEATURE: (2, gguf.GGUFValueType.UINT32, None)})
    p = run_cli("inspect", str(scalar), "--json")
    assert p.returncode == 1 and [d["code"] for d in _json(p)["defects"]] == ["feature-layer-type"]
    assert run_cli("repair", str(scalar)).returncode == 0
    r = _json(run_cli("inspect", str(scalar), "--json"))
    assert r["defects"] == [] and r["metadata"][FEATURE] == [2]
    assert _cosine(llm, scalar, ckpt, image) >= 0.9999


def test_bad_input(tiny, converted, tmp_path):
    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f16")
    cases = [
        (("inspect", str(tmp_path / "nope")), "does not exist"),
        (("repair", str(llm)), "not an mmproj"),
        (("inspect", str(tmp_path)), "no config.json"),
    ]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 10)
    cases.append((("inspect", str(garbage)), "not a readable GGUF"))
    # a feature layer beyond the stored layers: reported, and not repairable
    beyond = rewrite(mmproj, tmp_path / "mmproj-beyond.gguf",
                     set_keys={FEATURE: ([3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)})
    cases.append((("repair", str(beyond)), "cannot be repaired"))
    legacy = legacy_mmproj(mmproj, tmp_path / "mmproj-legacy.gguf")
    cases.append((("repair", str(legacy), "--feature-layer", "7"), "out of range"))
    for args, message in cases:
        p = run_cli(*args)
        assert p.returncode == 1, (args, p.stdout)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, args
    # block_count promising a layer that is not stored: clip.cpp cannot load it, repair cannot fix it
    short = rewrite(legacy, tmp_path / "mmproj-short.gguf",
                    set_keys={"clip.vision.block_count": (3, gguf.GGUFValueType.UINT32, None)})
    p = run_cli("repair", str(short))
    assert p.returncode == 1 and "cannot be repaired" in p.stderr and "block(s) [2] are not stored" in p.stderr
    r = _json(run_cli("inspect", str(beyond), "--json"))
    assert [d["code"] for d in r["defects"]] == ["feature-layer-out-of-range"] and not r["defects"][0]["repairable"]
    r = _json(run_cli("inspect", str(short), "--json"))
    assert [d["code"] for d in r["defects"]] == ["feature-layer-missing", "blocks-missing"]
    # --feature-layer on a file that needs none
    p = run_cli("repair", str(mmproj), "--feature-layer", "1")
    assert p.returncode == 1 and "already has a usable" in p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["garbage.gguf", "mmproj-beyond.gguf",
                                                                 "mmproj-legacy.gguf", "mmproj-short.gguf"])
    # --feature-layer: the layer written to a file without one
    copy = shutil.copy(legacy, tmp_path / "mmproj-one.gguf")
    assert run_cli("repair", str(copy), "--feature-layer", "1").returncode == 0
    assert _json(run_cli("inspect", str(copy), "--json"))["metadata"][FEATURE] == [1]


def test_inspect_names_the_family(tiny):
    r = _json(run_cli("inspect", str(tiny(text_model="mistral", layout="transformers<4.52")), "--json"))
    assert (r["family"], r["text_model"], r["layout"]) == ("bakllava", "mistral", "transformers<4.52")
