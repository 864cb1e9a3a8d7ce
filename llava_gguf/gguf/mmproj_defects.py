"""What makes libmtmd (tools/mtmd/clip.cpp's loader and models/llava.cpp's graph) refuse an mmproj, abort on
it, or compute something else: the feature-layer defects of upstream llama.cpp's LLaVA files (#25817),
the keys and values clip.cpp reads, the tensors the llava graph uses and their shapes, and LLaVA-1.6's
anyres packing. See shared/llava-upstream-defects.md."""
from __future__ import annotations

import re

from llava_gguf.gguf.key_checks import KeyChecks, as_count, dims, positive, shape_defect, strip_ones
from llava_gguf.gguf.layout import ARRAY, BOOL, FLOAT32, INT32, KV_TYPES, STRING, UINT32, Defect, GGUFLayout, some_names

FEATURE_LAYER_KEY = "clip.vision.feature_layer"
# projector types that clip.cpp runs through the llava graph (models/llava.cpp)
LLAVA_GRAPH_PROJECTORS = ("mlp", "mlp_norm", "ldp", "ldpv2")


def mmproj_layers(meta: dict, tensor_names: list[str]) -> dict:
    """How many vision blocks the file stores, declares, and how many libmtmd's llava graph runs
    (models/llava.cpp: up to the deepest feature layer; with none, or only negative ones, "the second to
    last layer", block_count - 1)."""
    stored = sorted({int(m[1]) for n in tensor_names if (m := re.match(r"^v\.blk\.(\d+)\.", n))})
    declared = as_count(meta.get("clip.vision.block_count"))
    feature = meta.get(FEATURE_LAYER_KEY)
    feature = feature if isinstance(feature, list) else ([feature] if isinstance(feature, int) else None)
    if feature is not None and not all(isinstance(v, int) for v in feature):
        feature = None
    deepest = max(feature) if feature else -1
    if deepest >= 0:
        runs = deepest
    elif declared is not None:
        runs = declared - 1
    else:
        runs = None
    return {"stored_blocks": len(stored), "block_count": declared, "feature_layer": feature, "layers_run": runs,
            "_stored": stored}


def mmproj_defects(layout: GGUFLayout, meta: dict, tensor_names: list[str]) -> list[Defect]:
    """The feature-layer defects of upstream llama.cpp's LLaVA files, and what libmtmd cannot load."""
    if meta.get("clip.projector_type") not in LLAVA_GRAPH_PROJECTORS or meta.get("clip.has_vision_encoder") is not True:
        return mmproj_load_defects(layout, meta, tensor_names)
    layers = mmproj_layers(meta, tensor_names)
    declared = layers["block_count"]
    out: list[Defect] = []
    vtype, sub = layout.kv[FEATURE_LAYER_KEY][:2] if FEATURE_LAYER_KEY in layout.kv else (None, None)
    feature = layers["feature_layer"]
    if vtype is None:
        out.append(Defect(
            "feature-layer-missing",
            f"no {FEATURE_LAYER_KEY}: libmtmd runs {layers['layers_run']} of the {declared} stored vision layers "
            "(upstream llama.cpp #25817); a file from llama.cpp's legacy LLaVA route, which already left out the "
            "last layer, then gets its features one layer too early",
            repairable=declared is not None and declared >= 1))
    elif (vtype, sub) != (ARRAY, INT32):
        kind = KV_TYPES[vtype][0] if sub is None else f"ARRAY of {KV_TYPES[sub][0]}"
        out.append(Defect("feature-layer-type",
                          f"{FEATURE_LAYER_KEY} is stored as {kind}; clip.cpp reads only an INT32 array and refuses "
                          "to load the file", repairable=bool(feature) and min(feature) >= 0))
    if vtype is not None and (not feature or max(feature) < 0):
        out.append(Defect("feature-layer-unset",
                          f"{FEATURE_LAYER_KEY} is {feature}: clip.cpp takes negative or no values as unset and runs "
                          f"{layers['layers_run']} of the {declared} layers; `llava-gguf repair --feature-layer N` "
                          "writes the non-negative index (HF's -2 of an n-layer tower is n - 1)", repairable=False))
    if feature and declared is not None and max(feature) > declared:
        out.append(Defect("feature-layer-out-of-range",
                          f"{FEATURE_LAYER_KEY} {feature} is beyond clip.vision.block_count {declared}: libmtmd "
                          "refuses to load the file", repairable=False))
    if declared is not None:
        stored = set(layers["_stored"])
        n_absent = declared - len(stored & set(range(min(declared, max(stored, default=0) + 1))))
        if n_absent > 0:  # the first few absent ones, without building range(block_count) (hostile counts)
            absent = [i for i in range(min(declared, len(stored) + 5)) if i not in stored][:5]
            out.append(Defect("blocks-missing",
                              f"clip.vision.block_count is {declared} but block(s) {absent} are not stored: "
                              "libmtmd cannot load the file", repairable=False))
    if "v.post_ln.weight" in tensor_names:
        out.append(Defect("post-layernorm",
                          "v.post_ln is stored: the llava graph applies CLIP's post-layernorm to the image "
                          "features, which LLaVA does not", repairable=True))
    return out + mmproj_load_defects(layout, meta, tensor_names)


