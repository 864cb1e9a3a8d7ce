"""What makes llama.cpp (an LLM GGUF) or libmtmd (an mmproj: tools/mtmd/clip.cpp and models/llava.cpp)
refuse a file, abort on it (GGML_ASSERT: the whole process dies), or compute something else: each condition
is a Defect. `inspect` reports them all; the runtime (before llama.cpp and libmtmd see the files) and
`quantize` (before llama.cpp's quantizer reads its source) refuse a file with any defect that stops a
loader (`require_loadable`), with one line naming it. The file's structure is gguf_layout's; this is what
the loaders read from its keys and tensor infos. See shared/llava-upstream-defects.md."""
from __future__ import annotations

from pathlib import Path

from .errors import LlavaGgufError
from .chat_template import template_problem
from .gguf_layout import (ARRAY, BOOL, FLOAT32, INT32, KV_TYPES, STRING, UINT32, Defect, GGUFLayout, TensorInfo,
                          layout_defects, read_gguf_layout, some_names)

FEATURE_LAYER_KEY = "clip.vision.feature_layer"
# projector types that clip.cpp runs through the llava graph (models/llava.cpp)
LLAVA_GRAPH_PROJECTORS = ("mlp", "mlp_norm", "ldp", "ldpv2")
_LONG_ARRAY = 16  # arrays longer than this (token lists, scores) are summarised in the metadata

# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): load_hparams asserts block_count is 1..512 (an abort)
LLAMA_MAX_LAYERS = 512


# ------------------------------------------------------------------------------------------ metadata
def read_metadata(reader) -> dict:
    import gguf

    out: dict = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _LONG_ARRAY:
            sub = field.types[-1].name if len(field.types) > 1 else "?"
            out[name] = {"array": sub, "length": len(field.data)}
            continue
        out[name] = _plain(_contents(field))
    return out


