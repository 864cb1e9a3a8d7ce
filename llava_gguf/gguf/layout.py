"""A GGUF file's structure, walked the way llama.cpp's gguf.cpp reads it, before anything else (gguf-py,
llama.cpp, libmtmd) is given the file: a file that cannot be parsed is Truncated or Invalid (header.py makes
that a one-line error naming the cause), each key's type and place is noted for header.py to decode on
demand, and what would make llama.cpp refuse the tensor infos or the data section is a Defect (the one
typed record every defect rule reports). No gguf-py, no llama_cpp, no torch."""
from __future__ import annotations

import stat
import struct
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Defect:
    code: str  # stable, e.g. "vocab-duplicate-token": what tests, --json readers and LOADS_ANYWAY match on
    message: str  # one line a user can act on, naming what llama.cpp or libmtmd would do with the file
    repairable: bool  # whether `llava-gguf repair` fixes it


# ------------------------------------------------------------------------------------ GGUF structure
# What ggml/src/gguf.cpp (gguf_init_from_reader) checks while it reads a file, walked here before gguf-py
# ever sees it (repair and LLaVA-1.6's image_newline still read tensor data with it): gguf-py's reader
# trusts the counts it reads (an array of 10^9 int32 in a 1 MB file loops 10^9 times), reads past the end
# without noticing, and raises every exception type on hostile bytes.
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name and its NUL in 64 bytes
MAX_STRING = MAX_ARRAY = 1 << 30  # GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS
DEFAULT_ALIGNMENT = 32
_INT64_MAX = (1 << 63) - 1

# gguf_type -> (name, size in bytes; 0 for STRING and ARRAY)
KV_TYPES = {0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4), 5: ("INT32", 4),
            6: ("FLOAT32", 4), 7: ("BOOL", 1), 8: ("STRING", 0), 9: ("ARRAY", 0), 10: ("UINT64", 8),
            11: ("INT64", 8), 12: ("FLOAT64", 8)}
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9

# ggml_type -> (name, block size, bytes per block) for every type this llama.cpp's ggml knows (ggml.c's
# type_traits); ids 4, 5, 31-33 and 36-38 were removed from ggml and have block size 0 there. Written out
# because gguf-py's table lags behind ggml's (gguf 0.19 has no Q2_0).
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
              23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
              35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
              42: ("Q2_0", 64, 18)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    name_bytes: int
    ne: tuple[int, ...]  # as gguf.cpp reads them (int64; a huge uint64 is negative)
    type_id: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0] if self.type_id in GGML_TYPES else f"type {self.type_id}"

    @property
    def n_elements(self) -> int | None:
        """None when gguf.cpp refuses the shape (a negative dimension, more than INT64_MAX elements)."""
        if any(d < 0 for d in self.ne):
            return None
        n = 1
        for d in self.ne:
            n *= d
        return n if n <= _INT64_MAX else None

    @property
    def n_bytes(self) -> int | None:
        """ggml_nbytes, or None when the type or the shape is one gguf.cpp refuses."""
        n = self.n_elements
        if n is None or self.type_id not in GGML_TYPES:
            return None
        _, block, size = GGML_TYPES[self.type_id]
        if (self.ne[0] if self.ne else 1) % block:
            return None
        nbytes = n // block * size
        return nbytes if nbytes < 1 << 64 else None  # gguf.cpp: "has a size in bytes > SIZE_MAX"


class KVEntry(NamedTuple):
    type: int  # gguf_type
    sub: int | None  # an ARRAY's element type, else None
    count: int  # an ARRAY's element count, else 1
    offset: int  # where the value starts in the file (an ARRAY: its first element; a STRING: its length)


@dataclass(frozen=True)
class GGUFLayout:
    size: int  # of the file, in bytes
    version: int
    alignment: int
    kv: dict[str, KVEntry]
    tensors: tuple[TensorInfo, ...]
    data_offset: int


class Truncated(Exception):
    """A part of the file runs past its end (`where` names the part)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


class Invalid(Exception):
    """Something gguf.cpp refuses in the header (the message says what)."""


class _Cursor:
    """Bounds-checked little-endian reads, as gguf.cpp's gguf_reader: nothing is read past the end."""

    def __init__(self, buf, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, where: str) -> int:
        if n > self.size - self.pos:
            raise Truncated(where)
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, n: int, where: str):
        return struct.unpack_from(fmt, self.buf, self.take(n, where))[0]

    def string(self, where: str, keep: bool = True) -> bytes | None:
        n = self.unpack("<Q", 8, where)
        if n > self.size - self.pos:
            raise Truncated(where)
        if n > MAX_STRING:
            raise Invalid(f"{where} holds a string of {n} bytes, more than llama.cpp reads")
        start = self.take(n, where)
        return bytes(self.buf[start:start + n]) if keep else None


