"""A GGUF file's structure, walked the way llama.cpp's gguf.cpp reads it, before anything else (gguf-py,
llama.cpp, libmtmd) is given the file: a file that cannot be parsed is a one-line error naming the cause
(truncation, a bad count, a bad type), and what would make llama.cpp refuse the data section is a Defect.
No llama_cpp, no torch: inspect reports from it, and the runtime checks every file with it first."""
from __future__ import annotations

import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import LlavaGgufError


@dataclass(frozen=True)
class Defect:
    code: str
    message: str
    repairable: bool



# ------------------------------------------------------------------------------------ GGUF structure
# What ggml/src/gguf.cpp (gguf_init_from_reader) checks while it reads a file, walked here before gguf-py
# sees it: gguf-py's reader trusts the counts it reads (an array of 10^9 int32 in a 1 MB file loops 10^9
# times), reads past the end without noticing, and raises every exception type on hostile bytes.
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


@dataclass(frozen=True)
class GGUFLayout:
    size: int  # of the file, in bytes
    version: int
    alignment: int
    kv: dict  # key -> (gguf_type, array element type or None, element count)
    tensors: tuple[TensorInfo, ...]
    data_offset: int


class _Truncated(Exception):
    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


class _Invalid(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads, as gguf.cpp's gguf_reader: nothing is read past the end."""

    def __init__(self, buf, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, where: str) -> int:
        if n > self.size - self.pos:
            raise _Truncated(where)
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, n: int, where: str):
        return struct.unpack_from(fmt, self.buf, self.take(n, where))[0]

    def string(self, where: str, keep: bool = True) -> bytes | None:
        n = self.unpack("<Q", 8, where)
        if n > self.size - self.pos:
            raise _Truncated(where)
        if n > MAX_STRING:
            raise _Invalid(f"{where} holds a string of {n} bytes, more than llama.cpp reads")
        start = self.take(n, where)
        return bytes(self.buf[start:start + n]) if keep else None


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def walk_gguf(buf, size: int) -> GGUFLayout:
    """The file's layout as gguf.cpp reads it; _Truncated when a part runs past the end, _Invalid when
    gguf.cpp refuses the header. Checks gguf.cpp makes on tensor infos that leave the layout readable
    (names, shapes, types, offsets) are left to `layout_defects`."""
    c = _Cursor(buf, size)
    head = bytes(buf[:min(size, 4)])
    if head != GGUF_MAGIC[:len(head)]:
        raise _Invalid(f"it does not start with the GGUF magic (it starts with {head!r})")
    c.take(4, "the magic number")
    version = c.unpack("<I", 4, "the header")
    if version == 0:
        raise _Invalid("its GGUF version is 0")
    if version & 0xFFFF == 0:
        raise _Invalid("it is a byte-swapped (big-endian) GGUF, which llama.cpp does not read on this machine")
    if version == 1:
        raise _Invalid("it is GGUF version 1, which llama.cpp no longer reads")
    if version > GGUF_VERSION:
        raise _Invalid(f"it is GGUF version {version}; this llama.cpp reads up to version {GGUF_VERSION}")
    n_tensors = c.unpack("<q", 8, "the header")
    n_kv = c.unpack("<q", 8, "the header")
    if n_tensors < 0 or n_kv < 0:
        raise _Invalid(f"its header counts {n_tensors} tensors and {n_kv} key-value pairs")
    kv: dict = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        where = f"key-value pair {i + 1} of {n_kv}"
        raw = c.string(where)
        if not raw:
            raise _Invalid(f"the key of {where} is empty")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"the key of {where} is not UTF-8") from None
        if key in kv:
            raise _Invalid(f"key {key} appears twice")
        where = f"the value of {key[:80]}"
        vtype, sub, n = c.unpack("<i", 4, where), None, 1
        if vtype == ARRAY:
            sub = c.unpack("<i", 4, where)
            n = c.unpack("<Q", 8, where)
            if sub not in KV_TYPES or sub == ARRAY:
                raise _Invalid(f"{key} is an array of the invalid value type {sub}")
            item = KV_TYPES[sub][1] or 8  # a string takes at least its 8-byte length
            if n * item > size - c.pos:
                raise _Truncated(where)
            if n > MAX_ARRAY:
                raise _Invalid(f"{key} is an array of {n} elements, more than llama.cpp reads")
            if sub == STRING:
                for _ in range(n):
                    c.string(where, keep=False)
            else:
                c.take(n * item, where)
        elif vtype not in KV_TYPES:
            raise _Invalid(f"{key} has the invalid value type {vtype}")
        elif vtype == STRING:
            c.string(where, keep=False)
        else:
            start = c.take(KV_TYPES[vtype][1], where)
            if key == "general.alignment" and vtype == UINT32:
                alignment = struct.unpack_from("<I", buf, start)[0]
        kv[key] = (vtype, sub, n)
    if "general.alignment" in kv and kv["general.alignment"][:2] != (UINT32, None):
        raise _Invalid("general.alignment is not a UINT32, which llama.cpp requires")
    if alignment == 0 or alignment & (alignment - 1):
        raise _Invalid(f"general.alignment {alignment} is not a power of 2")
    if n_tensors * 24 > size - c.pos:  # an info is at least 24 bytes: fail fast on a huge count
        raise _Truncated("the tensor infos")
    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        where = f"tensor info {i + 1} of {n_tensors}"
        raw = c.string(where)
        name = raw.decode("utf-8", "replace")
        where = f"the info of tensor {name[:80]}"
        n_dims = c.unpack("<I", 4, where)
        if n_dims > MAX_DIMS:
            raise _Invalid(f"tensor {name[:80]} has {n_dims} dimensions; llama.cpp allows at most {MAX_DIMS}")
        ne = tuple(c.unpack("<q", 8, where) for _ in range(n_dims))
        type_id = c.unpack("<i", 4, where)
        offset = c.unpack("<Q", 8, where)
        tensors.append(TensorInfo(name, len(raw), ne, type_id, offset))
    data_offset = _pad(c.pos, alignment) if tensors else c.pos
    if data_offset > size:
        raise _Truncated("the padding before the tensor data")
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


