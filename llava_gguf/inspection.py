"""`inspect`: what a checkpoint directory or a GGUF file holds, and what is wrong with it.

A GGUF is first walked the way llama.cpp's gguf.cpp reads it (a file it cannot parse is a one-line error,
naming truncation when that is the cause); then every condition that makes llama.cpp (LLM) or libmtmd
(mmproj: tools/mtmd/clip.cpp and models/llava.cpp) refuse the file, abort, or compute something else is a
defect, each saying whether `repair` can fix it. See shared/llava-upstream-defects.md."""
from __future__ import annotations

import stat
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .errors import LlavaGgufError
from .gguf_checks import (FEATURE_LAYER_KEY, _count, chat_template_defects, llm_defects, mmproj_defects,
                          mmproj_layers, read_metadata as _metadata, vocab_defects)
from .gguf_layout import file_kind, layout_defects, read_gguf_layout



def inspect_path(path: Path | str, clip: Path | str | None = None) -> dict:
    path = Path(path)
    if path.is_dir():
        return inspect_checkpoint(path, clip)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LlavaGgufError(f"{path} does not exist", "give a checkpoint directory or a .gguf file") from None
    except OSError as e:  # a dangling link loop, a permission denied on the way
        raise LlavaGgufError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):  # never open a FIFO (it blocks) or read a device
        raise LlavaGgufError(f"{path} is not a regular file ({file_kind(mode)})",
                             "give a checkpoint directory or a .gguf file")
    return inspect_gguf(path)


