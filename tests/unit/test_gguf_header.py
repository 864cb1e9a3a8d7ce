"""gguf/header.py reads a GGUF header without gguf-py: every value equals gguf-py's `contents()` on the
same file (strings that are not UTF-8 decoded with replacement, where gguf-py raises), long arrays are
summarised in the metadata, and the token-list helpers agree with a plain Python reading."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf import vocab_defects
from llava_gguf.gguf.header import LONG_ARRAY, check_loadable, read_header
from llava_gguf.gguf.vocab_defects import duplicate_tokens, text_hash, token_hashes

V = gguf.GGUFValueType


def kitchen_sink(path):
    """One key of every value type, arrays short, long and empty, and a few tensors."""
    w = gguf.GGUFWriter(path, arch="llama")
    for i, (t, v) in enumerate([(V.UINT8, 200), (V.INT8, -5), (V.UINT16, 60000), (V.INT16, -300),
                                (V.UINT32, 4_000_000_000), (V.INT32, -7), (V.FLOAT32, 1e-5), (V.BOOL, True),
                                (V.UINT64, 2**63 + 5), (V.INT64, -(2**40)), (V.FLOAT64, 0.1)]):
        w.add_key_value(f"test.scalar.{i}", v, t)
    w.add_string("test.string", "héllo")
    w.add_string("test.empty_string", "")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 0.25, 1e-7])
    w.add_array("test.strings", ["a", "", "ü", "\0x"])
    w.add_key_value("test.bools", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_array("test.long", list(range(LONG_ARRAY + 3)))
    w.add_array("test.long_strings", [f"t{i}" for i in range(40)])
    w.add_tensor("a", np.ones((2, 32), np.float32))
    w.add_tensor("b", np.zeros(5, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_equals_gguf_py(tmp_path):
    path = kitchen_sink(tmp_path / "k.gguf")
    h = read_header(path)
    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(h.layout.kv) == list(fields)
    for key, f in fields.items():
        assert h.value(key) == f.contents(), key
        assert type(h.value(key)) is type(f.contents()), key
    assert [t.name for t in h.layout.tensors] == [t.name for t in r.tensors]
    assert h.value("absent") is None and "absent" not in h and "test.ints" in h


def test_an_empty_array_reads_as_gguf_py_reads_it(tmp_path):
    """gguf-py's writer refuses an empty array; llama.cpp's accepts one: written by hand."""
    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    kvs = [string(b"general.architecture") + struct.pack("<i", 8) + string(b"llama"),
           string(b"test.empty") + struct.pack("<iiQ", 9, 5, 0),
           string(b"test.empty_strings") + struct.pack("<iiQ", 9, 8, 0)]
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, 0, len(kvs)) + b"".join(kvs))
    h, r = read_header(path), gguf.GGUFReader(path)
    for key in ("test.empty", "test.empty_strings"):
        assert h.value(key) == r.fields[key].contents() == []
    assert h.string_spans("test.empty_strings")[0].size == 0


def test_metadata_summarises_long_arrays(tmp_path):
    meta = read_header(kitchen_sink(tmp_path / "k.gguf")).metadata()
    assert meta["test.long"] == {"array": "INT32", "length": LONG_ARRAY + 3}
    assert meta["test.long_strings"] == {"array": "STRING", "length": 40}
    assert meta["test.ints"] == [1, -2, 3]
    assert meta["general.architecture"] == "llama"


def test_strings_that_are_not_utf8_are_replaced_not_raised(tmp_path):
    path = tmp_path / "latin1.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_key_value("general.name", b"caf\xe9", V.STRING)
    w.add_key_value("test.list", [b"ok", b"\xff"], V.ARRAY, sub_type=V.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    h = read_header(path)
    assert h.value("general.name") == "caf\ufffd" and h.raw_string("general.name") == b"caf\xe9"
    assert h.value("test.list") == ["ok", "\ufffd"] and h.strings("test.list") == [b"ok", b"\xff"]


def test_string_spans_and_arrays(tmp_path):
    h = read_header(kitchen_sink(tmp_path / "k.gguf"))
    starts, lengths = h.string_spans("test.strings")
    assert [h.raw[s:s + n] for s, n in zip(starts, lengths)] == [b"a", b"", "ü".encode(), b"\0x"]
    assert h.array("test.floats").dtype == np.float32 and h.array("test.strings") is None
    with pytest.raises(KeyError):
        h.string_spans("test.ints")


def test_a_cut_header_is_one_line(tmp_path):
    path = kitchen_sink(tmp_path / "k.gguf")
    data = path.read_bytes()
    for cut in (3, 30, 200, len(data) // 2):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(LlavaGgufError, match="truncated|cannot be loaded"):
            check_loadable(tmp_path / "cut.gguf")
    (tmp_path / "v4.gguf").write_bytes(data[:4] + struct.pack("<I", 4) + data[8:])
    with pytest.raises(LlavaGgufError, match="GGUF version 4"):
        read_header(tmp_path / "v4.gguf")


def _vocab(path, tokens: list[bytes]):
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, sub_type=V.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return read_header(path)


def _python_duplicates(tokens: list[bytes]) -> list[tuple[int, int, bytes]]:
    """llama-vocab.cpp's reading, in plain Python: C strings, empty ones named [EMPTY_<id>]."""
    seen, out = {}, []
    for i, t in enumerate(tokens):
        text = t.split(b"\0", 1)[0] or b"[EMPTY_%d]" % i
        first = seen.setdefault(text, i)
        if first != i:
            out.append((first, i, text))
    return out


@pytest.mark.parametrize("tokens", [
    [b"a", b"b", b"c"],
    [b"<s>", b"</s>", b"<s>\0tail", b"x", b"<s>"],  # read to the first NUL: ids 2 and 4 repeat id 0
    [b"", b"", b"[EMPTY_1]", b"q"],  # empty texts are named by id, and a literal name collides
    [b"\0", b"abc" * 50, b"abc" * 50, b"ab"],
])
def test_duplicate_tokens_as_llama_cpp_reads_them(tmp_path, tokens):
    assert duplicate_tokens(_vocab(tmp_path / "v.gguf", tokens)) == _python_duplicates(tokens)


def test_duplicates_in_a_large_vocabulary(tmp_path):
    rng = np.random.default_rng(1)
    tokens = [b"tok%d_" % i + bytes(rng.integers(97, 123, int(rng.integers(0, 30))).astype(np.uint8))
              for i in range(8000)]
    tokens[7999] = tokens[123]
    tokens[5000] = tokens[7] + b"\0junk"
    got = duplicate_tokens(_vocab(tmp_path / "v.gguf", tokens))
    assert got == _python_duplicates(tokens) == [(7, 5000, tokens[7]), (123, 7999, tokens[123])]


def test_the_vectorised_hash_is_the_python_one():
    texts = [b"", b"a", b"[EMPTY_3]", bytes(range(256)), b"ab"]
    raw = np.frombuffer(b"".join(texts), np.uint8)
    lengths = np.array([len(t) for t in texts], np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths[:-1])))
    assert token_hashes(raw, starts, lengths).tolist() == [text_hash(t) for t in texts]


def test_tokens_longer_than_the_vectorised_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab_defects, "_LONG", 64)  # tokens hashed one by one too
    tokens = [b"t%d" % i for i in range(300)] + [b"L" * 100, b"L" * 100, b"t5", b"L" * 99 + b"\0", b"L" * 99]
    assert duplicate_tokens(_vocab(tmp_path / "v.gguf", tokens)) == _python_duplicates(tokens) != []
