"""Does the loaded libmtmd carry our CLS-order fix (upstream llama.cpp #25814)? Asked of the library
itself, not assumed: a hand-made mmproj whose output differs with the order is encoded, and the
rows are compared with what each order produces.

The probe tower: 28x28 images, 14-pixel patches (4 patches + CLS = 5 positions), one ViT layer
with every weight zero (so it passes its input through), a zero patch embedding, CLS embedding 20,
position embedding row i = i + 1, identity projector. With CLS first, the 4 image rows are
gelu(2..5); with CLS last (stock), the last row carries the CLS value: gelu(25)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.native import library
from llava_gguf.native.llama import Model
from llava_gguf.native.mtmd import Bitmap, Vision

N = 32  # embedding width of the probe LLM and tower


def _write_llm(path: Path) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(N)
    w.add_feed_forward_length(N * 2)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    v = len(tokens)
    for name, shape in [("token_embd.weight", (v, N)), ("output_norm.weight", (N,)), ("output.weight", (v, N)),
                        ("blk.0.attn_norm.weight", (N,)), ("blk.0.attn_q.weight", (N, N)),
                        ("blk.0.attn_k.weight", (N, N)), ("blk.0.attn_v.weight", (N, N)),
                        ("blk.0.attn_output.weight", (N, N)), ("blk.0.ffn_norm.weight", (N,)),
                        ("blk.0.ffn_gate.weight", (2 * N, N)), ("blk.0.ffn_up.weight", (2 * N, N)),
                        ("blk.0.ffn_down.weight", (N, 2 * N))]:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    _finish(w)


def _write_mmproj(path: Path) -> None:
    w = gguf.GGUFWriter(path, "clip")
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_vision_projection_dim(N)
    w.add_vision_image_size(28)
    w.add_vision_patch_size(14)
    w.add_vision_embedding_length(N)
    w.add_vision_feed_forward_length(N)
    w.add_vision_block_count(1)
    w.add_vision_head_count(1)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    w.add_key_value("clip.vision.feature_layer", [1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    w.add_tensor("v.class_embd", np.full((N,), 20.0, np.float32))
    w.add_tensor("v.patch_embd.weight", z(N, 3, 14, 14))
    w.add_tensor("v.position_embd.weight", np.repeat(np.arange(1, 6, dtype=np.float32)[:, None], N, axis=1))
    for part, shape in [("attn_q", (N, N)), ("attn_k", (N, N)), ("attn_v", (N, N)), ("attn_out", (N, N)),
                        ("ffn_up", (N, N)), ("ffn_down", (N, N))]:
        w.add_tensor(f"v.blk.0.{part}.weight", z(*shape))
        w.add_tensor(f"v.blk.0.{part}.bias", z(shape[0]))
    for ln in ("ln1", "ln2"):
        w.add_tensor(f"v.blk.0.{ln}.weight", z(N))
        w.add_tensor(f"v.blk.0.{ln}.bias", z(N))
    w.add_tensor("mm.0.weight", np.eye(N, dtype=np.float32))
    w.add_tensor("mm.0.bias", z(N))
    w.add_tensor("mm.2.weight", np.eye(N, dtype=np.float32))
    w.add_tensor("mm.2.bias", z(N))
    _finish(w)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _encode_black_image(llm: Path, mmproj: Path) -> np.ndarray:
    """libmtmd's rows for a black 28x28 image, with the probe files loaded directly (no runtime)."""
    model = Model(llm)
    try:
        vision = Vision(mmproj, model, n_threads=1, use_gpu=False, verbose=False)
        try:
            chunks = vision.tokenize(vision.marker, [Bitmap(28, 28, bytes(28 * 28 * 3))], add_special=False)
            if isinstance(chunks, int):
                raise LlavaGgufError(f"libmtmd could not tokenize the probe image (code {chunks})")
            with chunks:
                image = next(c for c in chunks if not c.is_text)
                return vision.encode(image)
        finally:
            vision.close()
    finally:
        model.close()


def probe_cls_fix() -> tuple[bool, str]:
    """(fixed?, what was seen) for the libmtmd this process has loaded."""
    library.quiet_logs(False)
    with tempfile.TemporaryDirectory(prefix="llava-gguf-probe-") as d:
        llm, mmproj = Path(d) / "probe-llm.gguf", Path(d) / "probe-mmproj.gguf"
        _write_llm(llm)
        _write_mmproj(mmproj)
        rows = _encode_black_image(llm, mmproj)[:, 0]
    fixed, stock = _gelu(np.array([2, 3, 4, 5.0])), _gelu(np.array([2, 3, 4, 25.0]))
    seen = ", ".join(f"{x:.2f}" for x in rows)
    if rows.shape == (4,) and np.allclose(rows, fixed, atol=0.05):
        return True, f"CLS first (rows {seen})"
    if rows.shape == (4,) and np.allclose(rows, stock, atol=0.05):
        return False, f"CLS last, upstream defect #25814 (rows {seen})"
    return False, f"unexpected rows ({seen})"
