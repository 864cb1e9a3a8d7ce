"""Before anything native is allocated: the LLM and mmproj files checked as a pair (each as `inspect` checks
it: llama.cpp and libmtmd abort the process on some defects), the context size chosen and checked against
the model and the memory, and a device name turned into offloaded layers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_gguf.errors import InvalidSetting, LlavaGgufError, warn
from llava_gguf.families import default_chat_template
from llava_gguf.gguf.defects import chat_template_defects, require_loadable
from llava_gguf.gguf.info import GGUFInfo, open_gguf, read_gguf_info
from llava_gguf.native.library import backend_devices
from llava_gguf.runtime.anyres import AnyresGeometry, flat_pinpoints
from llava_gguf.runtime.resources import check_memory
from llava_gguf.runtime.sampling import is_int

DEVICES = {"cpu": None, "cuda": "CUDA", "metal": "Metal", "vulkan": "Vulkan"}
DEFAULT_IMAGE_TOKENS = 576  # LLaVA-1.5's 24 x 24 rows, when the mmproj does not say


@dataclass(frozen=True)
class ModelFiles:
    """An LLM and its mmproj, checked to load and to belong together."""

    model_path: Path
    mmproj_path: Path
    llm_info: GGUFInfo
    mmproj_info: GGUFInfo
    family_template: str  # the template used when the file has none (or it places no image)
    anyres: AnyresGeometry | None  # LLaVA-1.6's geometry, when the mmproj has pinpoints

    @property
    def image_tokens(self) -> int:
        """The most positions one image takes."""
        return self.anyres.max_rows() if self.anyres else (self.mmproj_info.image_tokens or DEFAULT_IMAGE_TOKENS)


def check_files(model_path: Path, mmproj_path: Path) -> ModelFiles:
    # a file llama.cpp or libmtmd would refuse or abort on (GGML_ASSERT ends the process) never reaches them:
    # each is checked as inspect checks it, and refused with one line naming the first defect
    llm_reader = require_loadable(model_path, "model")
    mmproj_reader = require_loadable(mmproj_path, "mmproj")
    llm_info = read_gguf_info(model_path, "model", reader=llm_reader)
    mmproj_info = read_gguf_info(mmproj_path, "mmproj", reader=mmproj_reader)
    if llm_info.arch == "clip":
        raise LlavaGgufError(f"{model_path} is an mmproj file, not a language model",
                             "pass the LLM .gguf as the model and the mmproj-*.gguf as the mmproj")
    if mmproj_info.arch != "clip":
        raise LlavaGgufError(f"{mmproj_path} is not an mmproj file (architecture {mmproj_info.arch!r})")
    if mmproj_info.n_embd != llm_info.n_embd:
        raise LlavaGgufError(f"the mmproj projects to width {mmproj_info.n_embd} but the language model's "
                             f"embedding width is {llm_info.n_embd}", "these two files are not a pair")
    bad_template = chat_template_defects(llm_reader)
    if bad_template:
        # refused rather than replaced by the family's template: that may not be the model's prompt
        # format (ChatML, LLaMA-3), and answers from another format would be silently worse
        raise LlavaGgufError(f"{model_path} cannot be used: {bad_template[0].code}: {bad_template[0].message}",
                             "convert the checkpoint again (`llava-gguf inspect` shows the file's defects)")
    anyres = load_anyres(mmproj_info) if mmproj_info.pinpoints else None
    return ModelFiles(model_path, mmproj_path, llm_info, mmproj_info, default_chat_template(), anyres)


def load_anyres(info: GGUFInfo) -> AnyresGeometry:
    """An anyres mmproj's geometry, its image_newline row read from the file (see anyres.py)."""
    size = info.image_size
    reader = open_gguf(info.path, "mmproj")
    newline = next((t for t in reader.tensors if t.name == "model.image_newline"), None)
    if newline is None or size is None:
        raise LlavaGgufError(f"{info.path} has image_grid_pinpoints but no model.image_newline",
                             "convert the LLaVA-1.6 checkpoint again with `llava-gguf convert`")
    row = np.array(newline.data, dtype=np.float32).reshape(-1)
    if row.shape[0] != info.n_embd:
        raise LlavaGgufError(f"{info.path}: image_newline has {row.shape[0]} values, not {info.n_embd}")
    values = list(info.pinpoints or ())
    if len(values) % 2 or not all(v > 0 and v % size == 0 for v in values):
        raise LlavaGgufError(f"{info.path}: image_grid_pinpoints {values[:10]} are not pairs of positive "
                             f"multiples of the image size {size}", "convert the checkpoint again")
    side = int(round(math.sqrt(info.image_tokens or 576)))  # feature rows per tile side
    return AnyresGeometry(flat_pinpoints(values), int(size), side, row)


