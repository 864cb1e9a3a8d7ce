"""A GGUF file's header, read the way gguf.cpp reads it and without gguf-py: the walk (gguf/layout.py) checks
the structure and notes where each value lies; the header's bytes (up to the tensor data) are kept and a
value is decoded only when asked for. The load path asks for a dozen keys: gguf-py's GGUFReader built a
Python object for every element of every array first (two per token of a 32000-token vocabulary: ~2 s at
LLaVA-1.5-7B, most of `LLaVA()`'s time before llama.cpp). Strings that are not UTF-8 are decoded with
replacement (gguf-py raises); a loader's check never trusts the text."""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.layout import (ARRAY, KV_TYPES, STRING, GGUFLayout, Invalid, KVEntry, Truncated, file_kind,
                                    layout_defects, walk_gguf)

LONG_ARRAY = 16  # arrays longer than this (token lists, scores) are summarised in `metadata()`

# gguf_type -> struct format of a scalar, numpy dtype of an array's elements (little-endian: the walk
# refuses a byte-swapped file)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFHeader:
    """A walked GGUF file: its layout (keys' types and places, tensor infos) and its header's bytes."""
    path: Path
    layout: GGUFLayout
    raw: bytes = field(repr=False)  # the file up to its tensor data

    def __contains__(self, key: str) -> bool:
        return key in self.layout.kv

    def entry(self, key: str) -> KVEntry | None:
        return self.layout.kv.get(key)

    def value(self, key: str):
        """A key's value as gguf-py's `contents()` gives it (Python numbers, str, lists), or None."""
        e = self.layout.kv.get(key)
        if e is None:
            return None
        if e.type == STRING:
            return self._string(e.offset).decode("utf-8", "replace")
        if e.type == ARRAY:
            if e.sub == STRING:
                return [b.decode("utf-8", "replace") for b in self.strings(key)]
            return np.frombuffer(self.raw, _DTYPE[e.sub], e.count, e.offset).tolist()
        return struct.unpack_from(_SCALAR[e.type], self.raw, e.offset)[0]

    def raw_string(self, key: str) -> bytes | None:
        """The bytes of a STRING value (None when absent or of another type)."""
        e = self.layout.kv.get(key)
        return self._string(e.offset) if e is not None and e.type == STRING else None

    def array(self, key: str) -> np.ndarray | None:
        """A numeric ARRAY as a read-only numpy view of the header (None when absent or not numeric)."""
        e = self.layout.kv.get(key)
        if e is None or e.type != ARRAY or e.sub in (STRING, None):
            return None
        return np.frombuffer(self.raw, _DTYPE[e.sub], e.count, e.offset)

    def string_spans(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in `raw` of each text of an ARRAY of STRING, as int64 arrays (one tight loop:
        the lengths are what say where the next string starts)."""
        e = self.layout.kv.get(key)
        if e is None or (e.type, e.sub) != (ARRAY, STRING):
            raise KeyError(key)
        starts = np.empty(e.count, np.int64)
        lengths = np.empty(e.count, np.int64)
        unpack, raw, pos = _U64.unpack_from, self.raw, e.offset
        spans = []
        append = spans.append
        for _ in range(e.count):
            (n,) = unpack(raw, pos)
            append(n)
            pos += 8 + n
        if spans:
            lengths[:] = spans
            # each text starts after its 8-byte length, right after the previous text
            starts[:] = e.offset + 8 * np.arange(1, e.count + 1) + np.concatenate(([0], np.cumsum(lengths[:-1])))
        return starts, lengths

    def strings(self, key: str) -> list[bytes]:
        starts, lengths = self.string_spans(key)
        raw = self.raw
        return [raw[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]

    def metadata(self) -> dict:
        """Every key's value, JSON-ready, arrays longer than LONG_ARRAY summarised (what `inspect` shows
        and what the defect rules read)."""
        out: dict = {}
        for key, e in self.layout.kv.items():
            if e.type == ARRAY and e.count > LONG_ARRAY:
                out[key] = {"array": KV_TYPES[e.sub][0], "length": e.count}
            else:
                out[key] = self.value(key)
        return out

    def _string(self, offset: int) -> bytes:
        (n,) = _U64.unpack_from(self.raw, offset)
        return self.raw[offset + 8:offset + 8 + n]


def read_header(path: Path | str) -> GGUFHeader:
    """The header of a regular file, walked, or a one-line error. The file is opened without blocking (a
    FIFO swapped in after a check never hangs us) and checked again."""
    path = Path(path)
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
                # a copy, not the map: a file truncated later would make a read of the map fault (SIGBUS)
                raw = buf[:layout.data_offset]
        except Truncated as e:
            raise LlavaGgufError(f"{path} is not a readable GGUF file: it is truncated or corrupt ({st.st_size:,} "
                                 f"bytes; {e.where} runs past the end)",
                                 "an interrupted download or copy? fetch or convert it again") from None
        except Invalid as e:
            raise LlavaGgufError(f"{path} is not a readable GGUF file: {e}",
                                 "llama.cpp cannot load it either; convert the model again") from None
        except (OSError, ValueError) as e:  # mmap of a file that shrank, an I/O error
            raise LlavaGgufError(f"cannot read {path}: {e}") from None
    return GGUFHeader(path, layout, raw)


def check_loadable(path: Path | str) -> GGUFHeader:
    """The header of a GGUF file that llama.cpp's own reader would accept (structure and data section),
    or a one-line error naming what is wrong: what every command checks before llama.cpp sees a file."""
    header = read_header(path)
    bad = layout_defects(header.layout)
    if bad:
        raise LlavaGgufError(f"{path} cannot be loaded: {bad[0].message}",
                             "`llava-gguf inspect` lists every defect; fetch or convert the file again")
    return header
