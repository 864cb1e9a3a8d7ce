"""The mmproj GGUF (CLIP vision tower + projector) in the form libmtmd loads; see
shared/mmproj-format.md. The feature layer is always written explicitly and only the layers it
needs are stored, which sidesteps upstream llama.cpp issue #25817 (the last layer dropped twice)."""
from __future__ import annotations

import re
from pathlib import Path

import gguf

from llava_gguf.errors import LlavaGgufError
from llava_gguf.convert.checkpoint import TensorRef, load_json
from llava_gguf.families import Family
from llava_gguf.families.clip import CLIP_MEAN, CLIP_STD
from llava_gguf.families.hparams import NUMBER, spelt
from llava_gguf.convert.llm import FLOAT_DTYPES
from llava_gguf.convert.writer import PlannedTensor, QType, StreamingGGUF, can_quantize

MMPROJ_TYPES: dict[str, tuple[gguf.LlamaFileType, QType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}

# OpenAI CLIP's normalisation, used by every LLaVA tower when preprocessor_config.json is absent.


def feature_layer_index(cfg: dict, n_layers: int) -> int:
    """HF's vision_feature_layer as a non-negative index into hidden_states (0 = embeddings)."""
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list) and len(layer) == 1:
        # transformers concatenates the listed layers' hidden states: one layer is that layer, unchanged
        layer = layer[0]
    elif isinstance(layer, list):
        raise LlavaGgufError(f"vision_feature_layer {layer} (several layers) is not supported",
                             "libmtmd's llava graph takes one feature layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LlavaGgufError(f"vision_feature_layer {layer!r} is not an integer")
    index = layer if layer >= 0 else n_layers + 1 + layer
    if not 1 <= index <= n_layers:
        raise LlavaGgufError(f"vision_feature_layer {layer} is out of range for a {n_layers}-layer vision tower")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise LlavaGgufError(f"vision_feature_select_strategy {strategy!r} is not supported",
                             "libmtmd's llava graph drops the CLS token, as strategy 'default' does")
    return index


# transformers' ACT2FN names clip.cpp has an op for. Its use_gelu runs ggml_gelu (the tanh form, which
# gelu_pytorch_tanh / gelu_new are exactly and erf's "gelu" is to ~1e-3, as libmtmd's projector GELU is);
# quick_gelu is its default for a CLIP tower; use_silu runs ggml_silu. Any other name is refused: clip.cpp
# would run one of these instead.
_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new")


def _act_keys(act: str) -> dict[str, bool]:
    if act == "quick_gelu":
        return {}
    if act in _GELU_NAMES:
        return {gguf.Keys.ClipVision.USE_GELU: True}
    if act in ("silu", "swish"):
        return {gguf.Keys.ClipVision.USE_SILU: True}
    raise LlavaGgufError(f"vision tower activation hidden_act = {act!r} is not supported",
                         "libmtmd's CLIP runs quick_gelu, gelu or silu")


def image_norm(src: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    pre = load_json(path, "preprocessor config")
    return _per_channel(pre, "image_mean", CLIP_MEAN, path), _per_channel(pre, "image_std", CLIP_STD, path)


def _per_channel(pre: dict, key: str, default: tuple[float, ...], path: Path) -> tuple[float, ...]:
    """An RGB normalisation value: three numbers, or one for all three (as transformers' image processors
    broadcast it)."""
    value = pre.get(key, default)
    if NUMBER.ok(value):
        value = [value] * 3
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(NUMBER.ok(v) for v in value)) or \
            (key == "image_std" and 0 in value):
        raise LlavaGgufError(f"{path.name}: {key} = {spelt(value)} is not three numbers (one per RGB channel)"
                             + (", none of them 0" if key == "image_std" else ""), "the preprocessor config is corrupt")
    return tuple(float(v) for v in value)


def mmproj_qtype(name: str, shape: tuple[int, ...], mmproj_type: str) -> QType:
    """convert_hf_to_gguf.py's MmprojModel rule: 1-D tensors, biases and the position embedding
    stay F32; the patch embedding is F16 in an f16 file, else F32; other weights take the type."""
    ftype, wanted = MMPROJ_TYPES[mmproj_type]
    if len(shape) <= 1 or not name.endswith(".weight") or name.endswith("position_embd.weight"):
        return QType.F32
    if name == "v.patch_embd.weight":
        return QType.F16 if wanted == QType.F16 else QType.F32
    if wanted in (QType.F32, QType.F16):
        return wanted
    return wanted if can_quantize(shape, wanted) else QType.F16


def plan_mmproj(family: Family, vision: dict[str, TensorRef], projector: dict[str, TensorRef],
                n_keep: int, mmproj_type: str) -> list[PlannedTensor]:
    globals_ = dict(family.vision_globals)
    blocks = dict(family.vision_blocks)
    proj = dict(family.projector)
    block_re = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    planned: list[PlannedTensor] = []

    def add(name: str, ref: TensorRef) -> None:
        planned.append(PlannedTensor(name, ref.shape, mmproj_qtype(name, ref.shape, mmproj_type), ref))

    for hf_name, ref in vision.items():
        if hf_name in globals_:
            add(globals_[hf_name], ref)
        elif m := block_re.match(hf_name):
            layer, part, kind = int(m[1]), m[2], m[3]
            if part not in blocks:
                raise LlavaGgufError(f"unexpected vision tensor {hf_name!r}")
            if layer < n_keep:
                add(f"v.blk.{layer}.{blocks[part]}.{kind}", ref)
        elif not hf_name.startswith(family.vision_dropped):
            raise LlavaGgufError(f"unexpected vision tensor {hf_name!r}")
    for hf_name, ref in projector.items():
        if hf_name not in proj:
            raise LlavaGgufError(f"unexpected projector tensor {hf_name!r}")
        add(proj[hf_name], ref)
    have = {t.name for t in planned}
    # the layers the feature layer needs are at most those the tower has: the first one it lacks is named
    # without enumerating the (config-given, possibly huge) layer count
    layers = {int(m[1]) for hf_name in vision if (m := block_re.match(hf_name))}
    first_absent = min(set(range(len(layers) + 1)) - layers)
    if first_absent < n_keep:
        raise LlavaGgufError(f"the vision tower lacks its layer {first_absent} (encoder.layers.{first_absent}.*), one "
                             f"of the {n_keep} layers its feature layer needs",
                             "the checkpoint is incomplete or does not match its config")
    required = set(globals_.values()) | set(proj.values()) | {
        f"v.blk.{i}.{g}.{k}" for i in range(n_keep) for g in blocks.values() for k in ("weight", "bias")}
    missing = sorted(required - have)
    if missing:
        raise LlavaGgufError(f"the vision tower or projector lacks {missing[0]}"
                             + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""),
                             "the checkpoint is incomplete (a projector without biases is not supported)")
    return planned


def expected_mmproj_shapes(vcfg: dict, text_hidden: int, n_keep: int, proj_width: int) -> dict[str, tuple[int, ...]]:
    """The shape (as the checkpoint stores it) of every mmproj tensor, by GGUF name, from the configs.
    `proj_width` is the projector's inner width (the text width for llava-hf; twice it for LLaVA v1's
    linear projector rewritten as a GELU pair)."""
    h, ff = int(vcfg["hidden_size"]), int(vcfg["intermediate_size"])
    n_patches = (int(vcfg["image_size"]) // int(vcfg["patch_size"])) ** 2
    patch = int(vcfg["patch_size"])
    want: dict[str, tuple[int, ...]] = {
        "v.class_embd": (h,),
        "v.patch_embd.weight": (h, 3, patch, patch),  # libmtmd feeds RGB
        "v.position_embd.weight": (n_patches + 1, h),
        "v.pre_ln.weight": (h,), "v.pre_ln.bias": (h,),
        # one feature layer: transformers' linear_1 takes vision_hidden * len(vision_feature_layer) inputs
        "mm.0.weight": (proj_width, h), "mm.0.bias": (proj_width,),
        "mm.2.weight": (text_hidden, proj_width), "mm.2.bias": (text_hidden,),
        "model.image_newline": (text_hidden,),
    }
    # per block: the weight's shape; every bias is (weight rows,)
    block = {"attn_q": (h, h), "attn_k": (h, h), "attn_v": (h, h), "attn_out": (h, h), "ln1": (h,), "ln2": (h,),
             "ffn_up": (ff, h), "ffn_down": (h, ff)}
    for i in range(n_keep):
        for part, weight in block.items():
            want[f"v.blk.{i}.{part}.weight"] = weight
            want[f"v.blk.{i}.{part}.bias"] = weight[:1]
    return want


def check_mmproj_tensors(vcfg: dict, text_hidden: int, n_keep: int, planned: list[PlannedTensor]) -> None:
    """Refuse a tower or projector whose tensors are not float or do not have the shapes config.json
    implies (transposed, another width or patch size): libmtmd would fail to load the file or, where
    shapes happen to fit, compute something else."""
    h, n_head = int(vcfg["hidden_size"]), int(vcfg["num_attention_heads"])
    if h % n_head:
        raise LlavaGgufError(f"config.json: vision_config.hidden_size = {h} is not a multiple of "
                             f"num_attention_heads = {n_head}", "the config is corrupt")
    if vcfg.get("num_channels", 3) != 3:
        raise LlavaGgufError(f"config.json: vision_config.num_channels = {vcfg['num_channels']!r} is not supported",
                             "libmtmd feeds the tower RGB images (3 channels)")
    by_name = {t.name: t for t in planned}
    mm2 = by_name["mm.2.weight"]
    for t in (by_name["mm.0.weight"], mm2):
        if len(t.shape) != 2:
            raise LlavaGgufError(f"projector tensor {t.source.name} has shape {list(t.shape)}, not a matrix",
                                 "the checkpoint is corrupt")
    if mm2.shape[0] != text_hidden:
        raise LlavaGgufError(f"the projector outputs {mm2.shape[0]} values per image token but the language "
                             f"model's embedding width is {text_hidden}", "the checkpoint is inconsistent")
    # the inner width from linear_2's input side: a transposed linear_1 is then named as the culprit
    want = expected_mmproj_shapes(vcfg, text_hidden, n_keep, mm2.shape[1])
    for t in sorted(planned, key=lambda t: t.name.endswith(".bias")):  # a wrong weight explains its bias
        kind = "projector" if t.name.startswith(("mm.", "model.")) else "vision"
        if t.source.dtype not in FLOAT_DTYPES:
            raise LlavaGgufError(f"{kind} tensor {t.source.name} has dtype {t.source.dtype}, not a float type",
                                 "quantized or integer checkpoints are not supported; convert the float checkpoint")
        if t.name in want and tuple(t.shape) != want[t.name]:
            raise LlavaGgufError(f"{kind} tensor {t.source.name} has shape {list(t.shape)}, config.json implies "
                                 f"{list(want[t.name])}", "the checkpoint does not match its config")


def build_mmproj(family: Family, cfg: dict, vcfg: dict, text_hidden: int, vision: dict[str, TensorRef],
                 projector: dict[str, TensorRef], src: Path, mmproj_type: str, model_name: str) -> StreamingGGUF:
    n_layers = int(vcfg["num_hidden_layers"])
    feature = feature_layer_index(cfg, n_layers)
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in _GELU_NAMES:
        raise LlavaGgufError(f"projector activation projector_hidden_act = {act!r} is not supported",
                             "libmtmd's mlp projector applies GELU")
    act_keys = _act_keys(vcfg.get("hidden_act", "quick_gelu"))  # refused before any tensor is planned
    planned = plan_mmproj(family, vision, projector, feature, mmproj_type)
    check_mmproj_tensors(vcfg, text_hidden, feature, planned)
    ftype, _ = MMPROJ_TYPES[mmproj_type]
    mean, std = image_norm(src)
    gg = StreamingGGUF("clip")
    gg.add_all(planned)
    w = gg.kv
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(model_name)
    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(family.projector_type)
    w.add_vision_projection_dim(text_hidden)
    w.add_vision_image_size(int(vcfg["image_size"]))
    w.add_vision_patch_size(int(vcfg["patch_size"]))
    w.add_vision_embedding_length(int(vcfg["hidden_size"]))
    w.add_vision_feed_forward_length(int(vcfg["intermediate_size"]))
    w.add_vision_block_count(feature)  # exactly the layers the feature layer needs
    w.add_vision_head_count(int(vcfg["num_attention_heads"]))
    w.add_vision_attention_layernorm_eps(float(vcfg.get("layer_norm_eps", 1e-5)))
    w.add_vision_image_mean([float(x) for x in mean])
    w.add_vision_image_std([float(x) for x in std])
    # clip.cpp reads this with get_arr_int, which demands an INT32 array.
    w.add_key_value("clip.vision.feature_layer", [feature], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    for key, value in act_keys.items():
        w.add_bool(key, value)
    if family.anyres:
        w.add_key_value("clip.vision.image_grid_pinpoints", grid_pinpoints(cfg, int(vcfg["image_size"])),
                        gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    return gg


def grid_pinpoints(cfg: dict, image_size: int) -> list[int]:
    """LLaVA-1.6's image_grid_pinpoints, flattened ([[h, w], ...] -> [h, w, ...]) after checking them."""
    pins = cfg.get("image_grid_pinpoints")
    ok = isinstance(pins, list) and pins and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                     and v % image_size == 0 for v in p) for p in pins)
    if not ok:
        raise LlavaGgufError(f"image_grid_pinpoints {str(pins)[:120]} is not a list of [height, width] pairs of "
                             f"positive multiples of the image size {image_size}", "the config is corrupt")
    return [int(v) for p in pins for v in p]