@dataclass(frozen=True)
class ContextSize:
    n_ctx: int
    limit: str | None  # what caps it, said in hints ("the model's sliding window (N tokens)")


def context_size(info: GGUFInfo, n_ctx: int | None, image_tokens: int, *, check: bool = True,
                 sequences: int = 1, stacklevel: int = 4) -> ContextSize:
    """The context to create: n_ctx, or by default one that fits an image and a conversation, checked
    against the model (its training context, Mistral's sliding window) and against the memory it needs
    (`check`: offloaded layers keep their KV cache in device memory, which is not measured here; `sequences`:
    an engine's sequences each may fill n_ctx; `stacklevel`: the user's frame, for the warnings)."""
    train = int(info.context_length) if info.context_length else None
    window = info.sliding_window
    # llama.cpp's llama graph has no sliding-window attention: contexts up to the window compute exactly
    # what the checkpoint does (within it, sliding and full attention see the same tokens)
    limit = f"the model's sliding window ({window} tokens)" if window else None
    notes: list[str] = []  # said once the context is known to fit in memory
    if n_ctx is None:
        n_ctx = max(2048, image_tokens + 1024)
        if train:
            n_ctx = min(n_ctx, train)
        if window and window < n_ctx:
            n_ctx = window  # quietly: the default is ours, the window is the model's own limit
    else:
        if not is_int(n_ctx) or n_ctx < 1:
            raise InvalidSetting(f"n_ctx (--ctx) must be a positive integer, not {n_ctx!r}")
        n_ctx = int(n_ctx)
        if window and n_ctx > window:
            notes.append(f"the context is capped at {window} tokens (asked: {n_ctx}): the model attends "
                         f"within a sliding window of {window} tokens, which llama.cpp's llama architecture "
                         "does not apply, so a longer context would compute something else than the model")
            n_ctx = window
        elif train and n_ctx > train:
            notes.append(f"a context of {n_ctx} tokens is above the model's training context ({train} tokens); "
                         "answers past that length may degrade")
    if check:
        check_memory(info, n_ctx * sequences, least=image_tokens + 64)  # every sequence may fill its n_ctx
    for note in notes:
        warn(note, stacklevel=stacklevel)
    return ContextSize(n_ctx, limit)


def room_hint(info: GGUFInfo, size: ContextSize) -> str:
    """What to do when a prompt does not fit the context."""
    if size.limit and info.sliding_window and size.n_ctx >= info.sliding_window:
        return f"{size.limit} is the longest context this model computes exactly"
    return "pass a larger n_ctx (--ctx)"


def device_layers(device: str) -> int:
    """n_gpu_layers for a device name: 0 for the CPU, all layers (-1) for a GPU the build has."""
    key = device.lower()
    if key not in DEVICES:
        raise LlavaGgufError(f"unknown device {device!r}", f"choose one of {', '.join(DEVICES)}")
    if DEVICES[key] is None:
        return 0
    have = backend_devices()
    if not any(DEVICES[key].lower() in (d["name"] + " " + d["description"]).lower() and d["type"] != "cpu"
               for d in have):
        names = ", ".join(d["name"] for d in have) or "none"
        raise LlavaGgufError(f"device {device!r} is not in this build (its devices: {names})",
                             f"rebuild with the {DEVICES[key]} backend (CMAKE_ARGS=-DGGML_{DEVICES[key].upper()}=ON) or use device='cpu'")
    return -1
