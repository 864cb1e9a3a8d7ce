"""GGUF files llama.cpp or libmtmd would abort on (GGML_ASSERT: the process dies) or refuse in a way we did not
catch never reach them: `chat` and `quantize` refuse them first with one line naming the defect, as `inspect`
reports it (llava_gguf/gguf_checks.py). Each case is a real conversion with one field changed, as the fuzz
tests found it (tests/test_fuzz_gguf.py); the commands run in a child process (the real CLI), since without
the check the process aborts."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import pytest

from support import run_cli
from support import rewrite_gguf
from fuzz.mutate import set_gguf_field
from llava_gguf.errors import LlavaGgufError
from llava_gguf.checks.inspect import inspect_path


def _edit(src: Path, dest: Path, key: str, kind: str, value, nth: int = 0) -> Path:
    dest.write_bytes(set_gguf_field(src.read_bytes(), key, kind, value, nth))
    return dest


def _refused(p, *words: str) -> None:
    """Exit 1, no report, one line `error: ...` holding `words` (outside paths), no traceback."""
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert not p.stdout.strip(), p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    text = re.sub(r"/\S+", "", lines[0])
    for w in words:
        assert w in text, lines[0]


def _chat(llm: Path, mmproj: Path):
    return run_cli("chat", str(llm), "--mmproj", str(mmproj), "--prompt", "hi", "--max-tokens", "2", "--threads", "1",
                   env={"GGML_NO_BACKTRACE": "1"}, timeout=120)


def _quantize(src: Path, out: Path):
    return run_cli("quantize", str(src), "--type", "Q8_0", "-o", str(out), env={"GGML_NO_BACKTRACE": "1"}, timeout=120)


def _codes(path: Path) -> list[str]:
    return [d["code"] for d in inspect_path(path)["defects"]]


@pytest.fixture(scope="module")
def pair(tiny, converted) -> tuple[Path, Path]:
    return converted(tiny())


# ------------------------------------------------------------------ 1. hparams llama.cpp asserts on
@pytest.mark.parametrize("blocks", [0, 1000])
def test_block_count_llama_cpp_asserts_on_is_refused(pair, tmp_path, blocks):
    """llama-model.cpp GGML_ASSERT(n_layer in (0, LLAMA_MAX_LAYERS]) aborted chat and quantize (exit 134)."""
    llm, mmproj = pair
    bad = _edit(llm, tmp_path / f"blocks{blocks}.gguf", "llama.block_count", "u32", blocks)
    assert "hparam-invalid" in _codes(bad)
    _refused(_chat(bad, mmproj), "hparam-invalid", f"block_count is {blocks}")
    _refused(_quantize(bad, tmp_path / "out.gguf"), "hparam-invalid", f"block_count is {blocks}")
    assert not (tmp_path / "out.gguf").exists()
    _refused(run_cli("imatrix", str(bad), "-o", str(tmp_path / "imatrix.gguf"), env={"GGML_NO_BACKTRACE": "1"},
                     timeout=120), "hparam-invalid", f"block_count is {blocks}")
    assert not (tmp_path / "imatrix.gguf").exists()


@pytest.mark.parametrize("key,value,vtype,words", [
    ("llama.rope.scaling.type", "bogus", gguf.GGUFValueType.STRING, "rope.scaling.type 'bogus'"),
    ("llama.expert_used_count", 2, gguf.GGUFValueType.UINT32, "expert_used_count 2"),
    ("llama.nextn_predict_layers", 100, gguf.GGUFValueType.UINT32, "nextn_predict_layers 100"),
])
def test_other_hparams_llama_cpp_asserts_on_are_refused(pair, tmp_path, key, value, vtype, words):
    """llama_model_base::load_hparams' other GGML_ASSERTs on values a file sets."""
    llm, mmproj = pair
    bad = rewrite_gguf(llm, tmp_path / "extra.gguf", set_keys={key: (value, vtype)})
    assert _codes(bad) == ["hparam-invalid"]
    _refused(_chat(bad, mmproj), "hparam-invalid", words)


def test_mmproj_without_its_projector_tensor_is_refused(pair, tmp_path):
    """An mmproj without mm.2.weight: libmtmd loaded it and chat died of SIGSEGV (exit 139)."""
    llm, mmproj = pair
    bad = _edit(mmproj, tmp_path / "no-mm2.gguf", "mm.2.weight", "name", b"mm+2")
    assert "tensor-missing" in _codes(bad)
    _refused(_chat(llm, bad), "tensor-missing", "mm.2.weight")


# ------------------------------------------------------------------------------ 2. the vocabulary
def test_duplicate_token_is_a_defect_and_refused(pair, tmp_path):
    """Two equal token texts: llama-vocab.cpp GGML_ASSERT(id_to_token.size() == token_to_id.size()) aborted
    chat; quantize copied the vocabulary on; inspect said "no defects"."""
    llm, mmproj = pair
    bad = _edit(llm, tmp_path / "dup.gguf", "tokenizer.ggml.tokens", "string", b"<0x00>", 4)  # token 4: <0x01>
    assert _codes(bad) == ["vocab-duplicate-token"]
    _refused(_chat(bad, mmproj), "vocab-duplicate-token", "'<0x00>' (ids 3 and 4)")
    _refused(_quantize(bad, tmp_path / "out.gguf"), "vocab-duplicate-token")
    assert not (tmp_path / "out.gguf").exists()


