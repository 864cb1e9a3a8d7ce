"""Test-only: copy a real GGUF with one thing changed, through gguf-py alone (no llama.cpp), to show what
each check does with it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np


def rewrite_gguf(src: Path, dest: Path, *, drop_keys=(), set_keys: dict | None = None,
                 edit: Callable | None = None, drop_tensors=(), add_tensors: dict | None = None) -> Path:
    """`src` written again as `dest`: keys dropped, set ({key: (value, type[, sub_type])}) or edited
    (`edit(name, value) -> value`), tensors dropped or added ({name: numpy array})."""
    set_keys = set_keys or {}
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dest, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name in drop_keys \
                or f.name in set_keys:
            continue
        t = f.types[0]
        value = edit(f.name, f.contents()) if edit else f.contents()
        w.add_key_value(f.name, value, t, sub_type=f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
    for key, (value, t, *sub) in set_keys.items():
        w.add_key_value(key, value, t, sub_type=sub[0] if sub else None)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, arr in (add_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest
