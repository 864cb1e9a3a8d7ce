"""libmtmd, typed: the vision context (an mmproj bound to a loaded LLM), bitmaps, tokenizing a prompt with
its images into chunks, encoding an image chunk into embedding rows, and libmtmd's own evaluation of a
chunk into a llama context. Our build's libmtmd carries the CLS-order fix (library.py)."""
from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_gguf.native import library
from llava_gguf.native.llama import Context, Model


def _mt():
    return library.mtmd_cpp()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a tokenized prompt: text (its token ids) or an image (its positions). `handle` is
    valid while the Chunks it came from are."""

    is_text: bool
    tokens: tuple[int, ...]
    n_tokens: int
    handle: int


class Chunks:
    """mtmd_input_chunks: a prompt tokenized with its images. Freed by close() (or `with`)."""

    def __init__(self, handle, *, owned: bool = True) -> None:
        self.handle = handle
        self.owned = owned  # False: chunks the caller made (and frees) itself; close() leaves them alone

    def close(self) -> None:
        if self.handle and self.owned:
            _mt().mtmd_input_chunks_free(self.handle)
        self.handle = None

    def __enter__(self) -> Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Chunk]:
        mt = _mt()
        for i in range(mt.mtmd_input_chunks_size(self.handle)):
            chunk = mt.mtmd_input_chunks_get(self.handle, i)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens = tuple(ptr[j] for j in range(n.value))
                yield Chunk(True, tokens, len(tokens), chunk)
            else:
                yield Chunk(False, (), int(mt.mtmd_input_chunk_get_n_tokens(chunk)), chunk)


class Bitmap:
    """An RGB image for libmtmd (copied in); freed by close() or by Vision.tokenize, which takes it."""

    def __init__(self, width: int, height: int, rgb: bytes) -> None:
        buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        self.handle = _mt().mtmd_bitmap_init(width, height, buf)
        if not self.handle:
            self.handle = None
            raise MemoryError("mtmd_bitmap_init failed")

    def close(self) -> None:
        if self.handle:
            _mt().mtmd_bitmap_free(self.handle)
        self.handle = None


class Vision:
    """An mtmd context: the mmproj at `path` for `model` (mtmd_init_from_file with our parameters: no
    warm-up, libmtmd's timings only when verbose, the GPU when layers are offloaded)."""

    def __init__(self, path: Path | str, model: Model, *, n_threads: int, use_gpu: bool, verbose: bool) -> None:
        mt = _mt()
        params = mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = verbose
        params.n_threads = n_threads
        params.warmup = False
        self.n_embd = model.n_embd
        self.handle = mt.mtmd_init_from_file(str(path).encode(), model.handle, params)
        if not self.handle:
            self.handle = None
            raise OSError(f"mtmd_init_from_file failed for {path}")
        self.marker = mt.mtmd_default_marker().decode()

    def close(self) -> None:
        if self.handle:
            _mt().mtmd_free(self.handle)
        self.handle = None

    def tokenize(self, text: str, bitmaps: Sequence[Bitmap], add_special: bool) -> Chunks | int:
        """`text` (libmtmd's marker where each bitmap goes) as chunks, or mtmd_tokenize's error code. The
        bitmaps are freed here either way."""
        mt = _mt()
        try:
            chunks = mt.mtmd_input_chunks_init()
            encoded = text.encode()
            inp = mt.mtmd_input_text()
            inp.text = encoded
            inp.text_len = len(encoded)
            inp.add_special = add_special
            inp.parse_special = True
            arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*[b.handle for b in bitmaps])
            rc = mt.mtmd_tokenize(self.handle, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mt.mtmd_input_chunks_free(chunks)
                return int(rc)
            return Chunks(chunks)
        finally:
            for b in bitmaps:
                b.close()

    def encode(self, chunk: Chunk) -> np.ndarray:
        """The embedding rows (n, n_embd) of an image chunk: pre-processing, vision tower, projector."""
        mt = _mt()
        if mt.mtmd_encode_chunk(self.handle, chunk.handle) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        ptr = mt.mtmd_get_output_embd(self.handle)
        n = chunk.n_tokens
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, -1).copy()

    def eval_chunk(self, ctx: Context, chunk: Chunk, n_past: int, seq: int) -> tuple[int, int]:
        """libmtmd's own evaluation of a chunk into `seq` at n_past: (return code, new n_past)."""
        mt, lc = _mt(), library.llama_cpp()
        new_past = lc.llama_pos(0)
        rc = mt.mtmd_helper_eval_chunk_single(self.handle, ctx.handle, chunk.handle, n_past, seq, ctx.n_batch,
                                              False, ctypes.byref(new_past))
        return int(rc), int(new_past.value)
