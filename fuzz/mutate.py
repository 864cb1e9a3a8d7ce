"""Structure-aware mutations of real files, for the property tests and the atheris harnesses alike.

A byte flip in a GGUF's tensor data changes nothing a parser looks at, and one in a safetensors weight
neither: the interesting bytes are the length, count, type and offset fields of the header. So each
format here is walked leniently to find those fields (a `Slot`), and a mutation is a short list of
`(op, where, value)` steps applied to a real file — small enough for hypothesis to shrink, and the
same steps serve atheris' custom mutator."""
from __future__ import annotations

import json
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# values that break length and count arithmetic: zero, one, sign edges, all-ones, 2**32, 2**63, 2**64 - 1
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)

OPS = ("slot", "small", "flip", "truncate", "byte", "delete", "duplicate")


@dataclass(frozen=True)
class Slot:
    """A little-endian integer field of a file header: where, how wide (4 or 8 bytes), what it means."""

    offset: int
    width: int
    kind: str  # GGUF: count, namelen, strlen, vtype, atype, alen, ndims, dim, ttype, toffset, u32, u64
    key: str = ""  # GGUF: the metadata key or tensor name the field belongs to


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_slots(data: bytes, max_array: int = 64) -> tuple[list[Slot], int]:
    """The integer fields of a GGUF header, and where its tensor-info section ends (the header's length).
    Lenient: stops at the first field it cannot follow. Long arrays (token lists) contribute their
    first `max_array` elements' fields only, so a mutation lands on every kind of field alike."""
    slots: list[Slot] = []
    off = 0
    key = ""

    def add(o: int, width: int, kind: str) -> None:
        slots.append(Slot(o, width, kind, key))

    def u32(o: int) -> int:
        return struct.unpack_from("<I", data, o)[0]

    def u64(o: int) -> int:
        return struct.unpack_from("<Q", data, o)[0]

    def string(o: int) -> int:
        add(o, 8, "strlen")
        return o + 8 + u64(o)

    def name(o: int) -> tuple[int, str]:
        """A metadata key or tensor name: its length field is a "namelen" slot of that key."""
        end = o + 8 + u64(o)
        text = data[o + 8:end].decode("utf-8", "replace")
        slots.append(Slot(o, 8, "namelen", text))
        return end, text

    def value(o: int, vtype: int, depth: int = 0) -> int:
        if vtype in _GGUF_SCALAR:
            if _GGUF_SCALAR[vtype] in (4, 8):
                add(o, _GGUF_SCALAR[vtype], "u32" if _GGUF_SCALAR[vtype] == 4 else "u64")
            return o + _GGUF_SCALAR[vtype]
        if vtype == 8:
            return string(o)
        if vtype == 9 and depth < 2:
            add(o, 4, "atype")
            atype, n = u32(o), u64(o + 4)
            add(o + 4, 8, "alen")
            o += 12
            if atype in _GGUF_SCALAR:
                return o + n * _GGUF_SCALAR[atype]
            for i in range(n):
                before = len(slots)
                o = value(o, atype, depth + 1)
                if i >= max_array:
                    del slots[before:]
            return o
        raise ValueError(f"value type {vtype}")

    try:
        if data[:4] != b"GGUF":
            return slots, 0
        off = 8
        n_tensors, n_kv = u64(off), u64(off + 8)
        add(off, 8, "count")
        add(off + 8, 8, "count")
        off += 16
        for _ in range(n_kv):
            key = ""
            off, key = name(off)
            vtype = u32(off)
            add(off, 4, "vtype")
            off = value(off + 4, vtype)
        for _ in range(n_tensors):
            key = ""
            off, key = name(off)
            n_dims = u32(off)
            add(off, 4, "ndims")
            off += 4
            for i in range(min(n_dims, 4)):
                add(off + 8 * i, 8, "dim")
            off += 8 * n_dims
            add(off, 4, "ttype")
            add(off + 4, 8, "toffset")
            off += 12
    except (struct.error, ValueError, OverflowError, MemoryError):
        return slots, min(off, len(data))
    return slots, min(off, len(data))


def set_gguf_field(data: bytes, key: str, kind: str, value: int | bytes, nth: int = 0) -> bytes:
    """`data` with the `nth` field of `kind` belonging to metadata key or tensor `key` set to `value` (the
    explicit cases of the property tests: one named field, one edge value). With `kind` "string", `value`
    (bytes) overwrites the start of the key's `nth` string value, and with "name" the start of the key or
    tensor name itself, lengths unchanged."""
    field_kind = {"string": "strlen", "name": "namelen"}.get(kind, kind)
    slots = [s for s in gguf_slots(data, max_array=max(64, nth + 1))[0] if s.key == key and s.kind == field_kind]
    if len(slots) <= nth:
        raise KeyError(f"no {kind} field #{nth} in {key!r}")
    if kind in ("string", "name"):
        start = slots[nth].offset + 8
        return data[:start] + bytes(value) + data[start + len(value):]
    return apply(data, [("slot", 0, int(value))], [slots[nth]], len(data))


