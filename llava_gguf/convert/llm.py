"""The language model GGUF: what llama.cpp's convert_hf_to_gguf.py writes for a LLaMA-architecture
text model (same tensor names, shapes, types, hyperparameters and tokenizer), written by our
streaming writer. Names go through gguf-py's tensor-name table; q/k get llama.cpp's rotary permute."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.convert.checkpoint import TensorRef
from llava_gguf.convert.vocab import add_vocab, read_vocab
from llava_gguf.convert.writer import PlannedTensor, QType, StreamingGGUF, can_quantize
from llava_gguf.families.hparams import TEXT_DEFAULTS, TEXT_MODELS, unsupported_text_model

# The file-type names we accept, their GGUF file type and the type of a quantizable weight.
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, QType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}


def type_label(outtype: str) -> str:
    """llama.cpp's spelling in file names: F32, F16, BF16, Q8_0."""
    return outtype.upper()


def permute_rotary(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half layout -> llama.cpp's interleaved one
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def weight_qtype(name: str, shape: tuple[int, ...], wanted: QType) -> QType:
    """convert_hf_to_gguf.py's rule for a text model: 1-D tensors and norms stay F32; the rest take
    the file type, falling back to F16 where a row does not fill whole quantization blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QType.F32
    if wanted in (QType.F32, QType.F16, QType.BF16):
        return wanted
    return wanted if can_quantize(shape, wanted) else QType.F16


# Weight dtypes a GGUF float tensor can be made from; integer tensors are quantized or corrupt weights
# that the writer would otherwise convert value by value into garbage.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# transformers' names for SiLU (ACT2FN): llama.cpp's llama graph has SiLU built into its gated FFN.
SILU_NAMES = ("silu", "swish")

# Per-checkpoint tensors that are buffers, not weights (older transformers saved them).
_BUFFERS = (".rotary_emb.inv_freq", ".attention.masked_bias")


def expected_text_tensors(hp: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor a LLaMA/Mistral model of config `hp` has, by its LlamaForCausalLM name: the shape
    transformers gives it (out, in) and whether the checkpoint must hold it (transformers would
    initialise a missing one at random)."""
    hidden, ff, vocab = int(hp["hidden_size"]), int(hp["intermediate_size"]), int(hp["vocab_size"])
    n_head, n_head_kv = int(hp["num_attention_heads"]), int(hp["num_key_value_heads"])
    head_dim = int(hp["head_dim"])
    q, kv = n_head * head_dim, n_head_kv * head_dim
    attn_bias, mlp_bias = bool(hp.get("attention_bias")), bool(hp.get("mlp_bias"))
    tied = bool(hp.get("tie_word_embeddings"))
    want: dict[str, tuple[tuple[int, ...], bool]] = {
        "model.embed_tokens.weight": ((vocab, hidden), True),
        "model.norm.weight": ((hidden,), True),
        # tied: llama.cpp uses token_embd when output.weight is absent, as transformers does
        "lm_head.weight": ((vocab, hidden), not tied),
    }
    for i in range(int(hp["num_hidden_layers"])):
        b = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
            "mlp.gate_proj.weight": (ff, hidden), "mlp.up_proj.weight": (ff, hidden),
            "mlp.down_proj.weight": (hidden, ff),
        }
        if attn_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (hidden,)})
        if mlp_bias:
            layer.update({"mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (hidden,)})
        want.update({b + k: (shape, True) for k, shape in layer.items()})
    return want


def check_text_model(hp: dict, text_tensors: dict[str, TensorRef]) -> None:
    """Refuse, before anything is written, a text model llama.cpp's llama graph would compute
    differently from the checkpoint or fail to load: another activation, a non-float tensor, a shape
    that does not follow from config.json (transposed, another head count), a missing tensor."""
    act = hp.get("hidden_act", "silu")
    if act not in SILU_NAMES:
        raise LlavaGgufError(f"the text model's activation hidden_act = {act!r} is not supported",
                             "llama.cpp's llama architecture computes its feed-forward with SiLU only")
    want = expected_text_tensors(hp)
    for name, ref in text_tensors.items():
        if name.endswith(_BUFFERS):
            continue
        if name not in want:
            raise LlavaGgufError(f"unexpected language-model tensor {ref.name!r}",
                                 "it is not part of the LLaMA-architecture model config.json describes")
        if ref.dtype not in FLOAT_DTYPES:
            raise LlavaGgufError(f"language-model tensor {ref.name} has dtype {ref.dtype}, not a float type",
                                 "quantized or integer checkpoints are not supported; convert the float checkpoint")
        shape, _ = want[name]
        if tuple(ref.shape) != shape:
            raise LlavaGgufError(f"language-model tensor {ref.name} has shape {list(ref.shape)}, config.json implies "
                                 f"{list(shape)}", "the checkpoint does not match its config")
    missing = [n for n, (_, required) in want.items() if required and n not in text_tensors]
    if missing:
        raise LlavaGgufError(f"the language model lacks {missing[0]}"
                             + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""),
                             "the checkpoint is incomplete or does not match its config")


def sliding_window(hp: dict) -> int | None:
    """Mistral's attention window (each token sees itself and the window - 1 before it), or None.
    LLaMA has none: transformers' LlamaConfig ignores the key (its defaults, in TEXT_DEFAULTS, have none)."""
    windowed = "sliding_window" in TEXT_DEFAULTS.get(hp.get("model_type", "llama"), {})
    window = hp.get("sliding_window") if windowed else None
    return int(window) if window is not None else None


def window_shortens_context(hp: dict) -> bool:
    """Whether the window is shorter than the trained context, so that contexts the model supports
    compute differently without it (a window >= max_position_embeddings never takes effect there)."""
    window, n_ctx = sliding_window(hp), hp.get("max_position_embeddings")
    return window is not None and (n_ctx is None or window < int(n_ctx))


def plan_llm(hp: dict, text_tensors: dict[str, TensorRef], outtype: str) -> list[PlannedTensor]:
    n_layers = int(hp["num_hidden_layers"])
    n_head = int(hp["num_attention_heads"])
    n_head_kv = hp.get("num_key_value_heads")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    _, wanted = OUTTYPES[outtype]
    planned = []
    for hf_name, ref in text_tensors.items():
        if hf_name.endswith(_BUFFERS):
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LlavaGgufError(f"unexpected language-model tensor {hf_name!r}",
                                 "this checkpoint's text model is not a LLaMA-architecture model we can map")
        transform = None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = partial(permute_rotary, n_head=n_head, n_head_kv=n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = partial(permute_rotary, n_head=n_head, n_head_kv=n_head_kv)
        planned.append(PlannedTensor(new, ref.shape, weight_qtype(new, ref.shape, wanted), ref, transform))
    return planned


def add_llm_metadata(w: gguf.GGUFWriter, hp: dict, src: Path, outtype: str, model_name: str | None,
                     default_chat_template: str) -> None:
    ftype, _ = OUTTYPES[outtype]
    w.add_type(gguf.GGUFType.MODEL)
    total_params, shared, expert, n_expert = w.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, src, model_name, total_params)
    except Exception as e:  # noqa: BLE001 - gguf-py parses README.md's YAML front matter and raises yaml's errors
        warn(f"{src / 'README.md'} has front matter gguf-py cannot read ({type(e).__name__}): the model card's "
             "fields (license, tags, ...) are left out of the GGUF's general.* metadata")
        meta = gguf.Metadata.load(None, None, model_name, total_params)
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, shared, expert, n_expert)
    meta.set_gguf_meta_model(w)

    w.add_block_count(int(hp["num_hidden_layers"]))
    if (n_ctx := hp.get("max_position_embeddings")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(int(hp["num_attention_heads"]))
    if (n_kv := hp.get("num_key_value_heads")) is not None:
        w.add_head_count_kv(int(n_kv))
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        # transformers' yarn falls back to max_position_embeddings when the original length is not given
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                            or hp["max_position_embeddings"]))
    elif rope_type not in (None, "default"):
        raise LlavaGgufError(f"unsupported RoPE scaling {rope_type!r} in the text model")
    rope_theta = hp.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is not None:
        w.add_rope_freq_base(float(rope_theta))
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if (window := sliding_window(hp)) is not None:
        # llama.cpp's llama architecture ignores this key (only SWA architectures read it, see
        # src/models/*.cpp): it records the window for our runtime, which caps the context at it
        w.add_sliding_window(window)
    w.add_file_type(ftype)
    w.add_vocab_size(int(hp["vocab_size"]))
    w.add_rope_dimension_count(int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, src, read_vocab(src, int(hp["vocab_size"])), default_chat_template)


def build_llm(hp: dict, text_tensors: dict[str, TensorRef], src: Path, outtype: str,
              model_name: str | None, default_chat_template: str) -> StreamingGGUF:
    if hp.get("model_type", "llama") not in TEXT_MODELS:
        raise unsupported_text_model(hp.get("model_type"))
    check_text_model(hp, text_tensors)
    gg = StreamingGGUF(gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    gg.add_all(plan_llm(hp, text_tensors, outtype))
    add_llm_metadata(gg.kv, hp, src, outtype, model_name, default_chat_template)
    if window_shortens_context(hp):
        window = sliding_window(hp)
        # after every check of the model, so that a model refused for another reason prints its error alone
        warn(f"the text model attends within a sliding window of {window} tokens, which llama.cpp's llama "
             f"architecture does not apply: llava-gguf caps the context at {window} tokens; other apps "
             f"(llama.cpp's tools, Ollama, LM Studio) compute contexts longer than {window} tokens differently "
             "from the checkpoint")
    return gg