# ------------------------------------------------------------------------------------------- report
def _file_type(value) -> str | None:
    import gguf

    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def inspect_gguf(path: Path) -> dict:
    path = Path(path)
    layout, reader = read_gguf_layout(path)
    meta = _metadata(reader)
    names = [t.name for t in layout.tensors]
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else "?"
    report: dict = {
        "kind": "gguf",
        "path": str(path),
        "bytes": layout.size,
        "role": "mmproj" if arch == "clip" else "llm",
        "architecture": arch,
        "name": meta.get("general.name"),
        "tensors": len(names),
        "parameters": int(sum(t.n_elements or 0 for t in layout.tensors)),
        "tensor_types": dict(sorted(Counter(t.type_name for t in layout.tensors).items())),
        "file_type": _file_type(meta.get("general.file_type")),
    }
    defects = layout_defects(layout)
    if arch == "clip":
        size, patch = _count(meta.get("clip.vision.image_size")), _count(meta.get("clip.vision.patch_size"))
        report.update({
            "projector_type": meta.get("clip.projector_type"),
            "image_size": size,
            "patch_size": patch,
            "image_tokens": (size // patch) ** 2 if size is not None and patch else None,
            "projection_dim": meta.get("clip.vision.projection_dim"),
            "anyres": "clip.vision.image_grid_pinpoints" in meta,
            **{k: v for k, v in mmproj_layers(meta, names).items() if not k.startswith("_")},
        })
        defects += mmproj_defects(layout, meta, names)
    else:
        n_tokens = layout.kv.get("tokenizer.ggml.tokens")
        report.update({
            "block_count": meta.get(f"{arch}.block_count"),
            "embedding_length": meta.get(f"{arch}.embedding_length"),
            "context_length": meta.get(f"{arch}.context_length"),
            "head_count": meta.get(f"{arch}.attention.head_count"),
            "head_count_kv": meta.get(f"{arch}.attention.head_count_kv"),
            "vocab_size": n_tokens[2] if n_tokens is not None else None,
            "tokenizer": meta.get("tokenizer.ggml.model"),
            "chat_template": "tokenizer.chat_template" in meta,
        })
        defects += llm_defects(layout, meta, arch) + vocab_defects(layout, reader) + chat_template_defects(reader)
    report["defects"] = [asdict(d) for d in defects]
    report["metadata"] = meta
    return report


# ------------------------------------------------------------------------------------------ checkpoint
def inspect_checkpoint(src: Path, clip: Path | str | None = None) -> dict:
    from .convert import open_llava, output_names, stored_parts
    from .convert.mmproj import feature_layer_index

    source = open_llava(src, clip)
    ck, family, layout = source.checkpoint, source.family, source.layout
    root, text_hp, vision_hp = source.root, source.text_hp, source.vision_hp
    text, vision, proj = stored_parts(source)  # as stored (before a family's projector rewrite)

    def count(refs) -> int:
        total = 0
        for r in refs.values():
            n = 1
            for d in r.shape:
                n *= int(d)
            total += n
        return total

    n_layers = int(vision_hp["num_hidden_layers"])
    feature = feature_layer_index(root, n_layers)
    size, patch = int(vision_hp["image_size"]), int(vision_hp["patch_size"])
    llm_name, mm_name = output_names(src.resolve().name, "f16", "f16")
    params = {"language_model": count(text), "vision_tower": count(vision), "projector": count(proj)}
    params["total"] = sum(params.values())
    archs = ck.config.get("architectures") or []
    return {
        "kind": "checkpoint",
        "path": str(src),
        "family": family.name,
        "layout": layout.name,
        "architecture": archs[0] if isinstance(archs, list) and archs else archs,
        "text_model": text_hp["model_type"],
        "vision_from": str(source.clip) if source.clip else "checkpoint",
        "weights": {"format": ck.weight_files[0].suffix.lstrip(".") if ck.weight_files else None,
                    "files": len(ck.weight_files), "bytes": ck.total_bytes},  # the separate tower's included
        "dtypes": dict(sorted(Counter(r.dtype for r in ck.tensors.values()).items())),
        "parameters": params,
        "text": {"layers": int(text_hp["num_hidden_layers"]), "hidden_size": int(text_hp["hidden_size"]),
                 "vocab_size": int(text_hp["vocab_size"])},
        "vision": {"layers": n_layers, "hidden_size": int(vision_hp["hidden_size"]), "image_size": size,
                   "patch_size": patch, "image_tokens": (size // patch) ** 2,
                   "feature_layer": root.get("vision_feature_layer", -2)},
        "convert_writes": {"llm": llm_name, "mmproj": mm_name, "projector_type": family.projector_type,
                           "vision_blocks": feature, FEATURE_LAYER_KEY: [feature]},
        "defects": [],
    }


def render(report: dict) -> list[str]:
    """Human-readable lines."""
    lines: list[str] = []
    if report["kind"] == "checkpoint":
        p = report["parameters"]
        lines += [
            f"{report['path']}: {report['family']} checkpoint ({report['architecture']}, {report['layout']} layout, "
            f"{report['text_model']} text model)",
            f"weights     {report['weights']['files']} {report['weights']['format']} file(s), "
            f"{report['weights']['bytes'] / 1e9:.2f} GB, dtypes " + ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items()),
            f"parameters  {p['total'] / 1e6:.1f} M (language model {p['language_model'] / 1e6:.1f} M, vision tower "
            f"{p['vision_tower'] / 1e6:.1f} M, projector {p['projector'] / 1e6:.1f} M)",
            f"vision      {report['vision']['layers']} layers, {report['vision']['image_size']} px / "
            f"{report['vision']['patch_size']} -> {report['vision']['image_tokens']} image tokens, "
            f"feature layer {report['vision']['feature_layer']}",
            f"convert     -> {report['convert_writes']['llm']} + {report['convert_writes']['mmproj']} "
            f"({report['convert_writes']['vision_blocks']} vision blocks, feature layer "
            f"{report['convert_writes'][FEATURE_LAYER_KEY]})",
        ]
        return lines
    types = ", ".join(f"{k} x{v}" for k, v in report["tensor_types"].items())
    lines.append(f"{report['path']}: {report['role']} GGUF ({report['architecture']}), {report['bytes'] / 1e6:.1f} MB, "
                 f"{report['tensors']} tensors, {report['parameters'] / 1e6:.1f} M parameters, file type {report['file_type']}")
    lines.append(f"tensor types  {types}")
    if report["role"] == "mmproj":
        lines.append(f"projector     {report['projector_type']}, {report['image_size']} px / {report['patch_size']} -> "
                     f"{report['image_tokens']} image tokens{' (anyres)' if report['anyres'] else ''}")
        lines.append(f"vision layers {report['stored_blocks']} stored, block_count {report['block_count']}, "
                     f"feature layer {report['feature_layer'] if report['feature_layer'] else 'not set'}, "
                     f"libmtmd runs {report['layers_run']}")
    else:
        lines.append(f"model         {report['block_count']} layers, width {report['embedding_length']}, "
                     f"{report['head_count']} heads ({report['head_count_kv']} kv), vocab {report['vocab_size']} "
                     f"({report['tokenizer']}), context {report['context_length']}")
        lines.append(f"chat template {'yes' if report['chat_template'] else 'no (chat uses the family default)'}")
    if not report["defects"]:
        lines.append("defects       none found")
    for d in report["defects"]:
        fix = "`llava-gguf repair` fixes it" if d["repairable"] else "not repairable: convert again"
        lines.append(f"DEFECT {d['code']}: {d['message']} ({fix})")
    return lines
