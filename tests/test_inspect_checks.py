"""`inspect` on GGUF files llama.cpp or libmtmd cannot load (or load wrongly): each condition the vendored
loaders check (ggml's gguf.cpp, libmtmd's clip.cpp and its llava graph, llama.cpp's model loader) is a
defect with a short stable code, a file that cannot be parsed is one line naming the cause (truncation
included, at any byte), and no path kind or byte mutation gets anything but our report or our one line.
The files are real conversions, edited byte by byte where the edit is what a corrupt file has; the real
runtime confirms that the files called unloadable are."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import subprocess
import sys

import gguf

from support import run_cli
from support import rewrite_gguf as rewrite
from llava_gguf.errors import LlavaGgufError
from llava_gguf.checks.inspect import inspect_path


def _json(p) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def _codes(path) -> list[str]:
    return [d["code"] for d in inspect_path(path)["defects"]]


def _one_line_error(p, *words: str) -> None:
    assert p.returncode == 1, p.stdout
    assert not p.stdout.strip(), "a refusing command prints no report"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    text = re.sub(r"/\S+", "", lines[0])  # the words in the message, not in a path (tmp dirs name the test)
    for w in words:
        assert w in text, lines[0]


# --------------------------------------------------------------------------------- byte-level editing
def _kv_value_at(data: bytes, key: str) -> int:
    """Offset of the type field that follows `key` in the key-value section."""
    raw = key.encode()
    i = data.index(struct.pack("<Q", len(raw)) + raw)
    return i + 8 + len(raw)


def _tensor_info_at(data: bytes, name: str) -> tuple[int, int]:
    """(offset of n_dims, offset of the type field) in `name`'s tensor info."""
    raw = name.encode()
    i = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    n_dims = struct.unpack_from("<I", data, i)[0]
    return i, i + 4 + 8 * n_dims


def edited(src, dest, edits) -> object:
    """A copy of `src` with `edits` [(offset, bytes)] written over it."""
    data = bytearray(src.read_bytes())
    for off, raw in edits:
        data[off:off + len(raw)] = raw
    dest.write_bytes(bytes(data))
    return dest


def set_u32(src, dest, key: str, value: int, vtype: int = 4):
    data = src.read_bytes()
    at = _kv_value_at(data, key)
    assert struct.unpack_from("<i", data, at)[0] in (4, 5)
    return edited(src, dest, [(at, struct.pack("<i", vtype)), (at + 4, struct.pack("<I", value))])


def runs_in_runtime(llm, mmproj) -> bool:
    """Whether our real runtime (this llama.cpp's libmtmd) loads the pair and encodes an image, in a child
    process (files like these make ggml abort or segfault; that must not take the test down)."""
    code = ("import sys; from llava_gguf import LLaVA; from llava_gguf.checks.samples import sample_image\n"
            "with LLaVA(sys.argv[1], sys.argv[2], n_threads=1) as m:\n    m.embed_image(sample_image(112))\n")
    p = subprocess.run([sys.executable, "-c", code, str(llm), str(mmproj)], capture_output=True, timeout=120)
    return p.returncode == 0


