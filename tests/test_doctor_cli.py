"""doctor, chat and demo through the real CLI."""
from __future__ import annotations

import json

import pytest

from llava_gguf.settings import LLAMA_CPP_PYTHON_VERSION
from support import run_cli
from devkit.tiny import sample_image


def _last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


def test_doctor_reports_our_fixed_libraries():
    p = run_cli("doctor", "--json")
    assert p.returncode == 0, p.stderr
    report = _last_json(p.stdout)
    assert report["llava_fix"] is True
    assert report["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION
    from pathlib import Path

    for key in ("llama_cpp_lib_path", "mtmd_lib_path"):
        d = Path(report[key])
        assert d.is_dir() and any(d.glob("lib*")), report[key]
    assert report["cpu_features"] and all(isinstance(f, str) for f in report["cpu_features"])
    assert any(dev["type"] == "cpu" for dev in report["devices"])


def test_doctor_detects_the_stock_library():
    """llava_fix comes from asking the loaded libmtmd, so pointing at the stock one flips it."""
    p = run_cli("doctor", "--json", env={"LLAVA_GGUF_MTMD": "stock"})
    assert p.returncode == 0, p.stderr
    report = _last_json(p.stdout)
    assert report["llava_fix"] is False
    assert report["mtmd_lib_path"].endswith("stock")


def test_doctor_paths_work_for_a_process_that_never_imports_llava_gguf():
    import os
    import subprocess
    import sys

    report = _last_json(run_cli("doctor", "--json").stdout)
    code = ("import llama_cpp, llama_cpp.mtmd_cpp as m; "
            "print(llama_cpp.llama_cpp._lib._name); print(m._libmtmd._name)")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": report["llama_cpp_lib_path"], "MTMD_CPP_LIB": report["mtmd_lib_path"]}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    llama, mtmd = p.stdout.split()
    assert llama.startswith(report["llama_cpp_lib_path"]) and mtmd.startswith(report["mtmd_lib_path"])


def test_chat_answers_once(tiny, converted, tmp_path):
    ckpt = tiny()
    llm, _ = converted(ckpt, "f16")
    img = tmp_path / "img.png"
    sample_image(112, seed=5).save(img)
    args = ("chat", str(llm.parent), "--image", str(img), "--prompt", "What is in the image?", "--temp", "0",
            "--max-tokens", "8", "--seed", "1")
    p1, p2 = run_cli(*args), run_cli(*args)
    assert p1.returncode == 0, p1.stderr
    assert p1.stdout.strip() and p1.stdout == p2.stdout  # greedy: an answer, and the same one twice
    assert "Traceback" not in p1.stderr


def test_chat_renders_the_gguf_template(tiny, converted):
    from llava_gguf import LLaVA
    from llava_gguf.runtime.prompt import Message

    llm, mmproj = converted(tiny(), "f16")
    with LLaVA(llm, mmproj) as m:
        text = m.render([Message("user", "What is in the image?", n_images=1)])
    # llava-hf's template from the checkpoint: image first, no hard-coded system prompt
    assert text == "USER: <image>\nWhat is in the image? ASSISTANT:"


def test_chat_rejects_a_mismatched_pair(tiny, converted, tmp_path):
    llm, _ = converted(tiny(), "f16")
    _, other_mmproj = converted(tiny(text_hidden=512, text_ff=1024), "f16")
    img = tmp_path / "img.png"
    sample_image(112).save(img)
    p = run_cli("chat", str(llm), "--mmproj", str(other_mmproj), "--image", str(img), "--prompt", "hi")
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and "not a pair" in p.stderr


def test_chat_bad_image(tiny, converted, tmp_path):
    llm, _ = converted(tiny(), "f16")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    p = run_cli("chat", str(llm.parent), "--image", str(bad), "--prompt", "hi")
    assert p.returncode != 0 and "not an image" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return {"LLAVA_GGUF_CACHE": str(tmp_path_factory.mktemp("demo-cache"))}


def test_demo_answers_questions_correctly(demo_cache):
    """The shipped model, converted and quantized by the demo, answers questions about test images it
    never saw; the accuracy lines are asserted, not just printed."""
    import re

    p = run_cli("demo", env=demo_cache)
    assert p.returncode == 0, p.stderr
    assert "converting" in p.stdout and "quantizing to Q4_K_M" in p.stdout
    acc = dict(re.findall(r"^(F16|Q4_K_M) accuracy: ([\d.]+)% \(\d+/24\)$", p.stdout, re.M))
    assert set(acc) == {"F16", "Q4_K_M"}, p.stdout
    # 96.8% right on the whole test split (chance ~30%): at most three of the 24 wrong
    assert float(acc["F16"]) >= 87.5 and float(acc["Q4_K_M"]) >= 87.5, p.stdout
    cos = float(re.search(r"image-feature cosine vs Hugging Face \(F16\): ([\d.]+)", p.stdout).group(1))
    assert cos >= 0.9999
    assert p.stdout.count("truth:") >= 3  # some questions shown with answer and truth
    # cached: the second run converts and quantizes nothing, and gives the same figures
    p = run_cli("demo", env=demo_cache)
    assert p.returncode == 0, p.stderr
    assert "converting" not in p.stdout and "quantizing" not in p.stdout
    assert dict(re.findall(r"^(F16|Q4_K_M) accuracy: ([\d.]+)%", p.stdout, re.M)) == acc
    p = run_cli("demo", "--json", "--questions", "5", env=demo_cache)
    assert p.returncode == 0, p.stderr
    result = _last_json(p.stdout)
    assert result["accuracy"]["F16"]["n"] == 5 and result["image_tokens"] == 36


def test_demo_on_your_image_and_your_model(demo_cache, tiny, tmp_path, monkeypatch):
    from llava_gguf.demo import shapes
    from llava_gguf.demo.run import run_demo
    from llava_gguf.errors import LlavaGgufError

    img = tmp_path / "mine.png"
    sc = shapes.scene("test", 3)
    sc.image().save(img)
    p = run_cli("demo", "--image", str(img), "--prompt", "How many shapes are there?", env=demo_cache)
    assert p.returncode == 0, p.stderr
    answer = next(line for line in p.stdout.splitlines() if line.startswith("answer:"))
    assert shapes.is_correct(answer[len("answer:"):], shapes.COUNTS[len(sc.shapes) - 1]), p.stdout
    # mistakes are one line, before any work
    for args, says in ((["--image", str(tmp_path / "missing.png")], "missing.png"),
                       (["--prompt", "Hi?"], "--prompt needs --image"),
                       (["--model", str(tmp_path / "nowhere")], "nowhere")):
        p = run_cli("demo", *args, env=demo_cache)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    monkeypatch.setattr("llava_gguf.demo.run.SHIPPED_MODEL", tmp_path / "gone")
    with pytest.raises(LlavaGgufError, match="shipped demo model is missing"):
        run_demo(None, None, None, echo=lambda s: None)
    # any checkpoint: one question, image features measured against the reference
    p = run_cli("demo", "--model", str(tiny()), "--json", env=demo_cache)
    assert p.returncode == 0, p.stderr
    result = _last_json(p.stdout)
    assert result["cosine"] >= 0.999 and isinstance(result["answer"], str)