_U64 = struct.Struct("<Q")


def skip_strings(buf, size: int, pos: int, n: int, where: str) -> int:
    """The position after `n` GGUF strings from `pos` (each checked as `_Cursor.string` does): the one
    loop a vocabulary costs, kept tight (a 32000-token vocabulary in a few milliseconds)."""
    unpack = _U64.unpack_from
    for _ in range(n):
        if size - pos < 8:
            raise Truncated(where)
        (length,) = unpack(buf, pos)
        pos += 8
        if length > size - pos:
            raise Truncated(where)
        if length > MAX_STRING:
            raise Invalid(f"{where} holds a string of {length} bytes, more than llama.cpp reads")
        pos += length
    return pos


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def walk_gguf(buf, size: int) -> GGUFLayout:
    """The file's layout as gguf.cpp reads it; Truncated when a part runs past the end, Invalid when
    gguf.cpp refuses the header. Checks gguf.cpp makes on tensor infos that leave the layout readable
    (names, shapes, types, offsets) are left to `layout_defects`."""
    c = _Cursor(buf, size)
    head = bytes(buf[:min(size, 4)])
    if head != GGUF_MAGIC[:len(head)]:
        raise Invalid(f"it does not start with the GGUF magic (it starts with {head!r})")
    c.take(4, "the magic number")
    version = c.unpack("<I", 4, "the header")
    if version == 0:
        raise Invalid("its GGUF version is 0")
    if version & 0xFFFF == 0:
        raise Invalid("it is a byte-swapped (big-endian) GGUF, which llama.cpp does not read on this machine")
    if version == 1:
        raise Invalid("it is GGUF version 1, which llama.cpp no longer reads")
    if version > GGUF_VERSION:
        raise Invalid(f"it is GGUF version {version}; this llama.cpp reads up to version {GGUF_VERSION}")
    n_tensors = c.unpack("<q", 8, "the header")
    n_kv = c.unpack("<q", 8, "the header")
    if n_tensors < 0 or n_kv < 0:
        raise Invalid(f"its header counts {n_tensors} tensors and {n_kv} key-value pairs")
    kv: dict = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        where = f"key-value pair {i + 1} of {n_kv}"
        raw = c.string(where)
        if not raw:
            raise Invalid(f"the key of {where} is empty")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"the key of {where} is not UTF-8") from None
        if key in kv:
            raise Invalid(f"key {key} appears twice")
        where = f"the value of {key[:80]}"
        vtype, sub, n = c.unpack("<i", 4, where), None, 1
        if vtype == ARRAY:
            sub = c.unpack("<i", 4, where)
            n = c.unpack("<Q", 8, where)
            if sub not in KV_TYPES or sub == ARRAY:
                raise Invalid(f"{key} is an array of the invalid value type {sub}")
            item = KV_TYPES[sub][1] or 8  # a string takes at least its 8-byte length
            if n * item > size - c.pos:
                raise Truncated(where)
            if n > MAX_ARRAY:
                raise Invalid(f"{key} is an array of {n} elements, more than llama.cpp reads")
            offset = c.pos
            if sub == STRING:
                c.pos = skip_strings(buf, size, c.pos, n, where)
            else:
                c.take(n * item, where)
        elif vtype not in KV_TYPES:
            raise Invalid(f"{key} has the invalid value type {vtype}")
        elif vtype == STRING:
            offset = c.pos
            c.string(where, keep=False)
        else:
            offset = c.take(KV_TYPES[vtype][1], where)
            if key == "general.alignment" and vtype == UINT32:
                alignment = struct.unpack_from("<I", buf, offset)[0]
        kv[key] = KVEntry(vtype, sub, n, offset)
    if "general.alignment" in kv and kv["general.alignment"][:2] != (UINT32, None):
        raise Invalid("general.alignment is not a UINT32, which llama.cpp requires")
    if alignment == 0 or alignment & (alignment - 1):
        raise Invalid(f"general.alignment {alignment} is not a power of 2")
    if n_tensors * 24 > size - c.pos:  # an info is at least 24 bytes: fail fast on a huge count
        raise Truncated("the tensor infos")
    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        where = f"tensor info {i + 1} of {n_tensors}"
        raw = c.string(where)
        name = raw.decode("utf-8", "replace")
        where = f"the info of tensor {name[:80]}"
        n_dims = c.unpack("<I", 4, where)
        if n_dims > MAX_DIMS:
            raise Invalid(f"tensor {name[:80]} has {n_dims} dimensions; llama.cpp allows at most {MAX_DIMS}")
        ne = tuple(c.unpack("<q", 8, where) for _ in range(n_dims))
        type_id = c.unpack("<i", 4, where)
        offset = c.unpack("<Q", 8, where)
        tensors.append(TensorInfo(name, len(raw), ne, type_id, offset))
    data_offset = _pad(c.pos, alignment) if tensors else c.pos
    if data_offset > size:
        raise Truncated("the padding before the tensor data")
    return GGUFLayout(size, version, alignment, kv, tuple(tensors), data_offset)