def mmproj_load_defects(layout: GGUFLayout, meta: dict, tensor_names: list[str]) -> list[Defect]:
    """clip.cpp's clip_model_loader (load_hparams, load_tensors) and the llava graph (models/llava.cpp):
    the keys it requires and the types it reads them as (its get_u32 & co. abort on another type), the
    values it refuses or cannot run, and the tensors the llava graph uses."""
    keys = KeyChecks(layout, meta, "clip.cpp")
    out: list[Defect] = []
    if keys.get("clip.has_vision_encoder", BOOL, required=False) is not True:
        if "clip.has_vision_encoder" not in layout.kv or layout.kv["clip.has_vision_encoder"][:2] == (BOOL, None):
            out.append(Defect("vision-encoder-missing", "clip.has_vision_encoder is missing or false: libmtmd loads "
                              "no vision encoder from the file and cannot take images", False))
        return out + keys.defects()
    proj = keys.get("clip.projector_type", STRING, required=False)
    if proj is None and "clip.projector_type" not in layout.kv:
        proj = keys.get("clip.vision.projector_type", STRING, required=False)
        if proj is None and "clip.vision.projector_type" not in layout.kv:
            keys.missing.append("clip.projector_type")
    v = "clip.vision."
    n_embd = keys.get(v + "embedding_length", UINT32)
    n_head = keys.get(v + "attention.head_count", UINT32)
    head_dim = keys.get(v + "attention.head_dim", UINT32, required=False)
    n_ff = keys.get(v + "feed_forward_length", UINT32)
    n_layer = keys.get(v + "block_count", UINT32)
    keys.get(v + "projection_dim", UINT32)
    keys.get(v + "attention.layer_norm_epsilon", FLOAT32)
    n_head_kv = keys.get(v + "attention.head_count_kv", UINT32, required=False)
    size = keys.get(v + "image_size", UINT32)
    patch = keys.get(v + "patch_size", UINT32)
    gelu = keys.get("clip.use_gelu", BOOL, required=False)
    silu = keys.get("clip.use_silu", BOOL, required=False)
    keys.get(v + "mm_patch_merge_type", STRING, required=False)
    keys.get(v + "image_grid_pinpoints", INT32, required=False, array_of=INT32)
    keys.get(v + "image_mean", FLOAT32, array_of=FLOAT32)
    keys.get(v + "image_std", FLOAT32, array_of=FLOAT32)
    out += keys.defects()

    if isinstance(size, int) and not 0 < size <= 8192:
        out.append(Defect("image-size-invalid", f"clip.vision.image_size is {size}: " + (
            "clip.cpp refuses sizes above 8192" if size else "the llava graph needs the fixed square size its "
            "position embeddings were trained for; libmtmd cannot encode an image") + " (convert again)", False))
    if isinstance(patch, int) and not 0 < patch < 65536:
        out.append(Defect("patch-size-invalid", f"clip.vision.patch_size is {patch}: clip.cpp refuses to load the "
                          "file (it must be positive and less than 65536)", False))
    elif isinstance(patch, int) and positive(size) and patch > size:
        out.append(Defect("patch-size-invalid", f"clip.vision.patch_size {patch} is larger than image_size {size}: "
                          "the llava graph gets no patches", False))
    bad: list[str] = []
    for key, value in ((v + "embedding_length", n_embd), (v + "attention.head_count", n_head),
                       (v + "block_count", n_layer), (v + "feed_forward_length", n_ff)):
        if isinstance(value, int) and not positive(value):
            bad.append(f"{key} is {value} (clip.cpp needs 1 to 2^31-1)")
    if positive(n_embd) and positive(n_head) and not head_dim and n_embd % n_head:
        bad.append(f"embedding_length {n_embd} is not a multiple of head_count {n_head} (the attention reshape aborts)")
    if positive(n_head) and isinstance(n_head_kv, int) and (n_head_kv <= 0 or n_head % n_head_kv):
        bad.append(f"attention.head_count_kv {n_head_kv} does not divide head_count {n_head}")
    if gelu is True and silu is True:
        bad.append("clip.use_gelu and clip.use_silu are both true (clip.cpp refuses)")
    pins = layout.kv.get(v + "image_grid_pinpoints")
    if pins is not None and pins[:2] == (ARRAY, INT32) and pins[2] % 2:
        bad.append(f"image_grid_pinpoints has an odd number of values ({pins[2]}; clip.cpp refuses)")
    for key in (v + "image_mean", v + "image_std"):
        got = layout.kv.get(key)
        if got is not None and got[:2] == (ARRAY, FLOAT32) and got[2] < 3:
            bad.append(f"{key} has {got[2]} values (clip.cpp needs 3)")
    if bad:
        out.append(Defect("hparam-invalid", "; ".join(bad[:4]) + ": libmtmd cannot load or run the file", False))
    if proj not in LLAVA_GRAPH_PROJECTORS:
        return out
    out += _llava_graph_tensors(layout, meta, tensor_names, n_embd, n_head, n_head_kv, n_ff, n_layer, size, patch)
    return out + _anyres_defects(layout, meta)


