"""quantize: llama.cpp's quantizer in process, byte-identical to the native llama-quantize."""
from __future__ import annotations

import subprocess

import gguf
import pytest

from support import run_cli
from llava_gguf.quantize import find_type, output_path, quantize_gguf
from llava_gguf.native import library as native
from devkit.tiny import sample_image


@pytest.fixture(scope="module")
def f16_pair(tiny, converted):
    return converted(tiny(), "f16")


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0", "Q5_K_M"])
def test_byte_identical_to_native_llama_quantize(f16_pair, tmp_path, qtype):
    llm, _ = f16_pair
    ours = quantize_gguf(llm, qtype.lower(), tmp_path / f"ours-{qtype}.gguf", threads=2).output
    tool = native.configure().tools_dir / "llama-quantize"
    theirs = tmp_path / f"native-{qtype}.gguf"
    p = subprocess.run([str(tool), str(llm), str(theirs), qtype, "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ours.read_bytes() == theirs.read_bytes()


def test_q4_k_m_loads_and_answers(f16_pair, tmp_path):
    from llava_gguf import LLaVA

    llm, mmproj = f16_pair
    out = quantize_gguf(llm, "Q4_K_M", tmp_path / "m-Q4_K_M.gguf").output
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 15
    assert out.stat().st_size < llm.stat().st_size
    with LLaVA(out, mmproj) as m:
        answer = m.generate_from_image(sample_image(112), "What is in the image?", temperature=0, max_tokens=6)
    assert isinstance(answer, str) and answer


def test_default_output_name_replaces_the_type_suffix():
    from pathlib import Path

    assert output_path(Path("/x/llava-F16.gguf"), find_type("q4_k_m")) == Path("/x/llava-Q4_K_M.gguf")
    assert output_path(Path("/x/llava.gguf"), find_type("Q8_0")) == Path("/x/llava-Q8_0.gguf")


def test_cli_quantize_and_refusals(f16_pair, tmp_path):
    import shutil

    llm, mmproj = f16_pair
    src = shutil.copy(llm, tmp_path / "m-F16.gguf")
    p = run_cli("quantize", str(src), "--type", "q8_0")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m-Q8_0.gguf").is_file()
    again = run_cli("quantize", str(src), "--type", "Q8_0")
    assert again.returncode != 0 and "already exists" in again.stderr
    for args, words in [(("--type", "IQ2_XS"), "importance matrix"), (("--type", "Q9_X"), "unknown quantization type")]:
        bad = run_cli("quantize", str(src), *args)
        assert bad.returncode != 0 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    mm = run_cli("quantize", str(mmproj), "--type", "Q3_K_S", "-o", str(tmp_path / "mm.gguf"))
    assert mm.returncode != 0 and "mmproj" in mm.stderr and not (tmp_path / "mm.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-F16.gguf", "m-Q8_0.gguf"]


def test_list_types():
    p = run_cli("quantize", "--list")
    assert p.returncode == 0
    names = [line.split()[0] for line in p.stdout.splitlines()]
    assert {"Q4_K_M", "Q8_0", "Q5_K_M", "IQ4_XS", "F16", "BF16"} <= set(names)


def test_mmproj_quantization(tiny, converted, tmp_path):
    """A tower of real width (hidden 256): Q8_0 stays close to F16 and is much smaller."""
    import numpy as np

    from llava_gguf import LLaVA
    from llava_gguf.checks.metrics import mean_cosine

    llm, mmproj = converted(tiny(vision_hidden=256, vision_heads=4), "f16")
    image = sample_image(112, seed=2)
    with LLaVA(llm, mmproj) as m:
        base = m.embed_image(image)
    for qtype, bound in (("Q8_0", 0.99), ("Q4_K_M", 0.98)):
        out = quantize_gguf(mmproj, qtype, tmp_path / f"mmproj-{qtype}.gguf").output
        with LLaVA(llm, out) as m:
            emb = m.embed_image(image)
        assert emb.shape == base.shape and np.isfinite(emb).all()
        assert mean_cosine(emb, base) >= bound
        if qtype == "Q8_0":
            assert out.stat().st_size < 0.6 * mmproj.stat().st_size
