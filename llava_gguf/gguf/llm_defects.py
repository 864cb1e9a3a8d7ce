"""What makes llama.cpp refuse an LLM GGUF or abort on it (GGML_ASSERT: the whole process dies):
llama_model_base::load_hparams (every architecture), the vocabulary's keys (llama-vocab.cpp) and, for the
llama architecture, load_arch_hparams and the tensors load_arch_tensors creates."""
from __future__ import annotations

from llava_gguf.gguf.key_checks import KeyChecks, as_count, dims, positive, shape_defect, strip_ones
from llava_gguf.gguf.layout import ARRAY, FLOAT32, INT32, KV_TYPES, STRING, UINT32, Defect, GGUFLayout, some_names

# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): load_hparams asserts block_count is 1..512 (an abort)
LLAMA_MAX_LAYERS = 512
# llama-vocab.cpp's tokenizer models (tokenizer.ggml.model)
_TOKENIZERS = ("no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "test",
               "plamo2", "gemma4")
_LLAMA_LAYER_OPTIONAL = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "attn_qkv.weight",
                         "attn_qkv.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias", "rope_freqs.weight")


def llm_defects(layout: GGUFLayout, meta: dict, arch: str) -> list[Defect]:
    """llama.cpp's llama_model_base::load_hparams (every architecture), the vocabulary's keys (llama-vocab.cpp)
    and, for the llama architecture, load_arch_hparams and the tensors load_arch_tensors creates."""
    keys = KeyChecks(layout, meta, "llama.cpp")
    if not isinstance(meta.get("general.architecture"), str):
        keys.get("general.architecture", STRING)
        return keys.defects()
    llama = arch == "llama"
    n_ctx = keys.get(f"{arch}.context_length", UINT32)
    n_embd = keys.get(f"{arch}.embedding_length", UINT32)
    n_layer = keys.get(f"{arch}.block_count", UINT32)
    n_head = as_count(keys.get(f"{arch}.attention.head_count", UINT32, required=llama, alt_array=True), array_ok=True)
    n_head_kv = as_count(keys.get(f"{arch}.attention.head_count_kv", UINT32, required=False, alt_array=True),
                       array_ok=True)
    n_ff = keys.get(f"{arch}.feed_forward_length", UINT32, required=llama, alt_array=True)
    n_rot = keys.get(f"{arch}.rope.dimension_count", UINT32, required=False)
    # the head size: key_length / value_length when given (a config's head_dim), else n_embd / n_head
    head_k = keys.get(f"{arch}.attention.key_length", UINT32, required=False)
    head_v = keys.get(f"{arch}.attention.value_length", UINT32, required=False)
    n_expert = keys.get(f"{arch}.expert_count", UINT32, required=False)
    n_used = as_count(keys.get(f"{arch}.expert_used_count", UINT32, required=False, alt_array=True), array_ok=True)
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
    if positive(n_embd) and positive(n_head) and n_embd % n_head and not (positive(head_k) and positive(head_v)):
        bad.append(f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
    for name, value in (("key_length", head_k), ("value_length", head_v)):
        if isinstance(value, int) and value <= 0:
            bad.append(f"attention.{name} is {value}")
    if positive(n_head) and n_head_kv is not None and (n_head_kv <= 0 or n_head % n_head_kv):
        bad.append(f"head_count_kv {n_head_kv} does not divide head_count {n_head}")
    head = head_k if positive(head_k) else n_embd // n_head if positive(n_embd) and positive(n_head) else None
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
    if not llama or n_expert or not (positive(n_embd) and positive(n_head) and positive(n_layer, LLAMA_MAX_LAYERS)
                                     and positive(n_vocab)) or bad:
        return out
    hk = head_k if positive(head_k) else n_embd // n_head
    hv = head_v if positive(head_v) else n_embd // n_head
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
    ff = n_ff if positive(n_ff) else None  # a per-layer array: shapes not checked
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
    wrong = [f"{n} {list(dims(by_name[n]))} (expected {list(s)})" for n, s in {**want, **optional}.items()
             if s and n in by_name and dims(by_name[n]) != strip_ones(s)]
    extra = [n for n in by_name if n not in want and n not in optional]
    out: list[Defect] = []
    if missing:
        out.append(Defect("tensor-missing", f"tensor(s) {some_names(missing)} are missing: llama.cpp refuses to load "
                          "the model (\"missing tensor\")", False))
    if extra:
        out.append(Defect("tensor-unexpected", f"tensor(s) {some_names(extra)} are not part of a {n_layer}-layer llama "
                          "model: llama.cpp refuses to load it (\"wrong number of tensors\")", False))
    return out + shape_defect(wrong, "llama.cpp")
