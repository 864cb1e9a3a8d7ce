"""Model families as data, behind a lazy registry: which checkpoints a family accepts, where its parts
live in each key layout, and how its vision tower and projector names map to GGUF. A family is one module
(families/<module>.py defining FAMILY, a `Family`) plus one line in REGISTRY; only the modules a lookup
needs are imported (as llama.cpp's conversion/ TEXT_MODEL_MAP does). Nothing else branches on a family."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families.family import Family, KeyLayout
from llava_gguf.families.hparams import ROOT_TYPES, STRING, check_types

__all__ = ["Family", "KeyLayout", "Registered", "REGISTRY", "DEFAULT_FAMILY", "family", "families",
           "find_family", "detect_layout", "default_chat_template"]


@dataclass(frozen=True)
class Registered:
    name: str  # the family's name (Family.name)
    module: str  # llava_gguf.families.<module> defines FAMILY
    architecture: str  # config.json's `architectures` entry it converts


REGISTRY: tuple[Registered, ...] = (
    # families sharing an architecture are told apart by their text model, tried in this order
    Registered("llava-1.5", "llava15", "LlavaForConditionalGeneration"),
    Registered("bakllava", "bakllava", "LlavaForConditionalGeneration"),
    Registered("llava-1.6", "llava16", "LlavaNextForConditionalGeneration"),
    Registered("llava-original", "liuhaotian", "LlavaLlamaForCausalLM"),
    Registered("llava-original-mistral", "liuhaotian_mistral", "LlavaMistralForCausalLM"),
)

# The family of a GGUF that names none: the runtime's chat template when the file carries no template.
# LLaVA-1.5's Vicuna layout: the shipped model's, and that of most LLaVA GGUFs published.
DEFAULT_FAMILY = "llava-1.5"


def family(name: str) -> Family:
    """The registered family `name`, its module imported on first use."""
    for entry in REGISTRY:
        if entry.name == name:
            loaded: Family = importlib.import_module(f"{__name__}.{entry.module}").FAMILY
            return loaded
    raise KeyError(name)


def families() -> tuple[Family, ...]:
    """Every registered family (imports every family module)."""
    return tuple(family(e.name) for e in REGISTRY)


def default_chat_template() -> str:
    """The chat template for a model whose GGUF carries none."""
    return family(DEFAULT_FAMILY).default_chat_template


def find_family(config: dict) -> Family:
    check_types(config, ROOT_TYPES)  # the fields read here are of their types; resolve_llava checks the rest
    text = config.get("text_config")
    if text is not None:
        check_types(text, {"model_type": STRING}, "text_config.")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    text_model = text.get("model_type", "llama") if text is not None else None
    matches = [family(e.name) for e in REGISTRY if e.architecture in archs]
    for found in matches:
        if text_model is None or text_model in found.text_models:
            return found
    if matches:
        known = sorted({m for f in matches for m in f.text_models})
        raise LlavaGgufError(f"unsupported text model type {text_model!r} in a {archs[0]} checkpoint",
                             f"supported: {', '.join(known)}")
    model_type = config.get("model_type", "?")
    if not archs:
        raise LlavaGgufError(f"config.json names no architecture (model_type {model_type!r})",
                             "expected a LLaVA checkpoint such as llava-hf/llava-1.5-7b-hf")
    known = sorted({e.architecture for e in REGISTRY})
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