def read_gguf_layout(path: Path, *, kv: bool = True) -> tuple[GGUFLayout, "object"]:
    """(layout, gguf-py reader of the key-value section, or None without `kv`) for a regular file, or a
    one-line error. The file is opened without blocking (a FIFO swapped in after the check never hangs us)
    and checked again."""
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise LlavaGgufError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LlavaGgufError(f"{path} is not a regular file ({file_kind(st.st_mode)})",
                                 "give a checkpoint directory or a .gguf file")
        if st.st_size == 0:
            raise LlavaGgufError(f"{path} is not a readable GGUF file: it is empty (truncated at byte 0)",
                                 "an interrupted download or copy? fetch or convert it again")
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                layout = walk_gguf(buf, min(st.st_size, len(buf)))
        except _Truncated as e:
            raise LlavaGgufError(f"{path} is not a readable GGUF file: it is truncated or corrupt ({st.st_size:,} "
                                 f"bytes; {e.where} runs past the end)",
                                 "an interrupted download or copy? fetch or convert it again") from None
        except _Invalid as e:
            raise LlavaGgufError(f"{path} is not a readable GGUF file: {e}",
                                 "llama.cpp cannot load it either; convert the model again") from None
        except (OSError, ValueError) as e:  # mmap of a file that shrank, an I/O error
            raise LlavaGgufError(f"cannot read {path}: {e}") from None
        return layout, (_kv_reader(f, path) if kv else None)


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a file"


def _kv_reader(f, path: Path):
    """gguf-py's GGUFReader over the key-value section only: the tensor infos were walked (and checked)
    above, and gguf-py's own tensor building would read the data section (absent in a truncated file) and
    refuse types its table lacks."""
    import gguf

    class KVReader(gguf.GGUFReader):
        def _build_tensor_info(self, offs: int, count: int):  # noqa: ANN202 - gguf-py's own signature
            return offs, []

        def _build_tensors(self, start_offs: int, fields) -> None:  # noqa: ANN001
            self.tensors = []

    try:
        return KVReader(f)
    except Exception as e:  # noqa: BLE001 - hostile bytes: gguf-py raises anything; we print one line
        raise LlavaGgufError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})",
                             "convert the model again") from None


def check_loadable(path: Path, *, kv: bool = False) -> tuple[GGUFLayout, "object"]:
    """(layout, gguf-py reader of the key-value section, or None without `kv`) of a GGUF file that
    llama.cpp's own reader would accept (structure and data section), or a one-line error naming what is
    wrong: what every command checks before gguf-py or llama.cpp sees it."""
    layout, reader = read_gguf_layout(path, kv=kv)
    bad = layout_defects(layout)
    if bad:
        raise LlavaGgufError(f"{path} cannot be loaded: {bad[0].message}",
                             "`llava-gguf inspect` lists every defect; fetch or convert the file again")
    return layout, reader
