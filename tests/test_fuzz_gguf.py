"""Property-based fuzzing of GGUF reading: inspect, quantize's classify and the runtime's read_gguf_info in
process, and LLaVA construction and quantizing (llama.cpp and libmtmd loading the file) in a child process,
since a mutated GGUF given to llama.cpp can abort or segfault. The property, the settings and the mutation
steps are those of test_fuzz_properties.py (fuzz/properties.py); a case marked FOUND is a past finding
of fuzzing, kept as a regression case (the comment names the file that was fixed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz.mutate import apply, gguf_slots
from fuzz.properties import Hang, ends_well, fuzz_settings, steps, time_limit


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-gguf")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def gguf_bases(tiny, converted) -> dict[str, tuple[bytes, list, int]]:
    """Real conversions (LLM and mmproj of llava-1.5, the anyres mmproj) with their header fields."""
    llm, mmproj = converted(tiny())
    _, anyres_mmproj = converted(tiny(anyres=True))
    out = {}
    for name, path in (("llm", llm), ("mmproj", mmproj), ("anyres-mmproj", anyres_mmproj)):
        data = path.read_bytes()
        slots, header_end = gguf_slots(data)
        assert slots and header_end > 100, name
        out[name] = (data, slots, header_end)
    return out


def _gguf_readers(path: Path, limit: float = 10.0):
    from llava_gguf.checks.inspect import inspect_path
    from llava_gguf.cli.render import inspect_lines as render
    from llava_gguf.gguf.classify import classify
    from llava_gguf.gguf.info import read_gguf_info

    report = ends_well(inspect_path, path, limit=limit)
    if isinstance(report, dict):
        render(report)
        json.dumps(report)
    ends_well(classify, path, limit=limit)
    ends_well(read_gguf_info, path, "model", limit=limit)


# What fuzzing found, as one named header field set to one edge value.
# - a huge array length (or a value's type turned into ARRAY, so that its bytes are read as an array header)
#   made gguf-py 0.19's GGUFReader loop over empty reads past the end of the file for ever, growing memory:
#   inspect, quantize and chat hung. Fixed during issue 23 (runtime/gguf_info.py open_gguf walks the
#   structure first, gguf_layout.check_loadable); these cases stay as its regression tests.
# - llama.block_count 2**32 - 1 raised MemoryError in read_gguf_info (a per-layer tuple sized by the untrusted
#   count). Fixed the same way (_MAX_LAYERS).
# - FOUND (fixed): a string value that is not UTF-8 (general.architecture, tokenizer.chat_template,
#   clip.projector_type) raises UnicodeDecodeError from gguf-py's ReaderField.contents(), called by the
#   `field()` helpers of runtime/gguf_info.py read_gguf_info and quantize/__init__.py classify (inspect decodes
#   with "replace" and is fine). Fix: decode strings with errors="replace" there, or refuse the file in
#   open_gguf's structure walk with one line naming the key.
GGUF_CASES = {
    "scores-length-2**32": ("llm", "tokenizer.ggml.scores", "alen", 2**32),
    "architecture-typed-array": ("llm", "general.architecture", "vtype", 9),
    "image-mean-length-2**32-1": ("mmproj", "clip.vision.image_mean", "alen", 2**32 - 1),
    "block-count-2**32-1": ("llm", "llama.block_count", "u32", 2**32 - 1),
    "architecture-not-utf8": ("llm", "general.architecture", "string", b"\xff"),
    "chat-template-not-utf8": ("llm", "tokenizer.chat_template", "string", b"\xff"),
    "projector-type-not-utf8": ("mmproj", "clip.projector_type", "string", b"\xff"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_fuzzing_findings(gguf_bases, scratch, case):
    from fuzz.mutate import set_gguf_field

    base, key, kind, value = GGUF_CASES[case]
    path = _write(scratch / f"case-{case}.gguf", set_gguf_field(gguf_bases[base][0], key, kind, value))
    _gguf_readers(path, limit=5)


@given(base=st.sampled_from(["llm", "mmproj", "anyres-mmproj"]), mutation=steps)
@fuzz_settings(120)
def test_gguf_mutations_inspect_quantize_chat(gguf_bases, scratch, base, mutation):
    data, slots, header_end = gguf_bases[base]
    path = _write(scratch / f"mutated-{base}.gguf", apply(data, mutation, slots, header_end))
    _gguf_readers(path)


@given(data=st.binary(max_size=200))
@example(b"GGUF\x03\x00\x00\x00" + bytes(16))
@example(b"GGUF\x03\x00\x00\x00" + (0).to_bytes(8, "little") + (1).to_bytes(8, "little"))
@fuzz_settings(60)
def test_gguf_arbitrary_bytes(scratch, data):
    _gguf_readers(_write(scratch / "arbitrary.gguf", b"GGUF" + data[4:] if data[:1] == b"G" else data))


_WORKER = r"""
import json, os, sys, traceback
# answers go to the original stdout; anything native code prints (llama.cpp's logs, an abort's message)
# goes to stderr, the worker's log
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
from llava_gguf.errors import LlavaGgufError
from llava_gguf.quantize import quantize_gguf
from llava_gguf.runtime.model import LLaVA
for line in sys.stdin:
    op, a, b = json.loads(line)
    try:
        if op == "chat":
            LLaVA(a, b, n_ctx=256, n_threads=1).close()
        else:
            quantize_gguf(a, "Q8_0", b, force=True)
        out = {"result": "ok"}
    except LlavaGgufError as e:
        out = {"result": "error", "message": str(e)}
    except BaseException:
        out = {"result": "exception", "traceback": traceback.format_exc()}
    print(json.dumps(out), file=answers, flush=True)