def test_duplicate_token_as_llama_cpp_reads_it(pair, tmp_path):
    """llama.cpp reads a token as a C string (to its first NUL), so "<s>\\x001>" is token 1's "<s>"."""
    llm, _ = pair
    bad = _edit(llm, tmp_path / "nul.gguf", "tokenizer.ggml.tokens", "string", b"<s>\0", 4)
    assert _codes(bad) == ["vocab-duplicate-token"]
    assert "'<s>' (ids 1 and 4)" in inspect_path(bad)["defects"][0]["message"]


# ---------------------------------------------------------------------------- 3. the chat template
def test_template_that_is_not_jinja_is_a_defect_and_refused(pair, tmp_path):
    """llama-cpp-python's Llama() compiled it and raised jinja2's TemplateSyntaxError (a traceback); chat
    now refuses the model at load (it does not guess another prompt format), with one line."""
    llm, mmproj = pair
    bad = _edit(llm, tmp_path / "tpl.gguf", "tokenizer.chat_template", "string", b"{#")
    assert _codes(bad) == ["chat-template-invalid"]
    _refused(_chat(bad, mmproj), "chat-template-invalid", "not valid Jinja")
    p = run_cli("inspect", str(bad))
    assert p.returncode == 1 and "DEFECT chat-template-invalid" in p.stdout, p.stdout + p.stderr
    # llama.cpp's quantizer does not read the template: quantize runs, and says chat will refuse the result
    p = _quantize(bad, tmp_path / "out.gguf")
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "not valid Jinja" in warnings[0], p.stderr


def test_template_errors_are_one_line():
    """jinja2's TemplateSyntaxError appends the location and the source line on lines of their own."""
    from llava_gguf.gguf.chat_template import template_problem
    from llava_gguf.runtime.prompt import Message, render

    with pytest.raises(LlavaGgufError) as e:
        render("{% for m in messages %}\n{{ m }", [Message("user", "hi")], bos="", eos="")
    assert "\n" not in e.value.message and "template line 2" in e.value.message, e.value.message
    assert template_problem("{% if x %}") and "\n" not in template_problem("{% if x %}\n\nabc")
    assert template_problem(b"\xff{{ x }}") == "it is not UTF-8 (byte 0)"
    assert template_problem("{% for m in messages %}{% break %}{% endfor %}") is None  # transformers' loopcontrols


# ------------------------------------------------------------------------ 4. strings that are not UTF-8
@pytest.mark.parametrize("which,key", [("llm", "general.architecture"), ("llm", "tokenizer.chat_template"),
                                       ("mmproj", "clip.projector_type")])
def test_string_not_utf8_ends_in_one_line(pair, tmp_path, which, key):
    """gguf-py's contents() raised UnicodeDecodeError in quantize's classify and the runtime's read_gguf_info."""
    from llava_gguf.gguf.classify import classify
    from llava_gguf.gguf.info import read_gguf_info

    llm, mmproj = pair
    bad = _edit(llm if which == "llm" else mmproj, tmp_path / "bytes.gguf", key, "string", b"\xff")
    for fn, args in ((classify, (bad,)), (read_gguf_info, (bad, "model")), (inspect_path, (bad,))):
        try:
            fn(*args)
        except LlavaGgufError as e:
            assert "\n" not in e.one_line()
    if key == "tokenizer.chat_template":
        assert "chat-template-invalid" in _codes(bad)
        _refused(_chat(bad, mmproj), "chat-template-invalid", "not UTF-8")


def test_repair_copies_a_string_that_is_not_utf8(tiny, converted, tmp_path):
    """repair rewrites every key: a string that is not UTF-8 is copied as its bytes (gguf-py's contents()
    raised UnicodeDecodeError), and the repaired file keeps it."""
    from llava_gguf.gguf.repair import repair_mmproj

    _, mmproj = converted(tiny())
    r = gguf.GGUFReader(mmproj)
    w = gguf.GGUFWriter(tmp_path / "legacy.gguf", arch="clip")
    for f in r.fields.values():  # a legacy-route file (no feature layer) with a name that is not UTF-8
        if f.name in ("general.architecture", "clip.vision.feature_layer") or f.name.startswith("GGUF."):
            continue
        t = f.types[0]
        value = b"caf\xe9" if f.name == "general.name" else f.contents()
        w.add_key_value(f.name, value, t, sub_type=f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
    if "general.name" not in r.fields:
        w.add_key_value("general.name", b"caf\xe9", gguf.GGUFValueType.STRING)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = tmp_path / "legacy.gguf"
    assert "feature-layer-missing" in _codes(src)
    out = repair_mmproj(src, tmp_path / "fixed.gguf")
    assert out.fixed == ("feature-layer-missing",)
    fixed = gguf.GGUFReader(out.output)
    assert bytes(fixed.fields["general.name"].parts[-1]) == b"caf\xe9"
    assert struct.unpack("<i", bytes(fixed.fields["clip.vision.feature_layer"].parts[-1]))[0] >= 1
