"""The records a family module fills in: where a checkpoint's parts sit (KeyLayout) and how a family's
tensors, config and chat template map to GGUF (Family). Plain data; the registry is in __init__.py."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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
    name: str  # as the registry (families/__init__.py) lists it
    layouts: tuple[KeyLayout, ...]
    vision_globals: tuple[tuple[str, str], ...]  # CLIP name (after the vision prefix) -> GGUF name
    vision_blocks: tuple[tuple[str, str], ...]  # per-block suffix -> GGUF name, under encoder.layers.{i}.
    vision_dropped: tuple[str, ...]  # CLIP tensors the family's graph does not use
    projector: tuple[tuple[str, str], ...]  # projector name -> GGUF name
    projector_type: str  # clip.projector_type
    default_chat_template: str  # written into the LLM when the checkpoint carries no template
    text_models: tuple[str, ...] = ("llama",)  # text_config.model_type values accepted
    # The transformers class whose from_pretrained loads the checkpoint directory as saved (`verify` builds
    # its reference with it); None when transformers has none (LLaVA's own code): the reference is then
    # built from the resolved config and filled with the tensors the converter reads.
    transformers_class: str | None = None
    # The original liuhaotian layout: the vision tower lives in a separate CLIP checkpoint, and the config
    # is LLaVA's own; `llava_config(config, clip_config)` gives the llava-hf config it stands for.
    external_vision: bool = False
    llava_config: Callable[[dict, dict], dict] | None = None
    # The projector may be LLaVA v1's single nn.Linear, which libmtmd's `mlp` projector cannot run: the
    # converter writes it as the exact GELU pair (convert/projector.py, linear_as_gelu_pair).
    linear_projector: bool = False
    # tensors outside the layout's prefixes that go into the mmproj: checkpoint name -> key in `projector`
    extra_tensors: tuple[tuple[str, str], ...] = ()
    anyres: bool = False  # LLaVA-1.6: image_grid_pinpoints, image_newline (see llava16.py)
