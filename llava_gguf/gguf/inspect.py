"""What a GGUF file holds and what is wrong with it, as one typed report: the file is first walked the way
llama.cpp's gguf.cpp reads it (a file it cannot parse is a one-line error, naming truncation when that is
the cause); then every condition that makes llama.cpp (LLM) or libmtmd (mmproj: tools/mtmd/clip.cpp and
models/llava.cpp) refuse the file, abort, or compute something else is a Defect, each saying whether
`repair` can fix it. `to_json()` (also `to_dict()`) is `inspect --json`'s shape, and `from_dict` reads
it back. See shared/llava-upstream-defects.md."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import gguf

from llava_gguf.gguf.defects import gguf_defects
from llava_gguf.gguf.header import read_header
from llava_gguf.gguf.key_checks import as_count
from llava_gguf.gguf.layout import Defect
from llava_gguf.gguf.mmproj_defects import FEATURE_LAYER_KEY, mmproj_layers
from llava_gguf.gguf.vocab_defects import chat_template_defects

__all__ = ["FEATURE_LAYER_KEY", "GGUFReport", "LlmFacts", "MmprojFacts", "gguf_report"]


@dataclass(frozen=True)
class LlmFacts:
    block_count: object
    embedding_length: object
    context_length: object
    head_count: object
    head_count_kv: object
    vocab_size: int | None
    tokenizer: object
    chat_template: bool


@dataclass(frozen=True)
class MmprojFacts:
    projector_type: object
    image_size: int | None
    patch_size: int | None
    image_tokens: int | None
    projection_dim: object
    anyres: bool
    stored_blocks: int  # vision blocks the file stores
    block_count: int | None  # declared
    feature_layer: list[int] | None
    layers_run: int | None  # what libmtmd's llava graph runs


@dataclass(frozen=True)
class GGUFReport:
    path: Path
    bytes: int
    role: str  # "llm" | "mmproj"
    architecture: str
    name: object
    tensors: int
    parameters: int
    tensor_types: dict[str, int]
    file_type: str | None
    facts: LlmFacts | MmprojFacts
    defects: tuple[Defect, ...]
    metadata: dict = field(repr=False)  # every key, long arrays summarised

    @property
    def repairable(self) -> bool:
        """Whether `repair` fixes every defect (False without any)."""
        return bool(self.defects) and all(d.repairable for d in self.defects)

    def to_dict(self) -> dict:
        """The report as `inspect --json` prints it (the keys and order it always had)."""
        return {"kind": "gguf", "path": str(self.path), "bytes": self.bytes, "role": self.role,
                "architecture": self.architecture, "name": self.name, "tensors": self.tensors,
                "parameters": self.parameters, "tensor_types": self.tensor_types, "file_type": self.file_type,
                **asdict(self.facts), "defects": [asdict(d) for d in self.defects], "metadata": self.metadata}

    def to_json(self) -> dict:
        """The --json form, under the name every report gives it (cli/render.py)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: Mapping) -> GGUFReport:
        """The report back from its JSON form (what `inspect_path` returns and fuzzers render): the facts of
        its role from their keys; a missing name or metadata (a hand-written report) reads as None / {}."""
        facts_type = MmprojFacts if d["role"] == "mmproj" else LlmFacts
        facts = facts_type(**{f.name: d[f.name] for f in fields(facts_type)})
        return cls(Path(d["path"]), d["bytes"], d["role"], d["architecture"], d.get("name"), d["tensors"],
                   d["parameters"], dict(d["tensor_types"]), d["file_type"], facts,
                   tuple(Defect(x["code"], x["message"], x["repairable"]) for x in d["defects"]),
                   dict(d.get("metadata", {})))


def _file_type(value) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)


def gguf_report(path: Path | str) -> GGUFReport:
    path = Path(path)
    header = read_header(path)
    layout = header.layout
    meta = header.metadata()
    names = [t.name for t in layout.tensors]
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else "?"
    defects = gguf_defects(header, meta)
    facts: LlmFacts | MmprojFacts
    if arch == "clip":
        size, patch = as_count(meta.get("clip.vision.image_size")), as_count(meta.get("clip.vision.patch_size"))
        layers = mmproj_layers(meta, names)
        facts = MmprojFacts(meta.get("clip.projector_type"), size, patch,
                            (size // patch) ** 2 if size is not None and patch else None,
                            meta.get("clip.vision.projection_dim"), "clip.vision.image_grid_pinpoints" in meta,
                            layers["stored_blocks"], layers["block_count"], layers["feature_layer"],
                            layers["layers_run"])
    else:
        tokens = layout.kv.get("tokenizer.ggml.tokens")
        facts = LlmFacts(meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length"),
                         meta.get(f"{arch}.context_length"), meta.get(f"{arch}.attention.head_count"),
                         meta.get(f"{arch}.attention.head_count_kv"), tokens.count if tokens is not None else None,
                         meta.get("tokenizer.ggml.model"), "tokenizer.chat_template" in meta)
        defects += chat_template_defects(header)
    return GGUFReport(path, layout.size, "mmproj" if arch == "clip" else "llm", arch, meta.get("general.name"),
                      len(names), int(sum(t.n_elements or 0 for t in layout.tensors)),
                      dict(sorted(Counter(t.type_name for t in layout.tensors).items())),
                      _file_type(meta.get("general.file_type")), facts, tuple(defects), meta)