def _anyres_defects(layout: GGUFLayout, meta: dict) -> list[Defect]:
    """LLaVA-1.6 (image_grid_pinpoints): libmtmd tiles the image but leaves the packing (unpadding,
    image_newline rows) to the caller; llava-gguf's runtime does it from the pinpoints and
    model.image_newline, and refuses a file without them."""
    got = layout.kv.get("clip.vision.image_grid_pinpoints")
    if got is None or got[:2] != (ARRAY, INT32) or got[2] % 2:
        return []  # absent, or already a key-type / hparam-invalid defect
    size, pins = as_count(meta.get("clip.vision.image_size")), meta.get("clip.vision.image_grid_pinpoints")
    problems = []
    if isinstance(pins, list) and positive(size) and not all(isinstance(v, int) and v > 0 and v % size == 0
                                                               for v in pins):
        problems.append(f"image_grid_pinpoints {pins[:10]} are not positive multiples of image_size {size}")
    newline = next((t for t in layout.tensors if t.name == "model.image_newline"), None)
    mm2 = next((t for t in layout.tensors if t.name == "mm.2.weight"), None)
    if newline is None:
        problems.append("model.image_newline is missing")
    elif mm2 is not None and len(mm2.ne) >= 2 and newline.n_elements != mm2.ne[1]:
        problems.append(f"model.image_newline has {newline.n_elements} values, the projector writes {mm2.ne[1]}")
    if not problems:
        return []
    return [Defect("anyres-invalid", "; ".join(problems) + ": llava-gguf's runtime refuses the LLaVA-1.6 file, "
                   "and other libmtmd-based apps pack its image rows wrongly", False)]


