"""`repair`: fix what can be fixed in an mmproj made elsewhere, rewriting it atomically.

- feature-layer-missing (llama.cpp's legacy LLaVA route): the legacy converter stored the layers up to
  LLaVA's feature layer and no `clip.vision.feature_layer`, so libmtmd drops one more (upstream #25817).
  Writing the feature layer as the stored block count makes the stored layers run in full.
- feature-layer-type: the key rewritten as the INT32 array clip.cpp reads.
- post-layernorm: `v.post_ln.*` removed (the llava graph would apply it; LLaVA does not).

Tensors are copied byte for byte (any type, quantized included); the metadata is copied key by key."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.info import open_gguf
from llava_gguf.gguf.inspect import MmprojFacts, gguf_report
from llava_gguf.gguf.mmproj_defects import FEATURE_LAYER_KEY
from llava_gguf.gguf.output_errors import write_error
from llava_gguf.gguf.outputs import atomic_outputs


@dataclass(frozen=True)
class RepairResult:
    source: Path
    output: Path | None  # None: nothing to repair, nothing written
    fixed: tuple[str, ...]


def repair_mmproj(src: Path | str, out: Path | str | None = None, *, force: bool = False,
                  feature_layer: int | None = None) -> RepairResult:
    """`feature_layer`: the layer to write when the file has none, instead of the stored block count
    (the legacy route's intent); for a file that stores every layer of its tower, e.g. 23 of 24 for
    LLaVA's default -2."""
    src = Path(src)
    report = gguf_report(src)
    if not isinstance(report.facts, MmprojFacts):
        raise LlavaGgufError(f"{src} is a language model ({report.architecture}), not an mmproj",
                             "repair fixes mmproj (vision tower + projector) files")
    facts = report.facts
    defects = list(report.defects)
    settable = ("feature-layer-missing", "feature-layer-unset", "feature-layer-type")
    if feature_layer is not None:  # an explicit layer repairs an absent, unset or mistyped one
        defects = [replace(d, repairable=True) if d.code in settable else d for d in defects]
        if not any(d.code in settable for d in defects):
            raise LlavaGgufError(f"{src} already has a usable {FEATURE_LAYER_KEY} "
                                 f"({facts.feature_layer})", "--feature-layer applies to files without one")
    broken = [d for d in defects if not d.repairable]
    if broken:
        raise LlavaGgufError(f"{src} cannot be repaired: {broken[0].message}",
                             "convert the checkpoint again with `llava-gguf convert`")
    if not defects:
        return RepairResult(src, None, ())
    target = Path(out) if out is not None else src
    if target.is_dir():
        target = target / src.name
    in_place = target.resolve() == src.resolve()

    reader = open_gguf(src, "mmproj")
    set_kv: dict[str, list[int]] = {}
    drop: set[str] = set()
    for d in defects:
        if feature_layer is not None and d.code in settable:
            if not 1 <= feature_layer <= facts.stored_blocks:
                raise LlavaGgufError(f"--feature-layer {feature_layer} is out of range: the file stores "
                                     f"{facts.stored_blocks} vision layers")
            set_kv[FEATURE_LAYER_KEY] = [feature_layer]
        elif d.code == "feature-layer-missing":
            set_kv[FEATURE_LAYER_KEY] = [int(facts.block_count)]
        elif d.code == "feature-layer-type":
            value = reader.fields[FEATURE_LAYER_KEY].contents()
            set_kv[FEATURE_LAYER_KEY] = [int(v) for v in (value if isinstance(value, list) else [value])]
        elif d.code == "post-layernorm":
            drop |= {"v.post_ln.weight", "v.post_ln.bias"}
        else:  # pragma: no cover - every repairable code is handled above
            raise AssertionError(d.code)

    with atomic_outputs(target.parent, [target.name], force=force or in_place) as outputs:
        partial = outputs.paths[0]
        try:
            _rewrite(reader, partial, set_kv, drop)
        except OSError as e:
            raise write_error(e, target, partial) from None
        except ValueError as e:  # gguf-py's writer refuses what it cannot write back (an empty array)
            raise LlavaGgufError(f"{src} cannot be rewritten: {' '.join(str(e).split())[:200]}",
                                 "convert the checkpoint again with `llava-gguf convert`") from None
        outputs.set_mode(0, src.stat().st_mode)  # the file keeps its permissions
        left = [d.code for d in gguf_report(partial).defects]
        if left:  # pragma: no cover - a repair that did not take is a bug, never a file
            raise LlavaGgufError(f"the repaired file still has {', '.join(left)}")
    return RepairResult(src, target, tuple(d.code for d in defects))


def _rewrite(reader, dest: Path, set_kv: dict[str, list[int]], drop: set[str]) -> None:
    """gguf-py's gguf_new_metadata.py copy, with `set_kv` (INT32 arrays) replacing or added and the
    `drop` tensors left out."""
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dest, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    pending = dict(set_kv)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in pending:
            writer.add_key_value(field.name, pending.pop(field.name), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.INT32)
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, _raw_value(field), val_type, sub_type=sub_type)
    for key, value in pending.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    kept = [t for t in reader.tensors if t.name not in drop]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def _raw_value(field):
    """A key's value as stored: strings as their bytes (gguf-py's contents() raises on one that is not
    UTF-8, and a repair copies every other key unchanged), everything else as contents()."""
    string = gguf.GGUFValueType.STRING
    if field.types[0] == string:
        return bytes(field.parts[-1])
    if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == string:
        return [bytes(field.parts[i]) for i in field.data]
    return field.contents()

