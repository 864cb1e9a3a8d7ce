"""Importance matrices: reading them the way llama-quantize does (so our quantized files are the same
bytes as its), and computing them with llama.cpp's `llama-imatrix` tool, built by our CMake.

Reading follows common/imatrix-loader.cpp and tools/quantize/quantize.cpp (`load_imatrix`) at the pinned
commit: a GGUF imatrix holds `<tensor>.in_sum2` and `<tensor>.counts` (F32) plus `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size`; the legacy `.dat` format is n_entries, then per entry
(name, ncall, nval, values), then optionally the chunk count and the dataset name. Values are
normalised to mean squared activations per column (per expert), as llama-quantize hands them on."""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.errors import LlavaGgufError

KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_N_ENTRIES = "quantize.imatrix.entries_count"
KV_N_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class Imatrix:
    path: str  # as the user gave it: it is recorded in the quantized file's metadata
    entries: dict[str, np.ndarray]  # tensor name -> float32 values, normalised
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def load_imatrix(path: str | Path) -> Imatrix:
    p = Path(path)
    if not p.is_file():
        raise LlavaGgufError(f"importance matrix {path} does not exist", "compute one with `llava-gguf imatrix`")
    with p.open("rb") as f:
        magic = f.read(4)
    try:
        im = _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)
    except (ValueError, struct.error, OSError, IndexError, KeyError) as e:
        raise LlavaGgufError(f"{path} is not a readable importance matrix ({str(e)[:160]})",
                             "compute one with `llava-gguf imatrix`") from None
    im.path = str(path)
    if not im.entries:
        raise LlavaGgufError(f"{path} holds no importance-matrix entries", "compute one with `llava-gguf imatrix`")
    return im


def _load_gguf(p: Path) -> Imatrix:
    r = gguf.GGUFReader(p)
    keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
    if any(k not in r.fields for k in keys):
        arch = r.fields.get("general.architecture")
        what = f"a {arch.contents()} model" if arch is not None else "not an importance matrix"
        raise ValueError(f"it is {what}: no imatrix.* metadata")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"{t.name} is not F32")
                into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        raise ValueError(f"mismatched sums and counts for {sorted(set(sums) ^ set(counts))[0]}")
    entries = {}
    for name, s in sums.items():
        if counts[name].size == 0 or s.size % counts[name].size:
            raise ValueError(f"{name}: {s.size} sums do not split into {counts[name].size} counts")
        raw = counts[name].astype(np.float64)
        c = (np.floor(np.abs(raw) + 0.5) * np.sign(raw)).astype(np.float32)  # std::lround, then (float)
        ne0 = s.size // c.size
        e = np.ones_like(s)
        for j, cnt in enumerate(c):
            if cnt > 0:
                e[j * ne0:(j + 1) * ne0] = s[j * ne0:(j + 1) * ne0] / cnt
        entries[name] = e
    raw = r.fields["imatrix.datasets"].contents()
    datasets = [str(x) for x in raw] if isinstance(raw, list) else []  # llama.cpp reads a string array only
    return Imatrix("", entries, datasets, int(r.fields["imatrix.chunk_count"].contents()))


def _load_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        vals = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError("no data")
    entries: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or off + length > len(data):
            raise ValueError("truncated entry name")
        name = data[off:off + length].split(b"\0", 1)[0].decode(errors="replace")
        off += length
        ncall, nval = take("<ii")
        if nval < 1 or off + 4 * nval > len(data):
            raise ValueError("truncated entry")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
    chunk_count, datasets = 0, []
    if off + 4 <= len(data):  # optional trailer: chunk count, dataset name (raw bytes up to a NUL)
        (chunk_count,) = take("<i")
        if off + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length and off + length <= len(data):
                datasets.append(data[off:off + length].split(b"\0", 1)[0].decode(errors="replace"))
    return Imatrix("", entries, datasets, chunk_count)


class NativeImatrix:
    """The C arrays `llama_model_quantize_params.imatrix` and `.kv_overrides` point at, built exactly as
    llama-quantize builds them (same keys, same order), and kept alive while the quantizer runs."""

    def __init__(self, lc, im: Imatrix) -> None:
        n = len(im.entries)
        self._names = [name.encode() for name in im.entries]
        self._values = [np.ascontiguousarray(v, dtype=np.float32) for v in im.entries.values()]
        self.data = (lc.llama_model_imatrix_data * (n + 1))()
        for i, (name, v) in enumerate(zip(self._names, self._values)):
            self.data[i].name = name
            self.data[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self.data[i].size = v.size
        overrides: list[tuple[str, str | int]] = [(KV_FILE, im.path)]
        if im.datasets:
            overrides.append((KV_DATASET, im.datasets[0]))
        overrides.append((KV_N_ENTRIES, n))
        if im.chunk_count > 0:
            overrides.append((KV_N_CHUNKS, im.chunk_count))
        self.kv = (lc.llama_model_kv_override * (len(overrides) + 1))()
        for i, (key, value) in enumerate(overrides):
            self.kv[i].key = key.encode()
            if isinstance(value, str):
                self.kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
                self.kv[i].value.val_str = os.fsencode(value)[:127]
            else:
                self.kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
                self.kv[i].value.val_i64 = value