def _llava_graph_tensors(layout, meta, names, n_embd, n_head, n_head_kv, n_ff, n_layer, size, patch) -> list[Defect]:
    """The tensors clip.cpp's loader requires and the llava graph uses, and their shapes."""
    by_name = {t.name: t for t in layout.tensors}
    stored_blocks = mmproj_layers(meta, names)["_stored"]
    blocks = [b for b in stored_blocks if positive(n_layer) and b < n_layer]  # wholly absent: blocks-missing
    required = ["v.patch_embd.weight", "v.position_embd.weight"]
    for b in blocks:
        required += [f"v.blk.{b}.{p}.weight" for p in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2",
                                                      "ffn_up", "ffn_down")]
    proj = meta.get("clip.projector_type")
    if proj == "mlp_norm" or (proj == "mlp" and "mm.3.weight" in by_name):  # clip.cpp: mm.3 makes it mlp_norm
        required += [f"mm.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    elif proj == "mlp":  # mm.2 is optional to the loader, but clip_n_mmproj_embd reads its shape
        required += [f"mm.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    missing = [n for n in required if n not in by_name]
    out: list[Defect] = []
    if missing:
        out.append(Defect("tensor-missing", f"tensor(s) {some_names(missing)} are missing: clip.cpp refuses to load the "
                          "file, or the llava graph has nothing to compute with", False))
    if not (positive(n_embd) and positive(size, 8192) and positive(patch, 65535)):
        return out
    want: dict[str, tuple[int, ...]] = {"v.patch_embd.weight": (patch, patch, 3, n_embd)}
    n_pos = (size // patch) ** 2 + (1 if "v.class_embd" in by_name else 0)
    want["v.position_embd.weight"] = (n_embd, n_pos)
    want["v.class_embd"] = (n_embd,)
    kv_width = n_embd
    if positive(n_head) and positive(n_head_kv) and n_embd % n_head == 0:
        kv_width = n_embd // n_head * n_head_kv
    for b in blocks:
        p = f"v.blk.{b}."
        want.update({p + "attn_q.weight": (n_embd, n_embd), p + "attn_out.weight": (n_embd, n_embd),
                     p + "attn_k.weight": (n_embd, kv_width), p + "attn_v.weight": (n_embd, kv_width),
                     p + "ln1.weight": (n_embd,), p + "ln2.weight": (n_embd,)})
    wrong = [f"{n} {list(dims(by_name[n]))} (expected {list(s)})" for n, s in want.items()
             if n in by_name and dims(by_name[n]) != strip_ones(s)]
    if positive(n_ff):  # clip.cpp swaps up and down when a file stores them the other way round
        for b in blocks:
            up, down = by_name.get(f"v.blk.{b}.ffn_up.weight"), by_name.get(f"v.blk.{b}.ffn_down.weight")
            if up and down and {dims(up), dims(down)} != {(n_embd, n_ff), (n_ff, n_embd)}:
                wrong.append(f"v.blk.{b}.ffn_up/ffn_down {list(dims(up))}/{list(dims(down))} (expected "
                             f"{[n_embd, n_ff]} and {[n_ff, n_embd]})")
    mm0, mm2 = by_name.get("mm.0.weight"), by_name.get("mm.2.weight")
    single = not isinstance(meta.get(FEATURE_LAYER_KEY), list) or len(meta[FEATURE_LAYER_KEY]) <= 1
    if mm0 is not None and single and len(mm0.ne) >= 2 and mm0.ne[0] != n_embd:
        wrong.append(f"mm.0.weight {list(dims(mm0))} (its input width must be the tower's {n_embd})")
    if mm0 is not None and mm2 is not None and len(mm0.ne) >= 2 and len(mm2.ne) >= 2 and mm2.ne[0] != mm0.ne[1]:
        wrong.append(f"mm.2.weight {list(dims(mm2))} (its input width must be mm.0's output {mm0.ne[1]})")
    return out + shape_defect(wrong, "clip.cpp")
