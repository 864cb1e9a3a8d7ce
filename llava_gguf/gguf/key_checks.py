"""The keys a loader reads (llama.cpp's get_key / clip.cpp's get_u32 & co.), checked for presence and stored
type and collected into a few defects (one per kind, not one per key), and the small helpers the LLM and
mmproj rules share."""
from __future__ import annotations

from llava_gguf.gguf.layout import ARRAY, INT32, KV_TYPES, UINT32, Defect, GGUFLayout, TensorInfo, some_names


class KeyChecks:
    """Checks of the keys a loader reads, collected into a few defects (one per kind, not one per key)."""

    def __init__(self, layout: GGUFLayout, meta: dict, loader: str) -> None:
        self.layout, self.meta, self.loader = layout, meta, loader  # loader: "clip.cpp" or "llama.cpp"
        self.missing: list[str] = []
        self.mistyped: list[str] = []

    def get(self, key: str, want: int, *, required: bool = True, array_of: int | None = None,
            alt_array: bool = False):
        """The value of `key` when it is stored as the loader reads it (`want`; with `array_of`, an ARRAY
        of that type; with `alt_array`, a per-layer ARRAY of `want` is accepted too), else None, noting a
        missing or mistyped key."""
        got = self.layout.kv.get(key)
        if got is None:
            if required:
                self.missing.append(key)
            return None
        vtype, sub = got.type, got.sub
        ok = (vtype, sub) == (ARRAY, array_of) if array_of is not None else \
            (vtype == want and sub is None) or (alt_array and vtype == ARRAY and sub in (INT32, UINT32))
        if not ok:
            stored = KV_TYPES[vtype][0] if sub is None else f"ARRAY of {KV_TYPES[sub][0]}"
            wanted = f"ARRAY of {KV_TYPES[array_of][0]}" if array_of is not None else KV_TYPES[want][0]
            self.mistyped.append(f"{key} ({stored}, read as {wanted})")
            return None
        return self.meta.get(key)

    def defects(self) -> list[Defect]:
        out = []
        if self.missing:
            out.append(Defect("key-missing", f"key(s) {some_names(self.missing)} are missing: {self.loader} refuses to "
                              "load the file", False))
        if self.mistyped:
            out.append(Defect("key-type", f"key(s) {some_names(self.mistyped)} are stored with another type than "
                              f"{self.loader} reads: it refuses to load the file or aborts (GGML_ASSERT)", False))
        return out


def as_count(value, *, array_ok: bool = False) -> int | None:
    """An integer hparam as a number (the largest entry of a per-layer array), or None."""
    if array_ok and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def shape_defect(wrong: list[str], loader: str) -> list[Defect]:
    """One tensor-shape-mismatch defect naming the first few `wrong` tensors (none when all fit)."""
    return [Defect("tensor-shape-mismatch", f"tensor(s) {some_names(wrong)} do not have the shape the hparams give: "
                   f"{loader} refuses to load the file or aborts building its graph", False)] if wrong else []


def strip_ones(shape) -> tuple[int, ...]:
    """A shape without ggml's trailing 1s."""
    s = list(shape)
    while s and s[-1] == 1:
        s.pop()
    return tuple(s)


def dims(t: TensorInfo) -> tuple[int, ...]:
    """A tensor's shape as compared with what the hparams give (ggml order, trailing 1s dropped)."""
    return strip_ones(t.ne)


def positive(value, limit: int = 0x7FFFFFFF) -> bool:
    """An integer (not a bool) in 1..limit: a count a loader can size things by."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit
