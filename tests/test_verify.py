"""`verify`: the parity check for users, run as a user would (the CLI in a child process) on real tiny
checkpoints and their conversions."""
from __future__ import annotations

import json

from support import run_cli
from devkit.tiny import make_tiny_liuhaotian, sample_image


def _json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_verify_passes_and_stock_fails(tiny, converted, tmp_path):
    ckpt = tiny()
    llm, mmproj = converted(ckpt, "f16")
    images = tmp_path / "images"
    images.mkdir()
    sample_image(150, seed=1).crop((0, 0, 150, 90)).save(images / "wide.png")  # non-square: padded on both sides
    sample_image(112, seed=2).save(images / "square.jpg")
    p = run_cli("verify", str(ckpt), str(llm.parent), "--images", str(images), "--tokens", "8", "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["passed"] and r["images"] == ["square.jpg", "wide.png"] and r["reference_dtype"] == "float32"
    assert r["cosine_min"] >= 0.9999 and r["top1"] == 1.0 and r["greedy_identical"] == 2 and r["kl_max"] < 1e-3
    text = run_cli("verify", str(ckpt), str(llm.parent))
    assert text.returncode == 0 and "PASS" in text.stdout and "identical greedy answers 3/3" in text.stdout
    # what a 7B on 24 GB gets: the language model in bfloat16, the image path still exact in float32
    p = run_cli("verify", str(ckpt), str(llm.parent), "--reference-dtype", "bfloat16", "--tokens", "8", "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["reference_dtype"] == "bfloat16 language model" and r["cosine_min"] >= 0.9999 and r["kl_mean"] < 0.01
    # the unpatched libmtmd (what other llama.cpp-based apps run) on the same files: the CLS defect shows
    stock = run_cli("verify", str(ckpt), str(llm.parent), "--runtime", "stock", "--json")
    assert stock.returncode == 1
    r = _json(stock)
    assert not r["passed"] and r["cosine_mean"] < 0.9 and r["runtime"] == "stock"
    print(f"verify: stock libmtmd cosine {r['cosine_mean']:.4f}")


def test_verify_original_layout_v1(tiny, tmp_path):
    """The original layout with a separate CLIP tower and LLaVA v1's linear projector: the reference is
    built from the same view of the checkpoint the converter reads (the nn.Linear, not the GELU pair)."""
    hf = tiny(dtype="float16")
    lh = make_tiny_liuhaotian(hf, tmp_path / "llava-v1", tmp_path / "clip", weights_format="safetensors",
                              linear_projector=True)
    (tmp_path / "clip" / "preprocessor_config.json").unlink()  # as CLIPVisionModel.save_pretrained leaves it
    out = tmp_path / "out"
    assert run_cli("convert", str(lh), "--clip", str(tmp_path / "clip"), "-o", str(out)).returncode == 0
    p = run_cli("verify", str(lh), str(out), "--clip", str(tmp_path / "clip"), "--tokens", "8", "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["passed"] and r["cosine_min"] >= 0.9999 and r["greedy_identical"] == 3


def test_verify_bad_input(tiny, converted, tmp_path):
    llm, mmproj = converted(tiny(), "f16")
    other = tiny(image_size=224, patch_size=16, vision_hidden=128, vision_layers=5, vision_heads=8)
    for args, words in [
        (("verify", str(other), str(llm.parent)), "is OUTDIR converted from SRC?"),
        (("verify", str(tiny()), str(llm.parent), "--runtime", "bogus"), "--runtime 'bogus'"),
        (("verify", str(tiny()), str(llm.parent), "--images", str(tmp_path)), "holds no files"),
        (("verify", str(tiny()), str(tmp_path / "nope")), "does not exist"),
    ]:
        p = run_cli(*args, "--json")
        assert p.returncode == 1, args
        assert not p.stdout.strip(), "a refusing command prints no report"
        assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


def test_verify_llava16_follows_config_pinpoints(tiny, converted, tmp_path):
    """LLaVA-NeXT whose preprocessor_config.json is a plain CLIPImageProcessor's (no grid): the reference
    tiles with config.json's image_grid_pinpoints, as transformers' LlavaNext model and the mmproj do (it
    took transformers' default grid and reported a false FAIL). A grid in preprocessor_config.json that
    disagrees with config.json is one warning line and a report field; config.json still decides."""
    import shutil

    ckpt = tmp_path / "next"
    shutil.copytree(tiny(anyres=True), ckpt)
    pre_path = ckpt / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre.pop("image_grid_pinpoints")
    pre.pop("do_pad", None)
    pre["image_processor_type"] = "CLIPImageProcessor"
    pre_path.write_text(json.dumps(pre))
    llm, mmproj = converted(ckpt, "f32")
    p = run_cli("verify", str(ckpt), str(llm.parent), "--tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["passed"] and r["cosine_min"] >= 0.9999 and r["grid_pinpoints_conflict"] is None
    assert "warning" not in p.stderr

    config_pins = json.loads((ckpt / "config.json").read_text())["image_grid_pinpoints"]
    pre["image_grid_pinpoints"] = [[112, 224], [224, 112]]
    pre_path.write_text(json.dumps(pre))
    p = run_cli("verify", str(ckpt), str(llm.parent), "--tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    r = _json(p)
    assert r["passed"] and r["cosine_min"] >= 0.9999
    assert r["grid_pinpoints_conflict"] == {"config.json": config_pins,
                                            "preprocessor_config.json": [[112, 224], [224, 112]]}
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "image_grid_pinpoints" in warnings[0] and "config.json" in warnings[0], p.stderr