def safetensors_slots(data: bytes) -> tuple[list[Slot], int]:
    """A safetensors file has one binary field, the header length; the rest of its header is JSON."""
    return ([Slot(0, 8, "u64")] if len(data) >= 8 else []), min(len(data), 8 + _st_header_len(data))


def _st_header_len(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 0)[0] if len(data) >= 8 else 0


def image_slots(data: bytes) -> tuple[list[Slot], int]:
    """Every aligned 2- and 4-byte field of the first 128 bytes (image headers: dimensions, chunk and
    segment lengths, IFD counts and offsets — big- or little-endian, so both byte orders are tried by
    the `slot` op writing values of either width)."""
    n = min(len(data), 128)
    return [Slot(o, 4, "u32") for o in range(0, n - 3, 2)], n


def apply(data: bytes, steps: Sequence[tuple[str, int, int]], slots: list[Slot], header_end: int) -> bytes:
    """`data` after each (op, where, value) step. `where` picks a slot or a byte position (modulo what
    exists), mostly inside the header; `value` is the new field value, byte, bit or length."""
    buf = bytearray(data)
    header_end = max(1, min(header_end or len(buf), len(buf)))
    for op, where, value in steps:
        if not buf:
            break
        pos = where % min(header_end, len(buf))
        if op in ("slot", "small") and slots:
            # "small": a value below 32 — a type code changed (value, array element or tensor type),
            # a dimension or count made tiny
            # kind first, then a field of that kind: each kind of field is as likely to be hit as any
            # other, however many token strings there are
            kinds = sorted({s.kind for s in slots})
            group = [s for s in slots if s.kind == kinds[where % len(kinds)]]
            slot = group[(where // len(kinds)) % len(group)]
            new = value % 32 if op == "small" else value
            if slot.offset + slot.width <= len(buf):
                mask = (1 << (8 * slot.width)) - 1
                buf[slot.offset:slot.offset + slot.width] = (new & mask).to_bytes(slot.width, "little")
        elif op == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif op == "byte":
            buf[pos] = value & 0xFF
        elif op == "truncate":
            del buf[value % (len(buf) + 1):]
        elif op == "delete":
            del buf[pos:pos + 1 + value % 16]
        elif op == "duplicate":
            buf[pos:pos] = buf[pos:pos + 1 + value % 16]
    return bytes(buf)


def random_steps(rng: random.Random, n: int = 3) -> list[tuple[str, int, int]]:
    """Steps for atheris' custom mutators (hypothesis draws its own, see tests/test_fuzz_properties.py)."""
    steps = []
    for _ in range(rng.randint(1, n)):
        op = rng.choice(OPS)
        value = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.getrandbits(64)
        if op == "slot" and rng.random() < 0.3:
            value += rng.choice((-1, 1))
        steps.append((op, rng.getrandbits(32), value))
    return steps


# ------------------------------------------------------------------------------------------------ JSON
def json_leaves(value, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys and indices) to every value inside a JSON document, containers included."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_leaves(v, path + (i,))
    return out


def json_replace(doc, path: tuple, new, *, delete: bool = False):
    """A copy of `doc` with the value at `path` replaced by `new` (or removed)."""
    if not path:
        return new
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


# wrong types and edge values where a config or header expects something else
JSON_ODD_VALUES = (None, True, False, 0, -1, -2, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308,
                   float("inf"), "", "1", "-2", "llama", "mistral", "gelu", "silu", "F32", "BF16", "I64", "X9",
                   [], [0], [-1], [1, 2], [[1]], ["a"], {}, {"a": 1}, {"model_type": "llama"}, "\u0000", "\ud800")


def mutate_json(doc, rng: random.Random):
    """One structural mutation of a JSON document: a value replaced by an odd one, a key deleted,
    a container wrapped in a list, or a value copied elsewhere."""
    paths = json_leaves(doc)
    path = rng.choice(paths)
    choice = rng.random()
    if choice < 0.6:
        return json_replace(doc, path, rng.choice(JSON_ODD_VALUES))
    if choice < 0.75 and path:
        return json_replace(doc, path, None, delete=True)
    if choice < 0.85:
        return json_replace(doc, path, [_get(doc, path)])
    return json_replace(doc, path, json.loads(json.dumps(_get(doc, rng.choice(paths)))))


def _get(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


def dumps(doc) -> bytes:
    """JSON text as Python writes it, odd floats (inf, nan) and lone surrogates included."""
    return json.dumps(doc).encode("utf-8", "surrogatepass")
