"""`inspect`: what a checkpoint directory or a GGUF file holds, and what is wrong with it, as a typed report
(a GGUF: gguf/inspect.py's GGUFReport; a checkpoint: CheckpointReport, what convert would write from it).
The reports render in cli/render.py; `to_json()` is the --json form, `inspect_path` returns it directly
(tests and fuzzers serialise it) and `report_from_json` reads it back."""
from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

from llava_gguf.convert import is_repo_id, open_llava, output_names, resolve_checkpoint, stored_parts
from llava_gguf.convert.mmproj import feature_layer_index
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.defects import FEATURE_LAYER_KEY
from llava_gguf.gguf.inspect import GGUFReport, gguf_report
from llava_gguf.gguf.layout import file_kind


@dataclass(frozen=True)
class Weights:
    format: str | None  # safetensors | bin (None: no weight file)
    files: int
    bytes: int  # the separate CLIP tower's included


@dataclass(frozen=True)
class Parameters:
    language_model: int
    vision_tower: int
    projector: int
    total: int


@dataclass(frozen=True)
class TextModel:
    layers: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class VisionTower:
    layers: int
    hidden_size: int
    image_size: int
    patch_size: int
    image_tokens: int
    feature_layer: object  # the config's vision_feature_layer as written (an index, or a list of them)


@dataclass(frozen=True)
class ConvertWrites:
    """The pair convert would write: file names, projector, and the vision blocks and feature layer the
    mmproj would declare (JSON key FEATURE_LAYER_KEY, as in the file)."""

    llm: str
    mmproj: str
    projector_type: str
    vision_blocks: int
    feature_layer: list[int]

    def to_json(self) -> dict:
        return {"llm": self.llm, "mmproj": self.mmproj, "projector_type": self.projector_type,
                "vision_blocks": self.vision_blocks, FEATURE_LAYER_KEY: list(self.feature_layer)}


@dataclass(frozen=True)
class CheckpointReport:
    """A Hugging Face checkpoint directory, and the pair convert would write from it."""

    path: str
    family: str
    layout: str
    architecture: object  # config.json's architectures[0] (None when it names none)
    text_model: str
    vision_from: str  # the separate CLIP tower's directory, or "checkpoint"
    weights: Weights
    dtypes: dict[str, int]  # dtype -> tensor count, sorted by dtype
    parameters: Parameters
    text: TextModel
    vision: VisionTower
    convert_writes: ConvertWrites
    defects: tuple = ()  # a checkpoint convert can open has none it would carry into the files

    kind = "checkpoint"

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": self.path, "family": self.family, "layout": self.layout,
                "architecture": self.architecture, "text_model": self.text_model, "vision_from": self.vision_from,
                "weights": asdict(self.weights), "dtypes": dict(self.dtypes), "parameters": asdict(self.parameters),
                "text": asdict(self.text), "vision": asdict(self.vision),
                "convert_writes": self.convert_writes.to_json(), "defects": list(self.defects)}

    @classmethod
    def from_json(cls, d: Mapping) -> CheckpointReport:
        c = d["convert_writes"]
        return cls(d["path"], d["family"], d["layout"], d["architecture"], d["text_model"], d["vision_from"],
                   Weights(**d["weights"]), dict(d["dtypes"]), Parameters(**d["parameters"]), TextModel(**d["text"]),
                   VisionTower(**d["vision"]),
                   ConvertWrites(c["llm"], c["mmproj"], c["projector_type"], c["vision_blocks"], c[FEATURE_LAYER_KEY]),
                   tuple(d["defects"]))


InspectReport = Union[CheckpointReport, GGUFReport]


def report_from_json(d: Mapping) -> InspectReport:
    """A report back from its --json form (`inspect_path`'s), by its "kind"."""
    return CheckpointReport.from_json(d) if d["kind"] == CheckpointReport.kind else GGUFReport.from_dict(d)


def inspect_report(path: Path | str, clip: Path | str | None = None, *, revision: str | None = None) -> InspectReport:
    """A checkpoint directory, a Hugging Face repo id (ORG/NAME at `revision`, fetched as convert fetches it)
    or a .gguf file; a local path wins over a repo id of the same spelling."""
    path_ = Path(path)
    if revision is not None or (not path_.exists() and not str(path).endswith(".gguf") and is_repo_id(str(path))):
        where = resolve_checkpoint(str(path), revision)
        return inspect_checkpoint(where.path, clip, name=where.name, label=where.repo_id or str(where.path))
    path = path_
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
    return gguf_report(path)


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


def inspect_checkpoint(src: Path, clip: Path | str | None = None, *, name: str | None = None,
                       label: str | None = None) -> CheckpointReport:
    """`name`: what convert would name the outputs (default: the directory's name); `label`: the path shown."""
    source = open_llava(src, clip)
    ck, family, layout = source.checkpoint, source.family, source.layout
    root, text_hp, vision_hp = source.root, source.text_hp, source.vision_hp
    text, vision, proj = stored_parts(source)  # as stored (before a family's projector rewrite)
    n_layers = int(vision_hp["num_hidden_layers"])
    feature = feature_layer_index(root, n_layers)
    size, patch = int(vision_hp["image_size"]), int(vision_hp["patch_size"])
    llm_name, mm_name = output_names(name or src.resolve().name, "f16", "f16")
    n_text, n_vision, n_proj = _count(text), _count(vision), _count(proj)
    archs = ck.config.get("architectures") or []
    return CheckpointReport(
        path=label or str(src),
        family=family.name,
        layout=layout.name,
        architecture=archs[0] if isinstance(archs, list) and archs else archs,
        text_model=text_hp["model_type"],
        vision_from=str(source.clip) if source.clip else "checkpoint",
        weights=Weights(ck.weight_files[0].suffix.lstrip(".") if ck.weight_files else None, len(ck.weight_files),
                        ck.total_bytes),
        dtypes=dict(sorted(Counter(r.dtype for r in ck.tensors.values()).items())),
        parameters=Parameters(n_text, n_vision, n_proj, n_text + n_vision + n_proj),
        text=TextModel(int(text_hp["num_hidden_layers"]), int(text_hp["hidden_size"]), int(text_hp["vocab_size"])),
        vision=VisionTower(n_layers, int(vision_hp["hidden_size"]), size, patch, (size // patch) ** 2,
                           root.get("vision_feature_layer", -2)),
        convert_writes=ConvertWrites(llm_name, mm_name, family.projector_type, feature, [feature]),
    )
