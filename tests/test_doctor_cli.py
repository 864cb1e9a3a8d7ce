"""doctor, chat and demo through the real CLI."""
from __future__ import annotations

import json

from conftest import run_cli
from llava_gguf.tiny import sample_image


def _last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


def test_doctor_reports_our_fixed_libraries():
    p = run_cli("doctor", "--json")
    assert p.returncode == 0, p.stderr
    report = _last_json(p.stdout)
    assert report["llava_fix"] is True
    assert report["llama_cpp_python"] == "0.3.36"
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


def test_demo_measures_parity(tmp_path):
    p = run_cli("demo", "--json", env={"LLAVA_GGUF_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    result = _last_json(p.stdout)
    assert result["cosine"] >= 0.999
    assert result["image_tokens"] == 64
    assert isinstance(result["answer"], str)
