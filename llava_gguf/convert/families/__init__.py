"""Model families as data: which checkpoints a family accepts, where its parts live in each key
layout, and how its vision tower and projector names map to GGUF. Adding a family means adding one
module with its table and registering it in FAMILIES; nothing else branches on the family."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import LlavaGgufError
from ..hparams import ROOT_TYPES, STRING, check_types


@dataclass(frozen=True)
class KeyLayout:
    """Where the language model, vision tower and projector sit in one checkpoint key layout.

    `text` maps checkpoint prefixes to the names a plain `LlamaForCausalLM` would use (`model.`,
    `lm_head.`), so gguf-py's tensor-name table applies unchanged. `vision` is the prefix of the
    CLIP vision transformer (its `embeddings.`, `encoder.layers.N.`, ...)."""

    name: str
    text: tuple[tuple[str, str], ...]
    vision: str
    projector: str

    def prefixes(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.text) + (self.vision, self.projector)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    layouts: tuple[KeyLayout, ...]
    vision_globals: tuple[tuple[str, str], ...]  # CLIP name (after the vision prefix) -> GGUF name
    vision_blocks: tuple[tuple[str, str], ...]  # per-block suffix -> GGUF name, under encoder.layers.{i}.
    vision_dropped: tuple[str, ...]  # CLIP tensors the family's graph does not use
    projector: tuple[tuple[str, str], ...]  # projector name -> GGUF name
    projector_type: str  # clip.projector_type
    default_chat_template: str
    text_models: tuple[str, ...] = ("llama",)  # text_config.model_type values accepted
    # The original liuhaotian layout: the vision tower lives in a separate CLIP checkpoint, and the config
    # is LLaVA's own; `llava_config(config, clip_config)` gives the llava-hf config it stands for.
    external_vision: bool = False
    llava_config: Callable[[dict, dict], dict] | None = None
    # projector tensors as the checkpoint has them -> the ones `projector` maps (e.g. a linear projector
    # as an exact GELU pair, see liuhaotian.py)
    projector_tensors: Callable[[dict], dict] | None = None
    # tensors outside the layout's prefixes that go into the mmproj: checkpoint name -> key in `projector`
    extra_tensors: tuple[tuple[str, str], ...] = ()
    anyres: bool = False  # LLaVA-1.6: image_grid_pinpoints, image_newline (see llava16.py)


def _registry() -> tuple[Family, ...]:
    from . import bakllava, liuhaotian, llava15, llava16

    return (llava15.FAMILY, bakllava.FAMILY, llava16.FAMILY, liuhaotian.FAMILY, liuhaotian.FAMILY_MISTRAL)


def find_family(config: dict) -> Family:
    check_types(config, ROOT_TYPES)  # the fields read here are of their types; resolve_llava checks the rest
    text = config.get("text_config")
    if text is not None:
        check_types(text, {"model_type": STRING}, "text_config.")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    text_model = text.get("model_type", "llama") if text is not None else None
    matches = [f for f in _registry() if any(a in f.architectures for a in archs)]
    for family in matches:
        if text_model is None or text_model in family.text_models:
            return family
    if matches:
        known = sorted({m for f in matches for m in f.text_models})
        raise LlavaGgufError(f"unsupported text model type {text_model!r} in a {archs[0]} checkpoint",
                             f"supported: {', '.join(known)}")
    model_type = config.get("model_type", "?")
    if not archs:
        raise LlavaGgufError(f"config.json names no architecture (model_type {model_type!r})",
                             "expected a LLaVA checkpoint such as llava-hf/llava-1.5-7b-hf")
    known = sorted({a for f in _registry() for a in f.architectures})
    if model_type in ("llama", "mistral", "clip", "clip_vision_model") or any(
            a.endswith(("ForCausalLM", "CLIPModel", "CLIPVisionModel")) for a in archs):
        raise LlavaGgufError(f"{archs[0]} is not a LLaVA checkpoint (model_type {model_type!r})",
                             f"convert takes a LLaVA checkpoint ({', '.join(known)}); "
                             "a plain language model converts with llama.cpp's convert_hf_to_gguf.py")
    raise LlavaGgufError(f"unsupported architecture {archs[0]!r}", f"supported: {', '.join(known)}")


def detect_layout(family: Family, names: list[str]) -> KeyLayout:
    """The layout whose prefixes cover every tensor name; the most specific one when several do."""
    best: tuple[int, int, KeyLayout] | None = None
    for layout in family.layouts:
        covered = sum(1 for n in names if n.startswith(layout.prefixes()))
        specificity = len(layout.vision)
        if best is None or (covered, specificity) > (best[0], best[1]):
            best = (covered, specificity, layout)
    assert best is not None
    covered, _, layout = best
    has_text = any(n.startswith(tuple(p for p, _ in layout.text)) for n in names)
    has_vision = any(n.startswith(layout.vision) for n in names)
    has_proj = any(n.startswith(layout.projector) for n in names)
    if not (has_text and has_vision and has_proj):
        missing = [part for part, ok in (("language model", has_text), ("vision tower", has_vision),
                                         ("projector", has_proj)) if not ok]
        raise LlavaGgufError(f"the checkpoint's tensors lack the {' and '.join(missing)} of a {family.name} model",
                             "is the download complete, and is this a LLaVA checkpoint?")
    return layout
