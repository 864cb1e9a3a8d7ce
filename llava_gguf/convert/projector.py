"""Projector rewrites the converter applies before the family's tables map the tensors: LLaVA v1's single
linear projector becomes the exact 2-layer GELU MLP that libmtmd's `mlp` projector runs (families whose
Family.linear_projector is set: the original liuhaotian layout)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llava_gguf.convert.checkpoint import TensorRef
from llava_gguf.errors import LlavaGgufError


def linear_as_gelu_pair(proj: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """LLaVA v1's single linear projector `y = W x + b` as the 2-layer GELU MLP libmtmd runs (it always
    applies GELU after mm.0), exactly: with z = W x + b,

        mm.0 = [W; -W], [b; -b]      (2n outputs)
        mm.2 = [I, -I], 0            y = GELU(z) - GELU(-z) = z

    since GELU(z) = z * P(z) and P(z) + P(-z) = 1 — for the exact (erf) GELU and for the tanh form ggml
    uses alike (0.5 z (1 + tanh u) + 0.5 z (1 - tanh u) = z). Files stay standard `mlp` mmproj files that
    every libmtmd runs unchanged; the cost is a twice-as-wide first layer and a sparse second one (about
    10% more vision compute for ViT-L). ggml's CPU GELU reads an fp16 table, so the pair reproduces z to
    fp16 precision (measured: cosine >= 0.99999 against the linear map). A projector that is already the
    MLP (mlp2x_gelu, keys 0.* and 2.*) is returned as it is."""
    if "weight" not in proj:
        return proj
    w_ref, b_ref = proj["weight"], proj.get("bias")
    if b_ref is None:
        raise LlavaGgufError("the linear projector has no bias", "a projector without bias is not supported")
    n_out, n_in = w_ref.shape

    def ref(name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray]) -> TensorRef:
        return TensorRef(name, "F32", shape, w_ref.file, -1, 4 * int(np.prod(shape)), make)

    def w0() -> np.ndarray:
        w = w_ref.read().astype(np.float32)
        return np.concatenate([w, -w], axis=0)

    def b0() -> np.ndarray:
        b = b_ref.read().astype(np.float32)
        return np.concatenate([b, -b])

    def w2() -> np.ndarray:
        eye = np.eye(n_out, dtype=np.float32)
        return np.concatenate([eye, -eye], axis=1)

    return {
        **{k: v for k, v in proj.items() if k not in ("weight", "bias")},
        "0.weight": ref("0.weight", (2 * n_out, n_in), w0),
        "0.bias": ref("0.bias", (2 * n_out,), b0),
        "2.weight": ref("2.weight", (n_out, 2 * n_out), w2),
        "2.bias": ref("2.bias", (n_out,), lambda: np.zeros(n_out, np.float32)),
    }
