"""A run's configuration: every knob of the four stages (`Config`), `--set FIELD=VALUE` parsing, and whether a
run directory holds the same run (`same_run`), so that a command run again resumes only its own run."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Config:
    seed: int = 0
    threads: int = 2
    train_scenes: int = 20000
    sp_vocab: int = 512
    # vision tower: 84x84 images in 14-pixel patches -> 36 image tokens
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    # language model: widths multiples of 256 so that every llama.cpp quantization type applies
    text_hidden: int = 256
    text_ff: int = 768
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    # the token embeddings' initial standard deviation (transformers' initializer_range is 0.02, which keeps
    # associative recall at chance far longer than this run has: see the model card)
    text_embed_std: float = 1.0
    # stages: steps, batch, learning rate
    clip_steps: int = 1600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_patch_weight: float = 1.0  # stage a's patch/phrase contrast (`patch_labels`), relative to the image/caption one
    clip_place_weight: float = 0.0  # and each such patch against the 9 places ("top left", ...), at this weight; 0: off
    # the tower's position embeddings start as a 2-D sine/cosine table of this standard deviation (`grid_positions`);
    # 0: transformers' initialisation (std 0.02, which stays far below the patches' own ~0.5: see the model card)
    vision_position_std: float = 0.0
    lm_steps: int = 800
    lm_batch: int = 64
    lm_lr: float = 1e-3
    proj_steps: int = 400
    proj_batch: int = 32
    proj_lr: float = 1e-3
    # stage 2 begins with the projector alone on the questions (language model frozen), then trains both
    qa_frozen_steps: int = 400
    qa_frozen_lr: float = 1e-3
    # then both on recitals (`Data.recital`): each shape's attribute right after its name, no question between
    qa_recital_steps: int = 1000
    qa_recital_lr: float = 5e-4  # the language model's (the projector's twice this)
    qa_steps: int = 2400  # projector + language model
    qa_batch: int = 32
    qa_lr: float = 2e-4  # the language model's (the projector's twice this)
    qa_caption_share: float = 0.1  # of the joint steps' sequences: captions, so the model still describes
    qa_recital_share: float = 0.3  # of the joint steps' sequences: recitals
    qa_position_weight: float = 1.0  # a first question about position this many times as likely as one of each other kind
    # then a last phase of both at a lower rate whose first questions ask about position more often
    qa_polish_steps: int = 1200  # 0: none
    qa_polish_lr: float = 1e-4  # the language model's (the projector's twice this)
    qa_polish_position_weight: float = 3.0  # as qa_position_weight, in that phase
    qa_turns: int = 1  # questions per training conversation (>1: follow-up turns, as LLaVA's instruction data)
    whiten: bool = True  # LLaVA stages: the projector trained on PCA-whitened tower features (see Whitening)
    val_questions: int = 250

    def scaled(self, k: float) -> Config:
        return replace(self, **{f: max(2, int(getattr(self, f) * k)) if getattr(self, f) else 0
                                for f in ("clip_steps", "lm_steps", "proj_steps", "qa_frozen_steps", "qa_recital_steps",
                                          "qa_steps", "qa_polish_steps")})


STAGES = ("clip", "lm", "projector", "qa")


def with_fields(cfg: Config, assignments: list[str]) -> Config:
    """`cfg` with FIELD=VALUE assignments applied (values parsed as the field's type)."""
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg)}
    changes = {}
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or name not in types:
            raise ValueError(f"{a!r} is not FIELD=VALUE with one of: {', '.join(types)}")
        try:
            changes[name] = _parse_bool(value) if types[name] is bool else types[name](value)
        except ValueError:
            raise ValueError(f"{name} takes a {types[name].__name__}, not {value!r}") from None
    return replace(cfg, **changes)


def _parse_bool(value: str) -> bool:
    """`bool("false")` is True: booleans by name."""
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ValueError(value)


# fields whose default is not what a run from before they existed did: such a run had no polish phase
BEFORE_FIELD = {"qa_polish_steps": 0}


def same_run(stored: Path, cfg: Config) -> bool:
    """Whether a run directory's config.json (if any) is `cfg`'s run. A run written before a field existed
    ran with what that field's default is now, or with its BEFORE_FIELD value, so a missing field counts as that."""
    return not stored.is_file() or {**asdict(Config()), **BEFORE_FIELD, **json.loads(stored.read_text())} == asdict(cfg)
