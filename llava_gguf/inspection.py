"""`inspect`: what a checkpoint directory or a GGUF file holds, and what is wrong with it.

For an mmproj, the defects reported are the ones this llama.cpp's libmtmd (tools/mtmd/clip.cpp and
models/llava.cpp) turns into wrong image features or a failed load; each says whether `repair` can fix
it. See shared/llava-upstream-defects.md."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LlavaGgufError

FEATURE_LAYER_KEY = "clip.vision.feature_layer"
# projector types that clip.cpp runs through the llava graph (models/llava.cpp)
LLAVA_GRAPH_PROJECTORS = ("mlp", "mlp_norm", "ldp", "ldpv2")
_LONG_ARRAY = 16  # arrays longer than this (token lists, scores) are summarised in the metadata


@dataclass(frozen=True)
class Defect:
    code: str
    message: str
    repairable: bool


def inspect_path(path: Path | str, clip: Path | str | None = None) -> dict:
    path = Path(path)
    if path.is_dir():
        return inspect_checkpoint(path, clip)
    if not path.exists():
        raise LlavaGgufError(f"{path} does not exist", "give a checkpoint directory or a .gguf file")
    return inspect_gguf(path)


# ------------------------------------------------------------------------------------------------ GGUF
def _metadata(reader) -> dict:
    import gguf

    out: dict = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _LONG_ARRAY:
            sub = field.types[-1].name if len(field.types) > 1 else "?"
            out[name] = {"array": sub, "length": len(field.data)}
            continue
        out[name] = _plain(field.contents())
    return out


def _plain(v):
    """JSON-ready: numpy scalars as Python numbers, lists element-wise."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _field_types(reader, key: str) -> list:
    f = reader.fields.get(key)
    return [] if f is None else list(f.types)


def mmproj_layers(meta: dict, tensor_names: list[str]) -> dict:
    """How many vision blocks the file stores, declares, and how many libmtmd's llava graph runs
    (models/llava.cpp: up to the deepest feature layer; with none, or only negative ones, "the second to
    last layer", block_count - 1)."""
    import re

    stored = sorted({int(m[1]) for n in tensor_names if (m := re.match(r"^v\.blk\.(\d+)\.", n))})
    declared = meta.get("clip.vision.block_count")
    feature = meta.get(FEATURE_LAYER_KEY)
    feature = feature if isinstance(feature, list) else ([feature] if isinstance(feature, int) else None)
    deepest = max(feature) if feature else -1
    if deepest >= 0:
        runs = deepest
    elif isinstance(declared, int):
        runs = declared - 1
    else:
        runs = None
    return {"stored_blocks": len(stored), "block_count": declared, "feature_layer": feature, "layers_run": runs,
            "_stored": stored}


def mmproj_defects(reader, meta: dict, tensor_names: list[str]) -> list[Defect]:
    import gguf

    if meta.get("clip.projector_type") not in LLAVA_GRAPH_PROJECTORS or not meta.get("clip.has_vision_encoder", True):
        return []
    layers = mmproj_layers(meta, tensor_names)
    n_stored, declared = layers["stored_blocks"], layers["block_count"]
    out: list[Defect] = []
    types = _field_types(reader, FEATURE_LAYER_KEY)
    feature = layers["feature_layer"]
    if not types:
        out.append(Defect(
            "feature-layer-missing",
            f"no {FEATURE_LAYER_KEY}: libmtmd runs {layers['layers_run']} of the {declared} stored vision layers "
            "(upstream llama.cpp #25817); a file from llama.cpp's legacy LLaVA route, which already left out the "
            "last layer, then gets its features one layer too early",
            repairable=isinstance(declared, int) and declared >= 1))
    elif types[0] != gguf.GGUFValueType.ARRAY or types[-1] != gguf.GGUFValueType.INT32:
        kind = types[0].name if types[0] != gguf.GGUFValueType.ARRAY else f"ARRAY of {types[-1].name}"
        out.append(Defect("feature-layer-type",
                          f"{FEATURE_LAYER_KEY} is stored as {kind}; clip.cpp reads only an INT32 array and refuses "
                          "to load the file", repairable=bool(feature) and min(feature) >= 0))
    if types and (not feature or max(feature) < 0):
        out.append(Defect("feature-layer-unset",
                          f"{FEATURE_LAYER_KEY} is {feature}: clip.cpp takes negative or no values as unset and runs "
                          f"{layers['layers_run']} of the {declared} layers; `llava-gguf repair --feature-layer N` "
                          "writes the non-negative index (HF's -2 of an n-layer tower is n - 1)", repairable=False))
    if feature and isinstance(declared, int) and max(feature) > declared:
        out.append(Defect("feature-layer-out-of-range",
                          f"{FEATURE_LAYER_KEY} {feature} is beyond clip.vision.block_count {declared}: libmtmd "
                          "refuses to load the file", repairable=False))
    if isinstance(declared, int):
        absent = sorted(set(range(declared)) - set(layers["_stored"]))
        if absent:
            out.append(Defect("blocks-missing",
                              f"clip.vision.block_count is {declared} but block(s) {absent[:5]} are not stored: "
                              "libmtmd cannot load the file", repairable=False))
    if "v.post_ln.weight" in tensor_names:
        out.append(Defect("post-layernorm",
                          "v.post_ln is stored: the llava graph applies CLIP's post-layernorm to the image "
                          "features, which LLaVA does not", repairable=True))
    return out


def _file_type(value) -> str | None:
    import gguf

    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def inspect_gguf(path: Path) -> dict:
    from .runtime.model import open_gguf

    reader = open_gguf(path, "GGUF file")
    meta = _metadata(reader)
    names = [t.name for t in reader.tensors]
    arch = meta.get("general.architecture", "?")
    report: dict = {
        "kind": "gguf",
        "path": str(path),
        "bytes": path.stat().st_size,
        "role": "mmproj" if arch == "clip" else "llm",
        "architecture": arch,
        "name": meta.get("general.name"),
        "tensors": len(names),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "file_type": _file_type(meta.get("general.file_type")),
    }
    if arch == "clip":
        size, patch = meta.get("clip.vision.image_size"), meta.get("clip.vision.patch_size")
        report.update({
            "projector_type": meta.get("clip.projector_type"),
            "image_size": size,
            "patch_size": patch,
            "image_tokens": (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) and patch else None,
            "projection_dim": meta.get("clip.vision.projection_dim"),
            "anyres": "clip.vision.image_grid_pinpoints" in meta,
            **{k: v for k, v in mmproj_layers(meta, names).items() if not k.startswith("_")},
        })
        report["defects"] = [asdict(d) for d in mmproj_defects(reader, meta, names)]
    else:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        report.update({
            "block_count": meta.get(f"{arch}.block_count"),
            "embedding_length": meta.get(f"{arch}.embedding_length"),
            "context_length": meta.get(f"{arch}.context_length"),
            "head_count": meta.get(f"{arch}.attention.head_count"),
            "head_count_kv": meta.get(f"{arch}.attention.head_count_kv"),
            "vocab_size": len(tokens.data) if tokens is not None else None,
            "tokenizer": meta.get("tokenizer.ggml.model"),
            "chat_template": "tokenizer.chat_template" in meta,
        })
        report["defects"] = []
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