"""


class NativeLoader:
    """LLaVA construction (gguf-py reading, then llama.cpp and libmtmd loading) in a child process that
    survives from one input to the next, restarted after a crash: a mutated GGUF given to llama.cpp may
    abort or segfault, which must not take the test run down with it."""

    def __init__(self, scratch: Path) -> None:
        self.log = scratch / "native-worker.log"
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        import resource

        def limits() -> None:  # a file declaring huge tensors must not take the machine's memory
            resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

        # GGML_NO_BACKTRACE: an abort in ggml would otherwise attach gdb to print a backtrace (seconds each)
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), text=True, preexec_fn=limits,
                                     env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        return self.proc

    def load(self, llm: Path, mmproj: Path, timeout: float = 60) -> dict:
        """LLaVA(llm, mmproj), as chat constructs it."""
        return self.run("chat", llm, mmproj, timeout)

    def quantize(self, src: Path, out: Path, timeout: float = 60) -> dict:
        """quantize_gguf(src, "Q8_0", out): llama.cpp's quantizer reads the whole file natively too."""
        return self.run("quantize", src, out, timeout)

    def run(self, op: str, a: Path, b: Path, timeout: float) -> dict:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        logged = self.log.stat().st_size
        proc.stdin.write(json.dumps([op, str(a), str(b)]) + "\n")
        proc.stdin.flush()
        with time_limit(timeout):
            try:
                line = proc.stdout.readline()
            except Hang:
                proc.kill()
                proc.wait()
                return {"result": "hang"}
        if not line:
            code = proc.wait()
            with open(self.log, "rb") as f:  # what this input made the worker print before it died
                f.seek(logged)
                log = f.read().decode(errors="replace").strip().splitlines()
            return {"result": "crash", "returncode": code, "log": log[-3:]}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def native_loader(scratch):
    loader = NativeLoader(scratch)
    yield loader
    loader.close()


def test_native_loader_loads_the_real_pair(native_loader, tiny, converted):
    llm, mmproj = converted(tiny())
    assert native_loader.load(llm, mmproj) == {"result": "ok"}


# FOUND (fixed in native crashes and a foreign exception that fuzzing found):
# - llama.block_count 0 (or above llama.cpp's 512) passes our checks and reaches llama-model.cpp:1328
#   GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS): chat and quantize abort
#   (exit 134). inspect reports it (defect hparam-invalid); runtime/model.py LLaVA.__init__ and
#   quantize/__init__.py (classify / _Job.plan) do not check it before handing the file to llama.cpp.
# - two equal strings in tokenizer.ggml.tokens (one byte changed in a token): llama-vocab.cpp:2544
#   GGML_ASSERT(id_to_token.size() == token_to_id.size()) aborts chat (exit 134); quantize copies the bad
#   vocabulary on, inspect says "no defects".
# - a chat template that is not valid Jinja makes llama-cpp-python's Llama() raise jinja2's
#   TemplateSyntaxError, which runtime/model.py LLaVA.__init__ does not catch (it catches ValueError only).
# - an mmproj without its projector's mm.2.weight (one byte of the tensor name changed): libmtmd loads it and
#   chat dies of SIGSEGV (exit 139). inspect reports it (defect tensor-missing); LLaVA does not check.
NATIVE_CASES = {  # name: (file, key, kind, value[, nth field of that kind])
    "block-count-0": ("llm", "llama.block_count", "u32", 0),
    "block-count-1000": ("llm", "llama.block_count", "u32", 1000),
    "duplicate-token": ("llm", "tokenizer.ggml.tokens", "string", b"<0x00>", 4),  # token 4 is "<0x01>"
    "chat-template-not-jinja": ("llm", "tokenizer.chat_template", "string", b"{#"),
    "mmproj-without-mm.2.weight": ("mmproj", "mm.2.weight", "name", b"mm+2"),
}


@pytest.mark.parametrize("op", ["chat", "quantize"])
@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_gguf_fuzzing_findings_native(gguf_bases, native_loader, tiny, converted, scratch, case, op):
    from fuzz.mutate import set_gguf_field

    llm, mmproj = converted(tiny())
    base, key, kind, value, *nth = NATIVE_CASES[case]
    path = _write(scratch / f"native-case-{case}.gguf", set_gguf_field(gguf_bases[base][0], key, kind, value, *nth))
    if op == "chat":
        out = native_loader.load(*((path, mmproj) if base == "llm" else (llm, path)))
    else:
        out = native_loader.quantize(path, scratch / f"native-case-{case}-Q8_0.gguf")
    assert out["result"] in ("ok", "error"), out


@given(which=st.sampled_from(["llm", "mmproj"]), mutation=steps)
@fuzz_settings(30)
def test_gguf_mutations_native_load_in_child(gguf_bases, native_loader, tiny, converted, scratch, which, mutation):
    llm, mmproj = converted(tiny())
    data, slots, header_end = gguf_bases[which]
    path = _write(scratch / f"native-{which}.gguf", apply(data, mutation, slots, header_end))
    pair = (path, mmproj) if which == "llm" else (llm, path)
    out = native_loader.load(*pair)
    assert out["result"] in ("ok", "error"), out