# ----------------------------------------------------------------------------------------- path kinds
def test_inspect_refuses_what_is_not_a_regular_file(tmp_path):
    """A FIFO is not opened (opening it would block until a writer comes), a device is never read."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.gguf"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in [(fifo, "a FIFO"), ("/dev/zero", "a character device"), (sock_path, "a socket")]:
            p = run_cli("inspect", str(path), timeout=60)
            _one_line_error(p, "is not a regular file", kind)
        link = tmp_path / "link.gguf"
        link.symlink_to(fifo)
        _one_line_error(run_cli("inspect", str(link), "--json", timeout=60), "is not a regular file")
    finally:
        sock.close()
    _one_line_error(run_cli("inspect", str(tmp_path / "nope.gguf")), "does not exist")


# ----------------------------------------------------------------------------------------- truncation
def test_truncated_gguf_named_at_any_byte(tiny, converted, tmp_path):
    """Cut anywhere — header, key-value pairs, tensor infos, padding, tensor data — the file is named as
    truncated: a one-line error when its header cannot be parsed, else a report with a `truncated` defect."""
    llm, mmproj = converted(tiny(), "f16")
    cut = tmp_path / "cut.gguf"
    rng = random.Random(0)
    for src in (mmproj, llm):
        data = src.read_bytes()
        header_end = _data_offset(src)
        offsets = set(range(0, 64)) | {rng.randrange(header_end) for _ in range(150)} | \
            {header_end - 1, header_end, header_end + 1} | {rng.randrange(header_end, len(data)) for _ in range(60)} | \
            {len(data) - 1}
        kinds = set()
        for off in sorted(offsets):
            cut.write_bytes(data[:off])
            try:
                r = inspect_path(cut)
            except LlavaGgufError as e:
                assert "truncated" in str(e).replace(str(cut), ""), (src.name, off, str(e))
                kinds.add("error")
                continue
            assert "truncated" in [d["code"] for d in r["defects"]], (src.name, off, r["defects"])
            kinds.add("defect")
        assert kinds == {"error", "defect"}
    # through the CLI: a cut header is one line and no report; cut data is the report (exit 1)
    data = mmproj.read_bytes()
    cut.write_bytes(data[:40])
    _one_line_error(run_cli("inspect", str(cut), "--json"), "truncated")
    cut.write_bytes(data[:len(data) - 1000])
    p = run_cli("inspect", str(cut), "--json")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    d = {x["code"]: x for x in _json(p)["defects"]}
    assert "truncated" in d and not d["truncated"]["repairable"]
    assert f"ends at byte {len(data) - 1000:,}" in d["truncated"]["message"]
    text = run_cli("inspect", str(cut))
    assert text.returncode == 1 and "DEFECT truncated" in text.stdout
    cut.write_bytes(b"")
    _one_line_error(run_cli("inspect", str(cut)), "empty", "truncated")


def _data_offset(path) -> int:
    return gguf.GGUFReader(path).data_offset


# ------------------------------------------------------------------------------------- mmproj defects
def test_mmproj_load_defects(tiny, converted, tmp_path):
    llm, mmproj = converted(tiny(), "f16")
    data = mmproj.read_bytes()
    assert _codes(mmproj) == []
    cases = {}
    cases["patch-size-invalid"] = set_u32(mmproj, tmp_path / "patch0.gguf", "clip.vision.patch_size", 0)
    cases["image-size-invalid"] = set_u32(mmproj, tmp_path / "size0.gguf", "clip.vision.image_size", 0)
    cases["key-type"] = set_u32(mmproj, tmp_path / "patch-int32.gguf", "clip.vision.patch_size", 14, vtype=5)
    # a tensor that does not start on the alignment, and one that is not where gguf.cpp expects it
    dims, typ = _tensor_info_at(data, "v.blk.0.ln1.weight")
    off = struct.unpack_from("<Q", data, typ + 4)[0]
    cases["tensor-misaligned"] = edited(mmproj, tmp_path / "misaligned.gguf", [(typ + 4, struct.pack("<Q", off + 8))])
    cases["tensor-offset-invalid"] = edited(mmproj, tmp_path / "moved.gguf", [(typ + 4, struct.pack("<Q", off + 32))])
    cases["tensor-out-of-bounds"] = edited(mmproj, tmp_path / "far.gguf", [(typ + 4, struct.pack("<Q", 1 << 40))])
    cases["tensor-type-invalid"] = edited(mmproj, tmp_path / "type4.gguf", [(typ, struct.pack("<i", 4))])
    cases["tensor-shape-invalid"] = edited(mmproj, tmp_path / "negative.gguf",
                                           [(dims + 4, struct.pack("<q", -64))])
    dup_dims, _ = _tensor_info_at(data, "v.blk.1.ln1.weight")
    cases["tensor-duplicate"] = edited(mmproj, tmp_path / "dup.gguf", [(dup_dims - 12, b"0")])  # v.blk.1 -> v.blk.0
    cases["tensor-missing"] = rewrite(mmproj, tmp_path / "no-q.gguf", drop_tensors=("v.blk.0.attn_q.weight",))
    cases["key-missing"] = rewrite(mmproj, tmp_path / "no-width.gguf", drop_keys=("clip.vision.embedding_length",))
    cases["vision-encoder-missing"] = rewrite(mmproj, tmp_path / "no-vision.gguf",
                                              drop_keys=("clip.has_vision_encoder",))
    # 224 px / 14 needs 257 position embeddings; the file holds 65
    cases["tensor-shape-mismatch"] = set_u32(mmproj, tmp_path / "size224.gguf", "clip.vision.image_size", 224)
    cases["hparam-invalid"] = set_u32(mmproj, tmp_path / "heads3.gguf", "clip.vision.attention.head_count", 3)
    for code, path in cases.items():
        p = run_cli("inspect", str(path), "--json") if code in ("patch-size-invalid", "tensor-misaligned") else None
        if p is not None:
            assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
            defects = _json(p)["defects"]
        else:
            defects = inspect_path(path)["defects"]
        assert code in [d["code"] for d in defects], (code, defects)
        assert all(not d["repairable"] for d in defects), (code, defects)
    # what inspect calls broken, the real runtime cannot load or run (an error, SIGABRT, SIGSEGV); the
    # intact pair runs
    assert runs_in_runtime(llm, mmproj)
    for code in ("patch-size-invalid", "image-size-invalid", "tensor-misaligned", "tensor-type-invalid",
                 "key-missing", "vision-encoder-missing", "tensor-missing", "tensor-shape-mismatch",
                 "hparam-invalid"):
        assert not runs_in_runtime(llm, cases[code]), code
    # repair refuses what it cannot fix, naming the defect
    p = run_cli("repair", str(cases["tensor-misaligned"]), "-o", str(tmp_path / "fixed.gguf"))
    _one_line_error(p, "cannot be repaired", "alignment")


# ---------------------------------------------------------------------------------------- LLM defects
def test_llm_load_defects(tiny, converted, tmp_path):
    llm, mmproj = converted(tiny(), "f16")
    assert _codes(llm) == []
    cases = {
        "hparam-invalid": set_u32(llm, tmp_path / "blocks0.gguf", "llama.block_count", 0),
        "key-type": set_u32(llm, tmp_path / "ctx-int32.gguf", "llama.context_length", 4096, vtype=5),
        "key-missing": rewrite(llm, tmp_path / "no-heads.gguf", drop_keys=("llama.attention.head_count",)),
        "tensor-missing": rewrite(llm, tmp_path / "no-embd.gguf", drop_tensors=("token_embd.weight",)),
        "tensor-unexpected": set_u32(llm, tmp_path / "blocks1.gguf", "llama.block_count", 1),
        "tensor-shape-mismatch": set_u32(llm, tmp_path / "ff.gguf", "llama.feed_forward_length", 640),
    }
    for code, path in cases.items():
        defects = inspect_path(path)["defects"]
        assert code in [d["code"] for d in defects], (code, defects)
    p = run_cli("inspect", str(cases["tensor-missing"]), "--json")
    assert p.returncode == 1 and _json(p)["defects"][0]["code"] == "tensor-missing"
    for code in ("tensor-missing", "tensor-unexpected", "key-type"):
        assert not runs_in_runtime(cases[code], mmproj), code


# ------------------------------------------------------------------------------------- hostile bytes
def test_hostile_counts_end_fast(tiny, converted, tmp_path):
    """Counts a mutation makes huge (an array of 2^30 int32 in a small file, 2^40 tensors, a string of
    2^63 bytes) are refused at once with one line: gguf-py alone loops over them for minutes."""
    llm, _ = converted(tiny(), "f16")
    data = llm.read_bytes()
    at = _kv_value_at(data, "tokenizer.ggml.token_type")  # ARRAY, INT32, count
    cases = [([(at + 8, struct.pack("<Q", 1 << 29))], "the value of tokenizer.ggml.token_type"),
             ([(16, struct.pack("<Q", 1 << 40))], "key-value pair"),  # kv count
             ([(8, struct.pack("<Q", 1 << 40))], "the tensor infos"),  # tensor count
             ([(24, struct.pack("<Q", (1 << 63) + 5))], "key-value pair 1 ")]  # the first key's length
    for i, (edits, where) in enumerate(cases):
        path = edited(llm, tmp_path / f"hostile{i}.gguf", edits)
        _one_line_error(run_cli("inspect", str(path), timeout=30), "not a readable GGUF file", "truncated", where)


def test_random_mutations_end_in_a_report_or_one_line(tiny, converted, tmp_path):
    """A bounded sweep of byte mutations over a real mmproj's header (F's fuzzers go further): every one
    ends in a report (which renders and serialises) or our one-line error, never another exception."""
    from llava_gguf.cli.render import inspect_lines as render

    _, mmproj = converted(tiny(), "f16")
    data = mmproj.read_bytes()
    header = _data_offset(mmproj)
    rng = random.Random(23)
    path = tmp_path / "m.gguf"
    outcomes = set()
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.choice((1, 2, 3))):
            pos = rng.randrange(header)
            if rng.random() < 0.5:
                b[pos] = rng.randrange(256)
            else:
                b[pos:pos + 8] = struct.pack("<Q", rng.choice((0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
                                                               rng.randrange(2**64))))
        path.write_bytes(bytes(b))
        try:
            r = inspect_path(path)
        except LlavaGgufError as e:
            assert "\n" not in e.one_line()
            outcomes.add("error")
            continue
        json.dumps(r)
        render(r)
        outcomes.add("defects" if r["defects"] else "clean")
    assert {"error", "defects"} <= outcomes


def test_anyres_mmproj_without_newline(tiny, converted, tmp_path):
    """LLaVA-1.6: the runtime packs tile rows with model.image_newline; a file without it is a defect."""
    _, mmproj = converted(tiny(anyres=True), "f16")
    assert _codes(mmproj) == []
    bare = rewrite(mmproj, tmp_path / "mmproj-no-newline.gguf", drop_tensors=("model.image_newline",))
    assert _codes(bare) == ["anyres-invalid"]
