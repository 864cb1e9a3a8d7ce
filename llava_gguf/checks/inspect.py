"""`inspect`: what a checkpoint directory or a GGUF file holds, and what is wrong with it, as a report (a
GGUF: gguf/inspect.py reads it; a checkpoint: what convert would write from it). The reports render in
cli/render.py; `to_json()` is the --json form, and `inspect_path` returns it directly (tests and fuzzers
serialise it)."""
from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union

from llava_gguf.convert import open_llava, output_names, stored_parts
from llava_gguf.convert.mmproj import feature_layer_index
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.defects import FEATURE_LAYER_KEY
from llava_gguf.gguf.inspect import inspect_gguf
from llava_gguf.gguf.layout import file_kind


@dataclass(frozen=True)
class CheckpointReport:
    """A Hugging Face checkpoint directory, and the pair convert would write from it."""

    path: str
    family: str
    layout: str
    architecture: str | None
    text_model: str
    vision_from: str  # the separate CLIP tower's directory, or "checkpoint"
    weights: dict  # format, files, bytes (the separate tower's included)
    dtypes: dict  # dtype -> tensor count
    parameters: dict  # language_model, vision_tower, projector, total
    text: dict  # layers, hidden_size, vocab_size
    vision: dict  # layers, hidden_size, image_size, patch_size, image_tokens, feature_layer
    convert_writes: dict  # llm, mmproj, projector_type, vision_blocks, FEATURE_LAYER_KEY
    defects: tuple = ()  # a checkpoint convert can open has none it would carry into the files

    kind = "checkpoint"

    def to_json(self) -> dict:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "defects"},
                "defects": list(self.defects)}


@dataclass(frozen=True)
class GgufReport:
    """An LLM or mmproj GGUF as gguf/inspect.py reports it: its metadata as stored plus derived fields, whose
    keys depend on the file's role, and its defects (dicts: code, message, repairable)."""

    data: Mapping[str, Any]

    kind = "gguf"

    @property
    def path(self) -> str:
        return self.data["path"]

    @property
    def role(self) -> str:
        return self.data["role"]

    @property
    def defects(self) -> list[dict]:
        return self.data["defects"]

    def to_json(self) -> dict:
        return dict(self.data)


InspectReport = Union[CheckpointReport, GgufReport]


def inspect_report(path: Path | str, clip: Path | str | None = None) -> InspectReport:
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
    return GgufReport(inspect_gguf(path))


def inspect_path(path: Path | str, clip: Path | str | None = None) -> dict:
    """The report's --json form (a dict, as `llava-gguf inspect --json` prints it)."""
    return inspect_report(path, clip).to_json()


def _count(refs: Mapping) -> int:
    total = 0
    for r in refs.values():
        n = 1
        for d in r.shape:
            n *= int(d)
        total += n
    return total


def inspect_checkpoint(src: Path, clip: Path | str | None = None) -> CheckpointReport:
    source = open_llava(src, clip)
    ck, family, layout = source.checkpoint, source.family, source.layout
    root, text_hp, vision_hp = source.root, source.text_hp, source.vision_hp
    text, vision, proj = stored_parts(source)  # as stored (before a family's projector rewrite)
    n_layers = int(vision_hp["num_hidden_layers"])
    feature = feature_layer_index(root, n_layers)
    size, patch = int(vision_hp["image_size"]), int(vision_hp["patch_size"])
    llm_name, mm_name = output_names(src.resolve().name, "f16", "f16")
    params = {"language_model": _count(text), "vision_tower": _count(vision), "projector": _count(proj)}
    params["total"] = sum(params.values())
    archs = ck.config.get("architectures") or []
    return CheckpointReport(
        path=str(src),
        family=family.name,
        layout=layout.name,
        architecture=archs[0] if isinstance(archs, list) and archs else archs,
        text_model=text_hp["model_type"],
        vision_from=str(source.clip) if source.clip else "checkpoint",
        weights={"format": ck.weight_files[0].suffix.lstrip(".") if ck.weight_files else None,
                 "files": len(ck.weight_files), "bytes": ck.total_bytes},
        dtypes=dict(sorted(Counter(r.dtype for r in ck.tensors.values()).items())),
        parameters=params,
        text={"layers": int(text_hp["num_hidden_layers"]), "hidden_size": int(text_hp["hidden_size"]),
              "vocab_size": int(text_hp["vocab_size"])},
        vision={"layers": n_layers, "hidden_size": int(vision_hp["hidden_size"]), "image_size": size,
                "patch_size": patch, "image_tokens": (size // patch) ** 2,
                "feature_layer": root.get("vision_feature_layer", -2)},
        convert_writes={"llm": llm_name, "mmproj": mm_name, "projector_type": family.projector_type,
                        "vision_blocks": feature, FEATURE_LAYER_KEY: [feature]},
    )
