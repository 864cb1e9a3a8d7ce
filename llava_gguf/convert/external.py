"""The vision tower of a checkpoint that does not carry it (the original liuhaotian layout): a local CLIP
checkpoint (`--clip DIR`: a full CLIPModel, text tower included, or a CLIPVisionModel), or the one the
config's `mm_vision_tower` names: a local path, else the Hub repo of that name fetched as convert fetches a
checkpoint (convert/hub.py: its configuration, image pre-processing and vision weights in one format), the
Hugging Face cache answering when offline."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from llava_gguf.convert.checkpoint import Checkpoint, read_checkpoint
from llava_gguf.convert.hub import TOWER_FILES, fetch, is_repo_id
from llava_gguf.errors import LlavaGgufError
from llava_gguf.families import Family
from llava_gguf.families.clip import clip_vision_config
from llava_gguf.families.hparams import OBJECT, STRING, STRINGS, VISION_TYPES, check_types


_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return [Path(os.environ[var])]
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return [home / "hub"]


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot of `repo` (the one refs/main names, else the newest) that has a config.json."""
    for cache in hf_cache_dirs():
        base = cache / ("models--" + repo.replace("/", "--"))
        snaps = base / "snapshots"
        if not snaps.is_dir():
            continue
        ref = base / "refs" / "main"
        if ref.is_file() and (snaps / ref.read_text().strip() / "config.json").is_file():
            return snaps / ref.read_text().strip()
        found = sorted((p for p in snaps.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def find_clip(config: dict, clip: Path | None, has_tower: bool = False) -> Path:
    if clip is not None:
        clip = Path(clip)
        if not clip.is_dir():
            raise LlavaGgufError(f"--clip {clip} is not a directory", "give a local CLIP checkpoint directory")
        return clip
    name = config.get("mm_vision_tower") or config.get("vision_tower")
    if not isinstance(name, str) or not name:
        raise LlavaGgufError("the checkpoint has no vision tower and its config names none (mm_vision_tower)",
                             "give the CLIP checkpoint with --clip DIR")
    if Path(name).is_dir():
        return Path(name)
    fetched = None
    if is_repo_id(name):
        try:  # the tower's weights are only needed when the checkpoint lacks them
            return fetch(name, None, TOWER_FILES, weights=not has_tower)
        except LlavaGgufError as e:  # a cache filled another way (by hand, an old huggingface_hub) may still hold it
            fetched = e
    snapshot = cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    why = f" ({fetched.message})" if fetched is not None else ""
    if has_tower:
        raise LlavaGgufError(f"the checkpoint carries its vision tower's weights but not its configuration, which comes "
                             f"from {name} (mm_vision_tower), neither fetched nor in the Hugging Face cache{why}",
                             f"pass {name}'s directory with --clip DIR (its config.json and preprocessor_config.json "
                             "are what is read; the weights used are the checkpoint's)")
    where = " or ".join(str(c / ("models--" + name.replace("/", "--"))) for c in hf_cache_dirs())
    raise LlavaGgufError(f"the vision tower {name} (mm_vision_tower) is not in this checkpoint, could not be fetched "
                         f"from the Hugging Face Hub, nor found in the cache ({where}){why}",
                         f"download {name} and pass its directory with --clip DIR")


def attach_vision(ck: Checkpoint, family: Family, clip: Path | None) -> tuple[Checkpoint, dict, Path]:
    """(checkpoint with the tower's tensors under the family's vision prefix, the llava-hf config it
    stands for, the directory holding the image pre-processing config)."""
    assert family.llava_config is not None
    prefix = family.layouts[0].vision
    has_tower = any(n.startswith(prefix) for n in ck.tensors)
    clip_dir = find_clip(ck.config, clip, has_tower)
    clip_ck = read_checkpoint(clip_dir)
    cfg = clip_ck.config
    clip_file = str(clip_dir / "config.json")
    check_types(cfg, {"architectures": STRINGS.or_null(), "model_type": STRING, "vision_config": OBJECT.or_null()},
                file=clip_file)
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if cfg.get("model_type") not in ("clip", "clip_vision_model") and not any("CLIP" in a for a in archs):
        raise LlavaGgufError(f"{clip_dir} is not a CLIP checkpoint (model_type {cfg.get('model_type')!r})",
                             "--clip takes a CLIPModel or CLIPVisionModel directory, e.g. openai/clip-vit-large-patch14-336")
    tensors = dict(ck.tensors)
    if not has_tower:
        # `vision_model.*` (CLIPModel; CLIPVisionModel before transformers 5) or bare (CLIPVisionModel since 5)
        strip = "vision_model." if any(n.startswith("vision_model.") for n in clip_ck.tensors) else ""
        vision = {n: r for n, r in clip_ck.tensors.items()
                  if n.startswith(strip) and n[len(strip):].startswith(_TOWER_PARTS)}
        if not vision:
            raise LlavaGgufError(f"{clip_dir} holds no CLIP vision-tower tensors", "is this a CLIP checkpoint?")
        for n, r in vision.items():
            new = prefix + n[len(strip):]
            tensors[new] = replace(r, name=new)
    # the tower's values are named in the CLIP's own config.json (resolve_llava would call them config.json's)
    check_types(clip_vision_config(cfg), VISION_TYPES, "vision_config." if "vision_config" in cfg else "", clip_file)
    config = family.llava_config(ck.config, cfg)
    files = ck.weight_files if has_tower else ck.weight_files + clip_ck.weight_files
    return Checkpoint(ck.path, ck.config, tensors, files), config, clip_dir
