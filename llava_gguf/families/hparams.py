"""Config defaults as data. llava-hf configs list only what differs from transformers' defaults
(LLaVA-1.5-7B's text_config names five keys), so the converter fills the rest from these tables —
transformers' documented defaults for each config class — instead of importing transformers (and,
through it, torch: 2 s of a 20 s conversion)."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.defects import LLAMA_MAX_LAYERS  # more layers would convert, then abort llama.cpp's load

# transformers LlamaConfig / MistralConfig defaults
TEXT_DEFAULTS: dict[str, dict] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, head_dim=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=4096, head_dim=None),
}
# The text models the converter writes (as llama.cpp's `llama` architecture): the one list. Each family
# accepts some of them (Family.text_models); resolve_llava and convert/llm.py refuse the others.
TEXT_MODELS: tuple[str, ...] = tuple(TEXT_DEFAULTS)


def unsupported_text_model(model_type: object) -> LlavaGgufError:
    return LlavaGgufError(f"unsupported text model type {model_type!r}", f"supported: {', '.join(TEXT_MODELS)}")

# transformers CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                            num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)

# LlavaConfig: the vision tower it assumes when vision_config is absent (CLIP ViT-L/14-336)
LLAVA_DEFAULTS = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_token_index=32000, multimodal_projector_bias=True)
LLAVA_VISION = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768)

# ------------------------------------------------------------------------------------- value types
# config.json is input like any other file: each value our code reads is checked for its JSON type once,
# here, as the dict is first read, so that no later use meets a list where it expects a name or a null
# where it expects a count. Keys we never read are not checked (e.g. eos_token_id, a list in some configs).


@dataclass(frozen=True)
class Kind:
    """What a config value must be: `what` completes "... is not ..." in the error."""

    what: str
    ok: Callable[[object], bool]

    def or_null(self) -> Kind:
        return Kind(f"{self.what} or null", lambda v: v is None or self.ok(v))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1 here


# GGUF stores these counts as 32-bit integers, and llama.cpp reads several as int32
INT32_LIMIT = 2**31
STRING = Kind("a string", lambda v: isinstance(v, str))
STRINGS = Kind("a string or a list of strings",
               lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(a, str) for a in v)))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
COUNT = Kind("a positive integer below 2**31", lambda v: _is_int(v) and 0 < v < INT32_LIMIT)
NUMBER = Kind("a finite number", lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v))
POSITIVE = Kind("a positive number", lambda v: NUMBER.ok(v) and v > 0)


def spelt(value: object, limit: int = 60) -> str:
    """A JSON value for an error message, as the file spells it (null, true, "4096"), cut short."""
    try:
        text = json.dumps(value)
    except RecursionError:
        return "(a deeply nested value)"
    return text if len(text) <= limit else text[:limit] + "..."


def check_types(cfg: dict, schema: dict[str, Kind], where: str = "", file: str = "config.json") -> None:
    """Refuse the first value of `cfg` that is not of its kind in `schema` (absent keys are fine: they
    take their defaults), naming it as `file: where.key`."""
    for key, kind in schema.items():
        if key in cfg and not kind.ok(cfg[key]):
            raise LlavaGgufError(f"{file}: {where}{key} = {spelt(cfg[key])} is not {kind.what}",
                                 "the config is corrupt")


# llava-hf's top level (LlavaConfig / LlavaNextConfig). vision_feature_layer and image_grid_pinpoints have
# their own checks where they are read (mmproj.py), since their shape is more than one type.
# _name_or_path is read by gguf-py's Metadata.load (the model's name), from the same file.
ROOT_TYPES = {"architectures": STRINGS.or_null(), "model_type": STRING, "text_config": OBJECT.or_null(),
              "vision_config": OBJECT.or_null(), "vision_feature_select_strategy": STRING,
              "projector_hidden_act": STRING, "_name_or_path": STRING.or_null()}
# LlamaConfig / MistralConfig: what convert/llm.py reads. A null count takes no default in transformers
# (it would fail there too), except where the class's own default is None.
TEXT_TYPES = {"model_type": STRING, "vocab_size": COUNT, "hidden_size": COUNT, "intermediate_size": COUNT,
              "num_hidden_layers": COUNT, "num_attention_heads": COUNT, "num_key_value_heads": COUNT.or_null(),
              "head_dim": COUNT.or_null(), "max_position_embeddings": COUNT, "sliding_window": COUNT.or_null(),
              "hidden_act": STRING, "rms_norm_eps": POSITIVE, "rope_theta": POSITIVE,
              "rope_scaling": OBJECT.or_null(), "rope_parameters": OBJECT.or_null(), "attention_bias": BOOL,
              "mlp_bias": BOOL, "tie_word_embeddings": BOOL}
ROPE_TYPES = {"rope_type": STRING.or_null(), "type": STRING.or_null(), "factor": POSITIVE.or_null(),
              "original_max_position_embeddings": COUNT.or_null(), "rope_theta": POSITIVE}
# CLIPVisionConfig: what convert/mmproj.py reads
VISION_TYPES = {"hidden_size": COUNT, "intermediate_size": COUNT, "num_hidden_layers": COUNT,
                "num_attention_heads": COUNT, "num_channels": COUNT, "image_size": COUNT, "patch_size": COUNT,
                "hidden_act": STRING, "layer_norm_eps": POSITIVE}

def check_text_types(text: dict, where: str = "text_config.", file: str = "config.json") -> None:
    check_types(text, TEXT_TYPES, where, file)
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(text.get(key), dict):
            check_types(text[key], ROPE_TYPES, f"{where}{key}.", file)
    if text.get("num_hidden_layers", 0) > LLAMA_MAX_LAYERS:
        raise LlavaGgufError(f"{file}: {where}num_hidden_layers = {text['num_hidden_layers']} is more than the "
                             f"{LLAMA_MAX_LAYERS} layers llama.cpp supports", "the config is corrupt")


def _check_text_heads(text: dict) -> None:
    """Head counts that transformers runs but llama.cpp cannot: a KV head count that does not divide the
    query heads converts, then aborts inside ggml at the first decode; an odd head size has no rotary
    halves; a head size derived from a hidden size that is no multiple of the heads is a truncated guess."""
    n_head, n_head_kv = text["num_attention_heads"], text.get("num_key_value_heads")
    if n_head_kv is not None and n_head % n_head_kv:
        raise LlavaGgufError(f"config.json: text_config.num_key_value_heads = {n_head_kv} does not divide "
                             f"num_attention_heads = {n_head}", "the config is corrupt")
    head_dim = text.get("head_dim")
    if head_dim is None and text["hidden_size"] % n_head:
        raise LlavaGgufError(f"config.json: text_config.hidden_size = {text['hidden_size']} is not a multiple of "
                             f"num_attention_heads = {n_head} and no head_dim is given", "the config is corrupt")
    head_dim = head_dim or text["hidden_size"] // n_head
    if head_dim % 2:
        raise LlavaGgufError(f"config.json: the text model's head size {head_dim} is odd",
                             "rotary position embeddings rotate pairs of values; the config is corrupt")


def resolve_llava(config: dict) -> tuple[dict, dict, dict]:
    """(root, text, vision) hyperparameters with defaults filled in, every value of the types that the
    converter reads (checked here, where config.json becomes hyperparameters). `text` is merged over the
    root (as llama.cpp's converter does), so root-level keys are visible to the text model too."""
    check_types(config, ROOT_TYPES)
    root = {**LLAVA_DEFAULTS, **config}
    if "image_token_id" in config and "image_token_index" not in config:
        root["image_token_index"] = config["image_token_id"]
    text_cfg = config.get("text_config") or {}
    vision_cfg = config.get("vision_config") or {}
    check_types(text_cfg, {"model_type": STRING}, "text_config.")
    model_type = text_cfg.get("model_type", "llama")
    if model_type not in TEXT_MODELS:
        raise unsupported_text_model(model_type)
    defaults = TEXT_DEFAULTS[model_type]
    # the root's keys the text model sees (those neither its defaults nor text_config override), then its own
    check_text_types({k: v for k, v in config.items() if k not in text_cfg and k not in defaults
                      and k != "model_type"}, where="")
    check_text_types(text_cfg)
    check_types(vision_cfg, VISION_TYPES, "vision_config.")
    text = {**root, **defaults, **text_cfg, "model_type": model_type}
    _check_text_heads(text)  # before anything is derived from them
    if text.get("num_key_value_heads") is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    if text.get("head_dim") is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    # LlavaConfig(vision_config=None), absent or null alike, is CLIP ViT-L/14-336; {} is CLIPVisionConfig()
    vision_base = LLAVA_VISION if config.get("vision_config") is None else {}
    vision = {**CLIP_VISION_DEFAULTS, **vision_base, **vision_cfg}
    return root, text, vision