def some_names(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def layout_defects(layout: GGUFLayout) -> list[Defect]:
    """What gguf.cpp refuses in the tensor infos (it stops at the first), and tensor data the file does
    not hold (llama.cpp's loader refuses it, "data is not within the file bounds"; libmtmd's clip.cpp does
    not check and reads what is there)."""
    out: list[Defect] = []
    ts = layout.tensors
    long_names = [t.name[:80] for t in ts if t.name_bytes >= MAX_NAME]
    if long_names:
        out.append(Defect("tensor-name-too-long", f"tensor name(s) {some_names(long_names)} are {MAX_NAME} bytes or "
                          f"longer: ggml keeps {MAX_NAME - 1}, and gguf.cpp refuses to load the file", False))
    dups = [n for n, k in Counter(t.name for t in ts).items() if k > 1]
    if dups:
        out.append(Defect("tensor-duplicate", f"tensor name(s) {some_names(dups)} appear more than once: gguf.cpp "
                          "refuses to load the file", False))
    bad_type = [f"{t.name} ({t.type_id})" for t in ts if t.type_id not in GGML_TYPES]
    if bad_type:
        out.append(Defect("tensor-type-invalid", f"tensor(s) {some_names(bad_type)} have a type this ggml does not "
                          "know: gguf.cpp refuses to load the file", False))
    bad_shape = [f"{t.name} {list(t.ne)}" for t in ts if t.type_id in GGML_TYPES and t.n_bytes is None]
    if bad_shape:
        out.append(Defect("tensor-shape-invalid", f"tensor(s) {some_names(bad_shape)} have a shape gguf.cpp refuses "
                          "(a negative dimension, too many elements, or rows that are not whole blocks of their "
                          "type)", False))
    expected, known = 0, True
    misaligned, misplaced, cut, outside = [], [], [], []
    for t in ts:
        nbytes = t.n_bytes
        in_place = known and t.offset == expected
        if t.offset % layout.alignment:
            misaligned.append(t.name)
        elif known and not in_place:
            misplaced.append(f"{t.name} at {t.offset} (expected {expected})")
        if nbytes is None:
            known = False
            continue
        expected = expected + _pad(nbytes, layout.alignment)
        if layout.data_offset + t.offset + nbytes > layout.size:
            (cut if in_place else outside).append(t)
    if misaligned:
        out.append(Defect("tensor-misaligned", f"tensor(s) {some_names(misaligned)} start at an offset that is not a "
                          f"multiple of the file's alignment ({layout.alignment}): gguf.cpp refuses to load the "
                          "file", False))
    if misplaced:
        out.append(Defect("tensor-offset-invalid", f"tensor(s) {some_names(misplaced)} do not start where the previous "
                          "one ends (gguf.cpp requires the data packed in order, each tensor padded to the "
                          "alignment) and refuses to load the file", False))
    if outside:
        out.append(Defect("tensor-out-of-bounds", f"the data of tensor(s) {some_names([t.name for t in outside])} "
                          f"lies beyond the end of the file ({layout.size:,} bytes): llama.cpp refuses to load "
                          "it (\"data is not within the file bounds\")", False))
    if cut:
        need = max(layout.data_offset + t.offset + (t.n_bytes or 0) for t in cut)
        out.append(Defect("truncated", f"the file is truncated: it ends at byte {layout.size:,} but its tensor "
                          f"data runs to byte {need:,} ({len(cut)} of {len(ts)} tensors, from {cut[0].name}, are "
                          "cut or missing): llama.cpp refuses to load it (\"data is not within the file bounds\") "
                          "and libmtmd reads garbage or fails; an interrupted download or copy? fetch or convert "
                          "it again", False))
    return out


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for a one-line refusal (never open a FIFO: it blocks)."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a file"
