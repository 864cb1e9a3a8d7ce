"""quantize as a driver: directories, convert --outtype <quant type>, importance matrices, quality
reports, and the failures around them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from support import run_cli
from llava_gguf.quantize import quantize_directory, quantize_gguf
from llava_gguf.quantize.imatrix import load_imatrix
from llava_gguf.runtime.imatrix import compute_imatrix
from llava_gguf.native import library as native

# An LLM big enough for sizes to mean something (token_embd does not dominate) and for quantizing to
# take a few seconds; rows are multiples of 256, so every type applies.
BIG = dict(text_hidden=1024, text_ff=2816, text_layers=4, text_heads=8, text_kv_heads=4)


@pytest.fixture(scope="module")
def f16_pair(tiny, converted):
    return converted(tiny(), "f16")


@pytest.fixture(scope="module")
def big_pair(tiny, converted):
    return converted(tiny(**BIG), "f16")


@pytest.fixture(scope="module")
def tiny_imatrix(f16_pair, tmp_path_factory):
    llm, _ = f16_pair
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    r = compute_imatrix(llm, out, threads=2)
    assert r.output == out and out.is_file()
    return out


def _file_type(path) -> int:
    return int(gguf.GGUFReader(path).fields["general.file_type"].contents())


def test_q4_k_m_size_on_a_real_width_model(big_pair, tmp_path):
    llm, _ = big_pair
    out = quantize_gguf(llm, "Q4_K_M", tmp_path / "big-Q4_K_M.gguf", threads=2).output
    assert _file_type(out) == 15
    ratio = out.stat().st_size / llm.stat().st_size
    assert ratio < 0.45, ratio


def test_convert_outtype_quant_type_equals_convert_then_quantize(tiny, f16_pair, tmp_path):
    ckpt = tiny()
    p = run_cli("convert", str(ckpt), "-o", str(tmp_path / "direct"), "--outtype", "q4_k_m")
    assert p.returncode == 0, p.stderr
    names = sorted(x.name for x in (tmp_path / "direct").iterdir())
    assert names == sorted([f"{ckpt.name}-Q4_K_M.gguf", f"mmproj-{ckpt.name}-F16.gguf"])  # no intermediate left
    llm, mmproj = f16_pair
    two_step = quantize_gguf(llm, "Q4_K_M", tmp_path / "two-step.gguf", threads=2).output
    assert (tmp_path / "direct" / f"{ckpt.name}-Q4_K_M.gguf").read_bytes() == two_step.read_bytes()
    assert (tmp_path / "direct" / f"mmproj-{ckpt.name}-F16.gguf").read_bytes() == mmproj.read_bytes()


def test_directory_source_keeps_or_quantizes_the_mmproj(f16_pair, tmp_path):
    from llava_gguf.gguf.pairing import locate_pair

    llm, mmproj = f16_pair
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(llm, src / "m-F16.gguf")
    shutil.copy(mmproj, src / "mmproj-m-F16.gguf")
    kept = quantize_directory(src, "q4_k_m", tmp_path / "kept", threads=2)
    assert [r.output.name for r in kept] == ["m-Q4_K_M.gguf", "mmproj-m-F16.gguf"]
    assert kept[1].output.read_bytes() == mmproj.read_bytes()
    assert locate_pair(tmp_path / "kept") == (kept[0].output, kept[1].output)
    p = run_cli("quantize", str(src), "--type", "Q8_0", "--mmproj-type", "q8_0")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in src.iterdir()) == ["m-F16.gguf", "m-Q8_0.gguf", "mmproj-m-F16.gguf",
                                                       "mmproj-m-Q8_0.gguf"]
    assert _file_type(src / "mmproj-m-Q8_0.gguf") == 7
    # the same directory again: the default output exists
    again = run_cli("quantize", str(src), "--type", "Q8_0")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_imatrix_file_and_metadata(tiny_imatrix, f16_pair):
    im = load_imatrix(tiny_imatrix)
    llm, _ = f16_pair
    names = {t.name for t in gguf.GGUFReader(llm).tensors}
    assert im.entries and set(im.entries) <= names
    assert "blk.0.ffn_down.weight" in im.entries
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in im.entries.values())
    assert im.chunk_count >= 1


@pytest.mark.parametrize("qtype", ["IQ2_XS", "Q4_K_M"])
def test_imatrix_quantization_byte_identical_to_native(f16_pair, tiny_imatrix, tmp_path, qtype):
    llm, mmproj = f16_pair
    ours = quantize_gguf(llm, qtype, tmp_path / f"ours-{qtype}.gguf", imatrix=str(tiny_imatrix), threads=2).output
    tool = native.configure().tools_dir / "llama-quantize"
    theirs = tmp_path / f"native-{qtype}.gguf"
    p = subprocess.run([str(tool), "--imatrix", str(tiny_imatrix), str(llm), str(theirs), qtype, "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert ours.read_bytes() == theirs.read_bytes()
    fields = gguf.GGUFReader(ours).fields
    assert fields["quantize.imatrix.file"].contents() == str(tiny_imatrix)
    if qtype == "IQ2_XS":
        from llava_gguf import LLaVA
        from devkit.tiny import sample_image

        with LLaVA(ours, mmproj) as m:
            assert m.generate_from_image(sample_image(112), "What is in the image?", temperature=0, max_tokens=4)


def test_imatrix_cli_and_refusals(f16_pair, tmp_path):
    llm, mmproj = f16_pair
    out = tmp_path / "im.gguf"
    p = run_cli("imatrix", str(llm), "-o", str(out), "--chunks", "2", "--json")
    assert p.returncode == 0, p.stderr
    assert load_imatrix(out).chunk_count == 2
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    for args, words in [((str(mmproj), "-o", str(tmp_path / "x.gguf")), "mmproj"),
                        ((str(llm), "-o", str(tmp_path / "x.gguf"), "--text", str(short)), "give a longer text"),
                        ((str(llm), "-o", str(out)), "already exists")]:
        bad = run_cli("imatrix", *args)
        assert bad.returncode == 1 and words in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["im.gguf", "short.txt"]


def test_imatrix_calibrates_on_images_too(f16_pair, tmp_path):
    from devkit.tiny import sample_image

    llm, _ = f16_pair
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    sample_image(112, seed=1).save(imgs / "a.png")
    sample_image(150, seed=2).convert("RGBA").save(imgs / "b.webp")  # any Pillow format, alpha flattened
    (imgs / "notes.txt").write_text("not an image")
    text_only = compute_imatrix(llm, tmp_path / "text.gguf", n_ctx=128, chunks=2, threads=2)
    with_images = compute_imatrix(llm, tmp_path / "img.gguf", images=imgs, n_ctx=128, chunks=2, threads=2)
    assert (text_only.images, with_images.images) == (0, 2)
    a, b = load_imatrix(text_only.output), load_imatrix(with_images.output)
    assert set(a.entries) == set(b.entries)
    name = "blk.0.attn_q.weight"
    assert a.entries[name].shape == b.entries[name].shape
    assert not np.allclose(a.entries[name], b.entries[name])  # the image rows moved the statistics
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli("imatrix", str(llm), "-o", str(tmp_path / "x.gguf"), "--images", str(empty))
    assert p.returncode == 1 and "no images" in p.stderr and not (tmp_path / "x.gguf").exists()


def test_quality_same_model_is_exact(f16_pair, tmp_path):
    from llava_gguf.checks.quality import measure_quality

    llm, mmproj = f16_pair
    copy = shutil.copy(llm, tmp_path / "copy-F16.gguf")
    r = measure_quality(llm, copy, tokens=6)
    assert r.pairs == 4 and r.positions >= 4
    assert r.kl_mean == 0.0 and r.kl_max == 0.0
    assert r.top1 == 1.0 and r.same_answers == r.pairs
    assert r.mmproj_cosine_mean is None  # one mmproj for both


def test_quality_of_q4_k_m_and_a_quantized_mmproj(f16_pair, tmp_path):
    import json

    llm, mmproj = f16_pair
    q4 = quantize_gguf(llm, "Q4_K_M", tmp_path / "m-Q4_K_M.gguf", threads=2).output
    mm8 = quantize_gguf(mmproj, "Q8_0", tmp_path / "mmproj-m-Q8_0.gguf", threads=2).output
    p = run_cli("quality", str(llm), str(q4), "--mmproj", str(mm8), "--tokens", "6", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["kl_mean"] > 0 and r["kl_max"] >= r["kl_mean"]
    assert 0.0 <= r["top1"] <= 1.0 and r["positions"] >= r["pairs"]
    assert 0.99 <= r["mmproj_cosine_mean"] <= 1.0 + 1e-6
    assert r["base_mmproj"] == str(mmproj) and r["mmproj"] == str(mm8)


def test_bad_inputs_are_one_line_and_leave_nothing(f16_pair, tmp_path, tiny_imatrix):
    llm, mmproj = f16_pair
    work = tmp_path / "w"
    work.mkdir()
    text = work / "notes.gguf"
    text.write_text("not a gguf at all\n")
    q8 = quantize_gguf(llm, "Q8_0", work / "m-Q8_0.gguf", threads=2).output
    before = sorted(x.name for x in work.iterdir())
    cases = [
        (("quantize", str(text), "--type", "Q4_K_M"), "not a readable GGUF"),
        (("quantize", str(tiny_imatrix), "--type", "Q4_K_M", "-o", str(work / "x.gguf")), "neither"),
        (("quantize", str(llm), "--type", "Q4_K_Z", "-o", str(work / "x.gguf")), "unknown quantization type"),
        (("quantize", str(mmproj), "--type", "IQ4_XS", "-o", str(work / "x.gguf")), "mmproj"),
        (("quantize", str(q8), "--type", "Q4_K_M"), "already quantized"),
        (("quantize", str(llm), "--type", "IQ2_XXS", "-o", str(work / "x.gguf")), "llava-gguf imatrix"),
        (("quantize", str(llm), "--type", "Q4_K_M", "--imatrix", str(text), "-o", str(work / "x.gguf")),
         "not a readable importance matrix"),
        (("quantize", str(llm), "--type", "Q4_K_M", "-o", str(work / "missing" / "sub" / "x.gguf")), None),
        (("quantize", str(work / "nothing.gguf"), "--type", "Q4_K_M"), "does not exist"),
        (("quantize", str(llm), "--type", "Q4_K_M", "-o", str(text / "x.gguf")), "not a directory"),
        (("quality", str(mmproj), str(llm)), "is an mmproj file, not a language model"),
        (("quality", str(llm), str(llm), "--mmproj", str(llm)), "is a language model, not an mmproj"),
        (("convert", "--help-me",), None),
    ]
    for args, words in cases:
        p = run_cli(*args)
        if words is None and args[0] == "quantize":  # a missing output directory is created, like convert's
            assert p.returncode == 0, p.stderr
            shutil.rmtree(work / "missing")
            continue
        assert p.returncode != 0, args
        assert len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        if words:
            assert words in p.stderr, (args, p.stderr)
    assert sorted(x.name for x in work.iterdir()) == before
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        p = run_cli("quantize", str(llm), "--type", "Q8_0", "-o", str(ro / "x.gguf"))
        assert p.returncode == 1 and "cannot write" in p.stderr and not list(ro.iterdir())


def test_ctrl_c_during_native_quantization_leaves_nothing(big_pair, tmp_path):
    llm, _ = big_pair
    out = tmp_path / "x-IQ3_S.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", "quantize", str(llm), "--type", "IQ3_S", "-o",
                             str(out), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(tmp_path.glob(".x-IQ3_S.gguf.*.partial"))  # the hidden exclusive temporary (outputs.py)
        if temps and temps[0].exists() and temps[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "quantization ended before it could be interrupted"
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert time.monotonic() - t0 < 5  # at once, not when llama.cpp is done
    time.sleep(0.5)
    assert list(tmp_path.iterdir()) == []