def _contents(field):
    """field.contents(), with strings that are not UTF-8 decoded with replacement (gguf-py raises)."""
    import gguf

    t = field.types
    if t and t[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    if len(t) > 1 and t[0] == gguf.GGUFValueType.ARRAY and t[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    return field.contents()


def _plain(v):
    """JSON-ready: numpy scalars as Python numbers, lists element-wise."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


# ------------------------------------------------------------------------------ keys the loaders read
class _Keys:
    """Checks of the keys a loader reads, collected into a few defects (one per kind, not one per key)."""

    def __init__(self, layout: GGUFLayout, meta: dict, loader: str) -> None:
        self.layout, self.meta, self.loader = layout, meta, loader  # loader: "clip.cpp" or "llama.cpp"
        self.missing: list[str] = []
        self.mistyped: list[str] = []

    def get(self, key: str, want: int, *, required: bool = True, array_of: int | None = None,
            alt_array: bool = False):
        """The value of `key` when it is stored as the loader reads it (`want`; with `array_of`, an ARRAY
        of that type; with `alt_array`, a per-layer ARRAY of `want` is accepted too), else None, noting a
        missing or mistyped key."""
        got = self.layout.kv.get(key)
        if got is None:
            if required:
                self.missing.append(key)
            return None
        vtype, sub, _ = got
        ok = (vtype, sub) == (ARRAY, array_of) if array_of is not None else \
            (vtype == want and sub is None) or (alt_array and vtype == ARRAY and sub in (INT32, UINT32))
        if not ok:
            stored = KV_TYPES[vtype][0] if sub is None else f"ARRAY of {KV_TYPES[sub][0]}"
            wanted = f"ARRAY of {KV_TYPES[array_of][0]}" if array_of is not None else KV_TYPES[want][0]
            self.mistyped.append(f"{key} ({stored}, read as {wanted})")
            return None
        return self.meta.get(key)

    def defects(self) -> list[Defect]:
        out = []
        if self.missing:
            out.append(Defect("key-missing", f"key(s) {some_names(self.missing)} are missing: {self.loader} refuses to "
                              "load the file", False))
        if self.mistyped:
            out.append(Defect("key-type", f"key(s) {some_names(self.mistyped)} are stored with another type than "
                              f"{self.loader} reads: it refuses to load the file or aborts (GGML_ASSERT)", False))
        return out


def _count(value, *, array_ok: bool = False) -> int | None:
    """An integer hparam as a number (the largest entry of a per-layer array), or None."""
    if array_ok and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return max(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shape_defect(wrong: list[str], loader: str) -> list[Defect]:
    return [Defect("tensor-shape-mismatch", f"tensor(s) {some_names(wrong)} do not have the shape the hparams give: "
                   f"{loader} refuses to load the file or aborts building its graph", False)] if wrong else []


def _strip(shape) -> tuple[int, ...]:
    """A shape without ggml's trailing 1s."""
    s = list(shape)
    while s and s[-1] == 1:
        s.pop()
    return tuple(s)


def _ne(t: TensorInfo) -> tuple[int, ...]:
    return _strip(t.ne)


def _positive(value, limit: int = 0x7FFFFFFF) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


# ------------------------------------------------------------------------------------------ mmproj
def mmproj_layers(meta: dict, tensor_names: list[str]) -> dict:
    """How many vision blocks the file stores, declares, and how many libmtmd's llava graph runs
    (models/llava.cpp: up to the deepest feature layer; with none, or only negative ones, "the second to
    last layer", block_count - 1)."""
    import re

    stored = sorted({int(m[1]) for n in tensor_names if (m := re.match(r"^v\.blk\.(\d+)\.", n))})
    declared = _count(meta.get("clip.vision.block_count"))
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
    vtype, sub, _ = layout.kv.get(FEATURE_LAYER_KEY, (None, None, 0))
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
    keys = _Keys(layout, meta, "clip.cpp")
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
    elif isinstance(patch, int) and _positive(size) and patch > size:
        out.append(Defect("patch-size-invalid", f"clip.vision.patch_size {patch} is larger than image_size {size}: "
                          "the llava graph gets no patches", False))
    bad: list[str] = []
    for key, value in ((v + "embedding_length", n_embd), (v + "attention.head_count", n_head),
                       (v + "block_count", n_layer), (v + "feed_forward_length", n_ff)):
        if isinstance(value, int) and not _positive(value):
            bad.append(f"{key} is {value} (clip.cpp needs 1 to 2^31-1)")
    if _positive(n_embd) and _positive(n_head) and not head_dim and n_embd % n_head:
        bad.append(f"embedding_length {n_embd} is not a multiple of head_count {n_head} (the attention reshape aborts)")
    if _positive(n_head) and isinstance(n_head_kv, int) and (n_head_kv <= 0 or n_head % n_head_kv):
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
    size, pins = _count(meta.get("clip.vision.image_size")), meta.get("clip.vision.image_grid_pinpoints")
    problems = []
    if isinstance(pins, list) and _positive(size) and not all(isinstance(v, int) and v > 0 and v % size == 0
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
    blocks = [b for b in stored_blocks if _positive(n_layer) and b < n_layer]  # wholly absent: blocks-missing
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
    if not (_positive(n_embd) and _positive(size, 8192) and _positive(patch, 65535)):
        return out
    want: dict[str, tuple[int, ...]] = {"v.patch_embd.weight": (patch, patch, 3, n_embd)}
    n_pos = (size // patch) ** 2 + (1 if "v.class_embd" in by_name else 0)
    want["v.position_embd.weight"] = (n_embd, n_pos)
    want["v.class_embd"] = (n_embd,)
    kv_width = n_embd
    if _positive(n_head) and _positive(n_head_kv) and n_embd % n_head == 0:
        kv_width = n_embd // n_head * n_head_kv
    for b in blocks:
        p = f"v.blk.{b}."
        want.update({p + "attn_q.weight": (n_embd, n_embd), p + "attn_out.weight": (n_embd, n_embd),
                     p + "attn_k.weight": (n_embd, kv_width), p + "attn_v.weight": (n_embd, kv_width),
                     p + "ln1.weight": (n_embd,), p + "ln2.weight": (n_embd,)})
    wrong = [f"{n} {list(_ne(by_name[n]))} (expected {list(s)})" for n, s in want.items()
             if n in by_name and _ne(by_name[n]) != _strip(s)]
    if _positive(n_ff):  # clip.cpp swaps up and down when a file stores them the other way round
        for b in blocks:
            up, down = by_name.get(f"v.blk.{b}.ffn_up.weight"), by_name.get(f"v.blk.{b}.ffn_down.weight")
            if up and down and {_ne(up), _ne(down)} != {(n_embd, n_ff), (n_ff, n_embd)}:
                wrong.append(f"v.blk.{b}.ffn_up/ffn_down {list(_ne(up))}/{list(_ne(down))} (expected "
                             f"{[n_embd, n_ff]} and {[n_ff, n_embd]})")
    mm0, mm2 = by_name.get("mm.0.weight"), by_name.get("mm.2.weight")
    single = not isinstance(meta.get(FEATURE_LAYER_KEY), list) or len(meta[FEATURE_LAYER_KEY]) <= 1
    if mm0 is not None and single and len(mm0.ne) >= 2 and mm0.ne[0] != n_embd:
        wrong.append(f"mm.0.weight {list(_ne(mm0))} (its input width must be the tower's {n_embd})")
    if mm0 is not None and mm2 is not None and len(mm0.ne) >= 2 and len(mm2.ne) >= 2 and mm2.ne[0] != mm0.ne[1]:
        wrong.append(f"mm.2.weight {list(_ne(mm2))} (its input width must be mm.0's output {mm0.ne[1]})")
    return out + _shape_defect(wrong, "clip.cpp")


# --------------------------------------------------------------------------------------------- LLM
# llama-vocab.cpp's tokenizer models (tokenizer.ggml.model)
_TOKENIZERS = ("no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "test",
               "plamo2", "gemma4")
_LLAMA_LAYER_OPTIONAL = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "attn_qkv.weight",
                         "attn_qkv.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias", "rope_freqs.weight")


def llm_defects(layout: GGUFLayout, meta: dict, arch: str) -> list[Defect]:
    """llama.cpp's llama_model_base::load_hparams (every architecture), the vocabulary's keys (llama-vocab.cpp)
    and, for the llama architecture, load_arch_hparams and the tensors load_arch_tensors creates."""
    keys = _Keys(layout, meta, "llama.cpp")
    if not isinstance(meta.get("general.architecture"), str):
        keys.get("general.architecture", STRING)
        return keys.defects()
    llama = arch == "llama"
    n_ctx = keys.get(f"{arch}.context_length", UINT32)
    n_embd = keys.get(f"{arch}.embedding_length", UINT32)
    n_layer = keys.get(f"{arch}.block_count", UINT32)
    n_head = _count(keys.get(f"{arch}.attention.head_count", UINT32, required=llama, alt_array=True), array_ok=True)
    n_head_kv = _count(keys.get(f"{arch}.attention.head_count_kv", UINT32, required=False, alt_array=True),
                       array_ok=True)
    n_ff = keys.get(f"{arch}.feed_forward_length", UINT32, required=llama, alt_array=True)
    n_rot = keys.get(f"{arch}.rope.dimension_count", UINT32, required=False)
    # the head size: key_length / value_length when given (a config's head_dim), else n_embd / n_head
    head_k = keys.get(f"{arch}.attention.key_length", UINT32, required=False)
    head_v = keys.get(f"{arch}.attention.value_length", UINT32, required=False)
    n_expert = keys.get(f"{arch}.expert_count", UINT32, required=False)
    n_used = _count(keys.get(f"{arch}.expert_used_count", UINT32, required=False, alt_array=True), array_ok=True)
    n_groups = keys.get(f"{arch}.expert_group_count", UINT32, required=False)
    n_group_used = keys.get(f"{arch}.expert_group_used_count", UINT32, required=False)
    n_nextn = keys.get(f"{arch}.nextn_predict_layers", UINT32, required=False)
    rope_scaling = keys.get(f"{arch}.rope.scaling.type", STRING, required=False)
    if llama:
        keys.get(f"{arch}.attention.layer_norm_rms_epsilon", FLOAT32)
    tokenizer = keys.get("tokenizer.ggml.model", STRING)
    keys.get("tokenizer.ggml.tokens", STRING, array_of=STRING)
    if tokenizer in ("gpt2", "hybriddna", "whitespace") and meta.get("tokenizer.ggml.pre") != "kimi-k2":
        keys.get("tokenizer.ggml.merges", STRING, array_of=STRING)  # BPE: "cannot find tokenizer merges"
    n_vocab = layout.kv.get("tokenizer.ggml.tokens", (None, None, None))[2]
    for key, kinds in (("tokenizer.ggml.scores", (FLOAT32, INT32)), ("tokenizer.ggml.token_type", (INT32,))):
        got = layout.kv.get(key)
        if got is not None and (got[0] != ARRAY or got[1] not in kinds):
            keys.mistyped.append(f"{key} (read as an ARRAY of {' or '.join(KV_TYPES[k][0] for k in kinds)})")
    out = keys.defects()

    bad: list[str] = []
    if isinstance(n_layer, int) and not 0 < n_layer <= LLAMA_MAX_LAYERS:
        bad.append(f"block_count is {n_layer} (llama.cpp aborts outside 1..{LLAMA_MAX_LAYERS})")
    bad += _abort_hparams(n_layer, n_nextn, n_expert, n_used, n_groups, n_group_used, rope_scaling)
    for name, value in (("context_length", n_ctx), ("embedding_length", n_embd)):
        if isinstance(value, int) and value <= 0:
            bad.append(f"{name} is {value}")
    if llama and n_head is not None and n_head <= 0:
        bad.append(f"attention.head_count is {n_head}")
    if _positive(n_embd) and _positive(n_head) and n_embd % n_head and not (_positive(head_k) and _positive(head_v)):
        bad.append(f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
    for name, value in (("key_length", head_k), ("value_length", head_v)):
        if isinstance(value, int) and value <= 0:
            bad.append(f"attention.{name} is {value}")
    if _positive(n_head) and n_head_kv is not None and (n_head_kv <= 0 or n_head % n_head_kv):
        bad.append(f"head_count_kv {n_head_kv} does not divide head_count {n_head}")
    head = head_k if _positive(head_k) else n_embd // n_head if _positive(n_embd) and _positive(n_head) else None
    if llama and head is not None and isinstance(n_rot, int) and n_rot != head:
        bad.append(f"rope.dimension_count {n_rot} is not the head size {head} (llama.cpp: invalid n_rot)")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        got = layout.kv.get(key)
        if got is not None and got[0] == ARRAY and isinstance(n_vocab, int) and got[2] < n_vocab:
            bad.append(f"{key} has {got[2]} entries for {n_vocab} tokens")
    if isinstance(tokenizer, str) and tokenizer not in _TOKENIZERS:
        bad.append(f"tokenizer.ggml.model {tokenizer[:40]!r} is not a tokenizer llama.cpp knows")
    if bad:
        out.append(Defect("hparam-invalid", "; ".join(bad[:4]) + ": llama.cpp refuses to load the model or aborts",
                          False))
    if not llama or n_expert or not (_positive(n_embd) and _positive(n_head) and _positive(n_layer, LLAMA_MAX_LAYERS)
                                     and _positive(n_vocab)) or bad:
        return out
    hk = head_k if _positive(head_k) else n_embd // n_head
    hv = head_v if _positive(head_v) else n_embd // n_head
    return out + _llama_tensors(layout, n_embd, n_head, n_head_kv or n_head, hk, hv, n_ff, n_layer, n_vocab)


def _abort_hparams(n_layer, n_nextn, n_expert, n_used, n_groups, n_group_used, rope_scaling) -> list[str]:
    """llama_model_base::load_hparams' other GGML_ASSERTs on values a file sets (each aborts the process)."""
    bad: list[str] = []
    ints = [v if isinstance(v, int) else 0 for v in (n_layer, n_nextn, n_expert, n_used, n_groups, n_group_used)]
    n_layer, n_nextn, n_expert, n_used, n_groups, n_group_used = ints
    if n_nextn > n_layer > 0:
        bad.append(f"nextn_predict_layers {n_nextn} is more than block_count {n_layer}")
    if n_expert > 1024:  # LLAMA_MAX_EXPERTS
        bad.append(f"expert_count is {n_expert} (llama.cpp allows at most 1024)")
    elif n_used > n_expert or (n_expert and not n_used):
        bad.append(f"expert_used_count {n_used} does not fit expert_count {n_expert}")
    elif n_expert and (n_groups >= n_expert or (n_groups > 1 and (n_expert % n_groups or not 0 < n_group_used < n_groups))):
        bad.append(f"expert_group_count {n_groups} / expert_group_used_count {n_group_used} do not fit expert_count "
                   f"{n_expert}")
    elif not n_expert and n_groups:
        bad.append(f"expert_group_count is {n_groups} without experts")
    if isinstance(rope_scaling, str) and rope_scaling not in ("none", "linear", "yarn", "longrope"):
        bad.append(f"rope.scaling.type {rope_scaling[:40]!r} is not one llama.cpp knows")
    return bad


def _llama_tensors(layout, n_embd, n_head, n_head_kv, head_k, head_v, n_ff, n_layer, n_vocab) -> list[Defect]:
    """models/llama.cpp's load_arch_tensors (dense): what must be there, with which shape (heads of head_k
    / head_v values: key_length / value_length); and llama.cpp's loader refuses a file with tensors it did
    not create ("wrong number of tensors")."""
    by_name = {t.name: t for t in layout.tensors}
    n_q, n_k, n_v, n_o = n_head * head_k, n_head_kv * head_k, n_head_kv * head_v, n_head * head_v
    ff = n_ff if _positive(n_ff) else None  # a per-layer array: shapes not checked
    want: dict[str, tuple | None] = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    optional: dict[str, tuple | None] = {"output.weight": (n_embd, n_vocab), "rope_freqs.weight": None}
    for i in range(n_layer):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": (n_embd,), p + "attn_output.weight": (n_o, n_embd),
                     p + "ffn_norm.weight": (n_embd,), p + "ffn_gate.weight": ff and (n_embd, ff),
                     p + "ffn_up.weight": ff and (n_embd, ff), p + "ffn_down.weight": ff and (ff, n_embd)})
        qkv = {p + "attn_q.weight": (n_embd, n_q), p + "attn_k.weight": (n_embd, n_k),
               p + "attn_v.weight": (n_embd, n_v)}
        (optional if p + "attn_qkv.weight" in by_name else want).update(qkv)
        optional.update({p + s: None for s in _LLAMA_LAYER_OPTIONAL})
        optional[p + "attn_qkv.weight"] = (n_embd, n_q + n_k + n_v)
    missing = [n for n in want if n not in by_name]
    wrong = [f"{n} {list(_ne(by_name[n]))} (expected {list(s)})" for n, s in {**want, **optional}.items()
             if s and n in by_name and _ne(by_name[n]) != _strip(s)]
    extra = [n for n in by_name if n not in want and n not in optional]
    out: list[Defect] = []
    if missing:
        out.append(Defect("tensor-missing", f"tensor(s) {some_names(missing)} are missing: llama.cpp refuses to load "
                          "the model (\"missing tensor\")", False))
    if extra:
        out.append(Defect("tensor-unexpected", f"tensor(s) {some_names(extra)} are not part of a {n_layer}-layer llama "
                          "model: llama.cpp refuses to load it (\"wrong number of tensors\")", False))
    return out + _shape_defect(wrong, "llama.cpp")


# ------------------------------------------------------------------------------------------ vocabulary
def vocab_defects(layout: GGUFLayout, reader) -> list[Defect]:
    """What llama-vocab.cpp's load() aborts on in the token list (its other refusals are key-type and
    hparam-invalid defects above)."""
    if layout.kv.get("tokenizer.ggml.tokens", (None, None))[:2] != (ARRAY, STRING):
        return []
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return []
    # load() maps each token's text to its id and then asserts GGML_ASSERT(id_to_token.size() ==
    # token_to_id.size()): two equal texts abort the process. It reads each text as a C string (up to its
    # first NUL) and names an empty one "[EMPTY_<id>]", so texts are compared as it sees them.
    seen: dict[bytes, int] = {}
    dups: list[str] = []
    for i, part in enumerate(field.data):
        text = bytes(field.parts[part]).split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode()
        first = seen.setdefault(text, i)
        if first != i:
            dups.append(f"{text[:40].decode('utf-8', 'replace')!r} (ids {first} and {i})")
    if not dups:
        return []
    return [Defect("vocab-duplicate-token", f"tokenizer.ggml.tokens holds the same token text more than once: "
                   f"{some_names(dups)}; llama.cpp aborts loading the vocabulary (GGML_ASSERT id_to_token.size() "
                   "== token_to_id.size())", False)]


# ------------------------------------------------------------------------------------- the load gate
# Defects of files that llama.cpp and libmtmd load and run: `inspect` reports them and `repair` fixes them,
# but the runtime and quantize go on (a legacy mmproj without its feature layer runs, one layer short).
LOADS_ANYWAY = frozenset({"feature-layer-missing", "feature-layer-unset", "post-layernorm"})


def field_value(reader, key: str):
    """A key's value (gguf-py's contents()), strings that are not UTF-8 decoded with replacement (gguf-py
    raises UnicodeDecodeError): for display and for roles; a loader's check never trusts the text."""
    field = reader.fields.get(key)
    return None if field is None else _contents(field)


def gguf_defects(layout: GGUFLayout, reader) -> list[Defect]:
    """Every defect of a GGUF (its structure, then its role's keys and tensors), as `inspect` reports them."""
    meta = read_metadata(reader)
    defects = layout_defects(layout)
    names = [t.name for t in layout.tensors]
    arch = meta.get("general.architecture")
    if arch == "clip":
        return defects + mmproj_defects(layout, meta, names)
    arch = arch if isinstance(arch, str) else "?"
    return defects + llm_defects(layout, meta, arch) + vocab_defects(layout, reader)


def require_loadable(path: Path | str, what: str, walked: tuple[GGUFLayout, object] | None = None):
    """The gguf-py reader (key-value section only) of a GGUF file llama.cpp or libmtmd can load, or a
    one-line error naming the first defect that makes it refuse or abort: run before a file is handed
    to llama.cpp (the runtime's lc.Llama and mtmd_init_from_file, quantize's llama_model_quantize).
    `walked`: the file's (layout, key-value reader) when the caller has walked it already."""
    path = Path(path)
    if walked is None and not path.exists():
        raise LlavaGgufError(f"{what} {path} does not exist")
    layout, reader = walked if walked is not None else read_gguf_layout(path)
    fatal = [d for d in gguf_defects(layout, reader) if d.code not in LOADS_ANYWAY]
    if fatal:
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise LlavaGgufError(f"{path} cannot be loaded: {fatal[0].code}: {fatal[0].message}{more}",
                             "`llava-gguf inspect` lists every defect; convert the model again")
    return reader


def chat_template_defects(reader) -> list:
    """inspect's defect for an LLM GGUF whose tokenizer.chat_template cannot render a prompt."""
    field = reader.fields.get("tokenizer.chat_template")
    if field is None or not field.types or field.types[0] != 8:  # absent, or not a STRING (key-type's concern)
        return []
    problem = template_problem(bytes(field.parts[-1]))
    if problem is None:
        return []
    return [Defect("chat-template-invalid", f"tokenizer.chat_template cannot render a prompt: {problem}; llava-gguf's "
                   "chat refuses the model (the family's default template may not be the model's prompt format), "
                   "and llama.cpp's Jinja route (--jinja) fails", False)]
