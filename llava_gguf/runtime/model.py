"""The LLaVA model object: an LLM GGUF and its mmproj, loaded through llama-cpp-python on our own
native libraries (see native.py). Image -> libmtmd (pre-processing, CLIP, projector) -> embeddings
decoded into the LLM's KV cache at the image's place in the prompt -> sampling."""
from __future__ import annotations

import ctypes
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidSetting, LlavaGgufError, warn
from ..gguf_checks import require_loadable
from . import native
from .gguf_info import GGUFInfo, open_gguf, read_gguf_info  # noqa: F401 - GGUFInfo re-exported
from .images import ImageInput, content_hash, load_image
from ..gguf_checks import chat_template_defects
from .prompt import IMAGE_PLACEHOLDER, Message, render_with_images
from .settings import (Sampling, check_seed, check_text, is_int, sampling_settings, thread_count,
                       check_memory as fits_in_memory)


@dataclass(frozen=True)
class _Anyres:
    """An anyres (LLaVA-1.6) mmproj's geometry: pinpoints (height, width), tile size in pixels, feature rows
    per tile side, and the image_newline row."""

    pins: list[tuple[int, int]]
    size: int
    side: int
    newline: np.ndarray


@dataclass
class EvalStats:
    """What the last prompt cost: how much of it came from the KV cache and what was computed."""

    prompt_tokens: int = 0  # positions of the whole prompt (text tokens + image rows)
    reused_tokens: int = 0  # taken from the KV cache (a prefix shared with what it held)
    evaluated_tokens: int = 0  # decoded now
    images: int = 0  # images in the prompt
    images_encoded: int = 0  # of those, run through the vision tower now (the rest: embedding cache)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0  # decoding the prompt, image encoding included
    first_token_seconds: float = 0.0  # from the call to the first answer token
    generate_seconds: float = 0.0  # from the first to the last answer token
    answer_tokens: tuple[int, ...] = ()  # the answer's token ids (end-of-generation excluded)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.evaluated_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return (self.generated_tokens - 1) / self.generate_seconds if self.generate_seconds and self.generated_tokens > 1 else 0.0


_LITERAL_IMAGE = "\ue000image\ue001"
_ROLES = {"system": "the system prompt", "user": "the prompt", "assistant": "an assistant message"}


def _open(method):
    """A public method of LLaVA: after close() it raises our error instead of reaching freed native state
    (which segfaults)."""
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self._check_open()
        return method(self, *args, **kwargs)

    return checked


DEVICES = {"cpu": None, "cuda": "CUDA", "metal": "Metal", "vulkan": "Vulkan"}


class LLaVA:
    """A LLaVA model ready to answer questions about images.

    >>> model = LLaVA("out/llava-Q4_K_M.gguf", "out/mmproj-llava-F16.gguf")
    >>> model.generate_from_image("cat.jpg", "What can you see?")

    Also `LLaVA.load("out/")` for a directory `convert`/`quantize` wrote, and the reference
    implementation's names: `LLaVA(language_model_path=..., vision_model_path=..., device="cpu")`.

    Follow-up prompts reuse the KV cache for the prefix they share with what was evaluated before
    (system prompt, earlier turns, images), and an image seen before is not encoded again (its
    embedding rows are cached by content hash)."""

    IMAGE_CACHE_BYTES = 256 * 2**20  # embedding rows kept for images seen before (LRU)

    def __init__(self, model_path: str | Path | None = None, mmproj_path: str | Path | None = None, *,
                 n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
                 seed: int | None = None, verbose: bool = False, language_model_path: str | Path | None = None,
                 vision_model_path: str | Path | None = None, device: str | None = None) -> None:
        from ..convert.families.llava15 import FAMILY

        model_path = _one_of(model_path, language_model_path, "model_path", "language_model_path")
        mmproj_path = _one_of(mmproj_path, vision_model_path, "mmproj_path", "vision_model_path")
        if model_path is None or mmproj_path is None:
            raise LlavaGgufError("LLaVA needs the language model and the mmproj",
                                 "LLaVA(model_path, mmproj_path), or LLaVA.load(directory)")
        if device is not None and n_gpu_layers is not None:
            raise LlavaGgufError("give device or n_gpu_layers, not both")
        self.model_path, self.mmproj_path = Path(model_path), Path(mmproj_path)
        # a file llama.cpp or libmtmd would refuse or abort on (GGML_ASSERT ends the process) never reaches
        # them: each is checked as inspect checks it, and refused with one line naming the first defect
        llm_reader = require_loadable(self.model_path, "model")
        mmproj_reader = require_loadable(self.mmproj_path, "mmproj")
        self.llm_info = read_gguf_info(self.model_path, "model", reader=llm_reader)
        self.mmproj_info = read_gguf_info(self.mmproj_path, "mmproj", reader=mmproj_reader)
        if self.llm_info.arch == "clip":
            raise LlavaGgufError(f"{self.model_path} is an mmproj file, not a language model",
                                 "pass the LLM .gguf as the model and the mmproj-*.gguf as the mmproj")
        if self.mmproj_info.arch != "clip":
            raise LlavaGgufError(f"{self.mmproj_path} is not an mmproj file (architecture {self.mmproj_info.arch!r})")
        if self.mmproj_info.n_embd != self.llm_info.n_embd:
            raise LlavaGgufError(f"the mmproj projects to width {self.mmproj_info.n_embd} but the language model's "
                                 f"embedding width is {self.llm_info.n_embd}", "these two files are not a pair")
        bad_template = chat_template_defects(llm_reader)
        if bad_template:
            # refused rather than replaced by the family's template: that may not be the model's prompt
            # format (ChatML, LLaMA-3), and answers from another format would be silently worse
            raise LlavaGgufError(f"{self.model_path} cannot be used: {bad_template[0].code}: {bad_template[0].message}",
                                 "convert the checkpoint again (`llava-gguf inspect` shows the file's defects)")
        self.family_template = FAMILY.default_chat_template
        self.verbose = verbose
        self.n_threads = thread_count(n_threads)
        seed = check_seed(seed)
        self.image_tokens = self.mmproj_info.image_tokens or 576
        self._anyres: _Anyres | None = None  # LLaVA-1.6, see anyres.py
        if self.mmproj_info.pinpoints:
            self._anyres = self._load_anyres()
            self.image_tokens = self._anyres_max_rows()
        # offloaded layers keep their KV cache in device memory, which we cannot measure from here
        offload = bool(n_gpu_layers) or (device is not None and device.lower() != "cpu")
        n_ctx = self._context_size(n_ctx, check_memory=not offload)
        self.libs = native.configure()
        native.quiet_logs(verbose)
        if device is not None:
            n_gpu_layers = _device_layers(device)
        n_gpu_layers = n_gpu_layers or 0
        lc = native.llama_cpp()
        self._lc = lc
        self._mtmd = native.mtmd_cpp()
        try:
            self.llm = lc.Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=self.n_threads,
                                n_threads_batch=self.n_threads, n_gpu_layers=n_gpu_layers,
                                seed=seed if seed is not None else lc.LLAMA_DEFAULT_SEED, verbose=verbose)
        except Exception as e:  # noqa: BLE001 - ValueError from llama.cpp's refusal; anything else from
            # llama-cpp-python's own set-up (it compiles every chat template in the file with jinja2)
            raise LlavaGgufError(f"llama.cpp could not load {self.model_path}: "
                                 f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
        params = self._mtmd.mtmd_context_params_default()
        params.use_gpu = n_gpu_layers != 0
        params.print_timings = verbose
        params.n_threads = self.n_threads
        params.warmup = False
        self._ctx = self._mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), self.llm.model, params)
        if not self._ctx:
            raise LlavaGgufError(f"libmtmd could not load {self.mmproj_path}", "run with --verbose for llama.cpp's log")
        self._marker = self._mtmd.mtmd_default_marker().decode()
        vocab = self.llm.tokenize(IMAGE_PLACEHOLDER.encode(), add_bos=False, special=True)
        self._image_token = vocab[0] if len(vocab) == 1 else 0
        self._spans: list[tuple[int, int, str]] = []  # (start, n, image hash) of images in the KV cache
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()
        self._originals: dict[str, object] = {}  # anyres: hash -> image of the prompt being laid out
        self._pieces: dict[int, bytes] = {}
        self.last = EvalStats()
        self._t_call = 0.0
        self._seed = seed

    def _context_size(self, n_ctx: int | None, *, check_memory: bool = True) -> int:
        """The context to create: n_ctx, or by default one that fits an image and a conversation, checked
        against the model (its training context, Mistral's sliding window) and against the memory it
        needs, before anything is allocated."""
        info = self.llm_info
        train = int(info.context_length) if info.context_length else None
        window = info.sliding_window
        # llama.cpp's llama graph has no sliding-window attention: contexts up to the window compute
        # exactly what the checkpoint does (within it, sliding and full attention see the same tokens)
        self.context_limit = f"the model's sliding window ({window} tokens)" if window else None
        notes: list[str] = []  # said once the context is known to fit in memory
        if n_ctx is None:
            n_ctx = max(2048, self.image_tokens + 1024)
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
        if check_memory:
            fits_in_memory(info, n_ctx, least=self.image_tokens + 64)
        for note in notes:
            warn(note, stacklevel=3)
        return n_ctx

    @property
    def n_ctx(self) -> int:
        """Positions the context holds (llama.cpp may round its own size up; llama-cpp-python's token
        buffer is the size asked for)."""
        self._check_open()
        return min(self.llm.n_ctx(), len(self.llm.input_ids))

    @property
    def closed(self) -> bool:
        """True after close(): every method then raises LlavaGgufError("the model is closed")."""
        return getattr(self, "llm", None) is None or not getattr(self, "_ctx", None)

    def _check_open(self) -> None:
        if self.closed:
            raise LlavaGgufError("the model is closed", "create a new LLaVA to use it again")

    @classmethod
    def load(cls, path: str | Path, *, llm: str | Path | None = None, mmproj: str | Path | None = None,
             **options) -> LLaVA:
        """A directory that `convert`/`quantize` wrote: the LLM (the quantized one when there is exactly
        one; `llm=` to choose) and its mmproj; `options` go to the constructor."""
        from .locate import locate_pair

        llm_path, mmproj_path = locate_pair(path, llm, mmproj)
        return cls(llm_path, mmproj_path, **options)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if getattr(self, "_embeddings", None) is not None:
            self._embeddings.clear()
        self._originals = {}
        if getattr(self, "_ctx", None):
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> LLaVA:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- images
    def _load_anyres(self):
        from .anyres import flat_pinpoints

        size = self.mmproj_info.image_size
        reader = open_gguf(self.mmproj_path, "mmproj")
        newline = next((t for t in reader.tensors if t.name == "model.image_newline"), None)
        if newline is None or size is None:
            raise LlavaGgufError(f"{self.mmproj_path} has image_grid_pinpoints but no model.image_newline",
                                 "convert the LLaVA-1.6 checkpoint again with `llava-gguf convert`")
        row = np.array(newline.data, dtype=np.float32).reshape(-1)
        if row.shape[0] != self.mmproj_info.n_embd:
            raise LlavaGgufError(f"{self.mmproj_path}: image_newline has {row.shape[0]} values, not "
                                 f"{self.mmproj_info.n_embd}")
        values = list(self.mmproj_info.pinpoints)
        if len(values) % 2 or not all(v > 0 and v % size == 0 for v in values):
            raise LlavaGgufError(f"{self.mmproj_path}: image_grid_pinpoints {values[:10]} are not pairs of positive "
                                 f"multiples of the image size {size}", "convert the checkpoint again")
        side = int(round(math.sqrt(self.mmproj_info.image_tokens or 576)))  # feature rows per tile side
        return _Anyres(flat_pinpoints(values), int(size), side, row)

    def _anyres_max_rows(self) -> int:
        """The most rows one anyres image can take: base tile + the largest unpadded grid with newlines."""
        a = self._anyres
        return max(a.side * a.side + (h // a.size) * a.side * ((w // a.size) * a.side + 1) for h, w in a.pins)

    def _square_rows(self, img) -> np.ndarray:
        """libmtmd's rows for one image at the tower's resolution (an anyres tile: it neither resizes nor
        slices it)."""
        mt = self._mtmd
        chunks = self._tokenize_bitmaps(IMAGE_PLACEHOLDER, [self._mtmd_bitmap(img)], add_special=False)
        try:
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) != mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    return self._encode(chunk)
        finally:
            mt.mtmd_input_chunks_free(chunks)
        raise LlavaGgufError("libmtmd produced no image chunk")

    def _encode(self, chunk) -> np.ndarray:
        """libmtmd's rows for an image chunk (encoded now)."""
        mt = self._mtmd
        n = mt.mtmd_input_chunk_get_n_tokens(chunk)
        if mt.mtmd_encode_chunk(self._ctx, chunk) != 0:
            raise LlavaGgufError("libmtmd failed to encode the image")
        ptr = mt.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.llm_info.n_embd,)).reshape(n, -1).copy()

    def _mtmd_bitmap(self, img, data: bytes | None = None):
        """An mtmd bitmap of an RGB image, `data` its bytes if already at hand (the caller hands it to
        _tokenize_bitmaps, which frees it)."""
        data = img.tobytes() if data is None else data
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bmp = self._mtmd.mtmd_bitmap_init(img.width, img.height, buf)
        if not bmp:
            raise LlavaGgufError("libmtmd could not take the image")
        return bmp

    def _anyres_count(self, digest: str) -> int:
        """Positions an anyres image takes (its rows, cached or not yet computed)."""
        cached = self._embeddings.get(digest)
        return len(cached) if cached is not None else self._anyres_count_for(self._originals[digest])

    def _anyres_rows(self, img) -> np.ndarray:
        from .anyres import pack, tiles

        a = self._anyres
        base, grid, shape = tiles(img, a.pins, a.size)
        rows = [self._square_rows(t) for t in [base] + grid]
        packed = pack(rows[0], rows[1:], shape, (img.height, img.width), a.newline)
        if len(packed) != self._anyres_count_for(img):  # pragma: no cover - count_rows mirrors pack
            raise LlavaGgufError("internal error: anyres row count mismatch")
        return packed

    def _anyres_count_for(self, img) -> int:
        from .anyres import count_rows

        a = self._anyres
        return count_rows((img.height, img.width), a.pins, a.size, a.side)

    def _bitmap(self, image: ImageInput):
        """(mtmd bitmap, content hash of the normalised pixels). For an anyres model the bitmap is only
        the image's place in the prompt (a tile-sized stand-in libmtmd turns into one chunk): its rows are
        computed from the image kept here (see _image_rows)."""
        img = load_image(image)
        data: bytes | None = img.tobytes()
        digest = content_hash(img, data)
        if self._anyres is not None:
            from PIL import Image

            self._originals[digest] = img
            img, data = Image.new("RGB", (self._anyres.size, self._anyres.size)), None  # a stand-in, never read
        return self._mtmd_bitmap(img, data), digest

    def _tokenize(self, text: str, images: Sequence[ImageInput], add_special: bool, hashes: list | None = None):
        """mtmd chunks for `text`, whose IMAGE_PLACEHOLDERs are replaced by `images` in order."""
        if self._anyres is not None:
            self._originals = {}  # this prompt's images, until the next prompt (rows are computed from them)
        loaded = [self._bitmap(im) for im in images]
        if hashes is not None:
            hashes.extend(h for _, h in loaded)
        return self._tokenize_bitmaps(text, [b for b, _ in loaded], add_special)

    def _tokenize_bitmaps(self, text: str, bitmaps: list, add_special: bool):
        """mtmd chunks for `text` with `bitmaps` (freed here) in its IMAGE_PLACEHOLDERs."""
        mt = self._mtmd
        try:
            check_text(text, "the prompt")
            chunks = mt.mtmd_input_chunks_init()
            rc = self._mtmd_tokenize(chunks, text.replace(IMAGE_PLACEHOLDER, self._marker), add_special, bitmaps)
            if rc != 0:
                mt.mtmd_input_chunks_free(chunks)
                raise self._tokenize_error(text, rc, len(bitmaps))
            return chunks
        finally:
            for b in bitmaps:
                mt.mtmd_bitmap_free(b)

    def _mtmd_tokenize(self, chunks, text: str, add_special: bool, bitmaps: list) -> int:
        mt = self._mtmd
        encoded = text.encode()
        inp = mt.mtmd_input_text()
        inp.text = encoded
        inp.text_len = len(encoded)
        inp.add_special = add_special
        inp.parse_special = True
        arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        return mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))

    def _tokenizes(self, text: str) -> bool:
        """Whether the vocabulary can encode `text` (no images), through libmtmd, which catches llama.cpp's
        exception (llama_tokenize itself would let it escape into Python's process and abort it)."""
        mt = self._mtmd
        chunks = mt.mtmd_input_chunks_init()
        try:
            return self._mtmd_tokenize(chunks, text, False, []) == 0
        finally:
            mt.mtmd_input_chunks_free(chunks)

    def _tokenize_error(self, text: str, rc: int, n_images: int) -> LlavaGgufError:
        """Why mtmd_tokenize failed, in the user's terms. Its code 2 ("media preprocessing error" in mtmd.h)
        is also what it returns for any C++ exception while tokenizing (mtmd.cpp catches them all): a
        SentencePiece vocabulary with no byte fallback throws (llama_vocab::byte_to_token's map::at) on a
        character it has no piece for, such as the newline the chat template adds. The first such
        character is found by bisecting the text."""
        plain = text.replace(IMAGE_PLACEHOLDER, "")
        if rc == 2 and not self._tokenizes(plain):
            lo, hi = 0, len(plain)  # plain[:lo] tokenizes, plain[:hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self._tokenizes(plain[:mid]) else (lo, mid)
            return _Unencodable(plain[lo])
        if rc == 2 and n_images:
            return LlavaGgufError(f"libmtmd could not pre-process the image(s) (code {rc})",
                                  "run with --verbose for llama.cpp's log")
        return LlavaGgufError(f"libmtmd could not tokenize the prompt with {n_images} image(s) (code {rc})",
                              "run with --verbose for llama.cpp's log")

    def _segments(self, chunks, hashes: list[str]) -> list[tuple]:
        """("text", token ids) and ("image", hash, chunk, n positions) in prompt order."""
        mt = self._mtmd
        out, k = [], 0
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append(("text", [ptr[j] for j in range(n.value)]))
            else:
                n = (self._anyres_count(hashes[k]) if self._anyres is not None
                     else int(mt.mtmd_input_chunk_get_n_tokens(chunk)))
                out.append(("image", hashes[k], chunk, n))
                k += 1
        return out

    def _image_rows(self, digest: str, chunk) -> np.ndarray:
        """The embedding rows of an image chunk: from the cache, or encoded now (and cached)."""
        cached = self._embeddings.get(digest)
        if cached is not None:
            self._embeddings.move_to_end(digest)
            return cached
        if self._anyres is not None:
            original = self._originals.get(digest)
            if original is None:  # pragma: no cover - every anyres image is kept by _bitmap until here
                raise LlavaGgufError("internal error: the anyres image was not kept")
            rows = self._anyres_rows(original)
        else:
            rows = self._encode(chunk)
        self.last.images_encoded += 1
        self._embeddings[digest] = rows
        size = sum(v.nbytes for v in self._embeddings.values())
        while len(self._embeddings) > 1 and size > self.IMAGE_CACHE_BYTES:
            _, old = self._embeddings.popitem(last=False)
            size -= old.nbytes
        return rows

    @_open
    def embed_image(self, image: ImageInput) -> np.ndarray:
        """The rows the runtime feeds the LLM for `image`: shape (n_tokens, n_embd) — after
        pre-processing, the vision tower and the projector."""
        mt = self._mtmd
        hashes: list[str] = []
        chunks = self._tokenize(IMAGE_PLACEHOLDER, [image], add_special=False, hashes=hashes)
        try:
            for seg in self._segments(chunks, hashes):
                if seg[0] == "image":
                    return self._image_rows(seg[1], seg[2]).copy()
        finally:
            mt.mtmd_input_chunks_free(chunks)
        raise LlavaGgufError("libmtmd produced no image chunk")

    # ----------------------------------------------------------------- evaluation
    @_open
    def reset(self) -> None:
        """Forget the KV cache (the image embedding cache stays)."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self._spans = []

    @_open
    def eval_chunks(self, chunks) -> list[int]:
        """Decode mtmd chunks after what the context holds; returns the context's token ids."""
        mt, llm = self._mtmd, self.llm
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            kind = mt.mtmd_input_chunk_get_type(chunk)
            if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens = [ptr[j] for j in range(n.value)]
                self._check_room(len(tokens))
                if tokens:
                    llm.eval(tokens)
            else:
                n_tok = mt.mtmd_input_chunk_get_n_tokens(chunk)
                self._check_room(n_tok)
                new_past = self._lc.llama_pos(0)
                start = llm.n_tokens
                llm._ctx.kv_cache_seq_rm(-1, start, -1)
                rc = mt.mtmd_helper_eval_chunk_single(self._ctx, llm._ctx.ctx, chunk, start, 0, llm.n_batch,
                                                      False, ctypes.byref(new_past))
                if rc != 0:
                    raise LlavaGgufError(f"libmtmd failed to evaluate the image (code {rc})")
                # image positions carry the <image> id, so repeat penalties never see stale ids
                llm.input_ids[start:new_past.value] = self._image_token
                llm.n_tokens = new_past.value
        return llm.input_ids[: llm.n_tokens].tolist()

    @_open
    def eval_image(self, image: ImageInput) -> None:
        """Encode `image` and decode its rows after what the context holds."""
        if self._anyres is not None:  # libmtmd's own evaluation would use its LLaVA-UHD rows
            self.eval_embeddings(self.embed_image(image))
            return
        chunks = self._tokenize(IMAGE_PLACEHOLDER, [image], add_special=False)
        try:
            self.eval_chunks(chunks)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    @_open
    def eval_embeddings(self, embd: np.ndarray) -> None:
        """Decode raw embedding rows (e.g. from embed_image) after what the context holds."""
        lc, llm = self._lc, self.llm
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n, width = embd.shape
        self._check_room(n)
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        for s in range(0, n, llm.n_batch):
            part = embd[s:s + llm.n_batch]
            batch = lc.llama_batch_init(len(part), width, 1)
            try:
                ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                for j in range(len(part)):
                    batch.pos[j] = llm.n_tokens + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = False
                batch.n_tokens = len(part)
                if lc.llama_decode(llm._ctx.ctx, batch) != 0:
                    raise LlavaGgufError("llama.cpp failed to decode the image embeddings")
            finally:
                lc.llama_batch_free(batch)
            llm.input_ids[llm.n_tokens:llm.n_tokens + len(part)] = self._image_token
            llm.n_tokens += len(part)

    @_open
    def eval_tokens(self, tokens: Sequence[int]) -> None:
        self._check_room(len(tokens))
        self.llm.eval(list(tokens))

    @_open
    def last_logits(self) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _check_room(self, n: int) -> None:
        if self.llm.n_tokens + n > self.n_ctx:
            raise LlavaGgufError(f"the prompt needs {self.llm.n_tokens + n} tokens but the context holds "
                                 f"{self.n_ctx}", self._room_hint())

    def _room_hint(self) -> str:
        if self.context_limit and self.llm_info.sliding_window and self.n_ctx >= self.llm_info.sliding_window:
            return f"{self.context_limit} is the longest context this model computes exactly"
        return "pass a larger n_ctx (--ctx)"

    # ----------------------------------------------------------------- prompting
    @_open
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        # text that happens to contain "<image>" or libmtmd's marker is text, not an image slot
        for m in messages:
            check_text(m.text or "", _ROLES.get(m.role, f"a {m.role} message"))
        messages = [Message(m.role, (m.text or "").replace(self._marker, "").replace(IMAGE_PLACEHOLDER, _LITERAL_IMAGE),
                            m.n_images) for m in messages]
        return self._render(messages, add_generation_prompt).replace(_LITERAL_IMAGE, IMAGE_PLACEHOLDER.replace("<", "< "))

    def _render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        templates = [t for t in (self.llm_info.chat_template, self.family_template) if t]
        bos, eos = self._bos_eos
        return render_with_images(templates, messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt)

    @functools.cached_property
    def _bos_eos(self) -> tuple[str, str]:
        """The BOS and EOS tokens' text, for the chat template (a turn renders it several times)."""
        llm = self.llm
        return tuple(self._piece(t).decode(errors="replace") if t >= 0 else "" for t in (llm.token_bos(), llm.token_eos()))

    @_open
    def eval_prompt(self, prompt: str, images: Sequence[ImageInput] = ()) -> list[int]:
        """One user turn (the images before the text), rendered from the chat template and decoded
        (reusing whatever prefix the KV cache already holds); returns the context's token ids (image
        positions carry the <image> id)."""
        return self.eval_messages([Message("user", prompt, n_images=len(images))], list(images))

    @_open
    def eval_messages(self, messages: list[Message], images: Sequence[ImageInput]) -> list[int]:
        """Render `messages` (with a generation prompt) and make the KV cache hold exactly that prompt,
        decoding only what differs from what it held. `images` fill the messages' image slots in order."""
        t0 = self._t_call = time.perf_counter()
        chunks, segs = self._prompt(messages, images)
        try:
            self._evaluate(segs)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)
        self.last.prompt_seconds = time.perf_counter() - t0
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    @_open
    def count_prompt(self, messages: list[Message], images: Sequence[ImageInput]) -> int:
        """Positions `messages` would take in the context (text tokens + image rows), without decoding."""
        chunks, segs = self._prompt(messages, images)
        self._mtmd.mtmd_input_chunks_free(chunks)
        return sum(len(seg[1]) if seg[0] == "text" else seg[3] for seg in segs)

    def _piece(self, token: int) -> bytes:
        """A token's text, special tokens as written (llama-cpp-python's detokenize cuts pieces at 32 bytes)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._lc.llama_token_to_piece(self.llm._model.vocab, token, buf, len(buf), 0, True)
            piece = self._pieces[token] = buf.raw[:n] if n > 0 else b""
        return piece

    # an answer cut short (stop string, stripped trailing space, an unfinished UTF-8 character) still has
    # all but its last few tokens in the rendered text
    _SPLICE_TAIL = 8

    def _answers(self, messages: list[Message]) -> list[tuple[list[int], bytes, bytes]]:
        """Each assistant message with token ids: (ids, sep, anchor). `sep` is what the template puts
        between the generation prompt and the answer (" " after Vicuna's "ASSISTANT:", nothing after a
        prompt ending in a newline): the ids were generated right after the generation prompt, so they
        replace both. `anchor` is the generation prompt's last word: the answer is looked for only right
        after it."""
        out = []
        for i, m in enumerate(messages):
            if m.role != "assistant" or not m.tokens:
                continue
            try:
                head = self.render(messages[:i])
                whole = self.render(messages[: i + 1], add_generation_prompt=False)
            except LlavaGgufError:
                continue
            text = m.text.replace(self._marker, "").replace(IMAGE_PLACEHOLDER, "< image>")
            at = whole.find(text, len(head)) if text and whole.startswith(head) else -1
            gap = whole[len(head):at] if at >= 0 else ""
            anchor = head.rstrip().split()[-1][-8:] if head.strip() else ""
            if at < 0 or (gap and not gap.isspace()) or not anchor:
                continue  # the template does not put the answer right after the generation prompt
            out.append((list(m.tokens), gap.encode(), anchor.encode()))
        return out

    def _prompt(self, messages: list[Message], images: Sequence[ImageInput], hashes: list[str] | None = None):
        """(mtmd chunks, segments): the conversation rendered, tokenized, its answers' own ids spliced in.
        The caller frees the chunks."""
        text = self.render(messages)
        hashes = [] if hashes is None else hashes
        try:
            chunks = self._tokenize(text, list(images), add_special=True, hashes=hashes)
        except _Unencodable as e:
            raise e.located(any(e.char in (m.text or "") for m in messages)) from None
        try:
            return chunks, self._splice_answers(self._segments(chunks, hashes), self._answers(messages))
        except BaseException:
            self._mtmd.mtmd_input_chunks_free(chunks)
            raise

    def _splice_answers(self, segs: list[tuple], answers: list[tuple[list[int], bytes, bytes]]) -> list[tuple]:
        """Put each answer's own token ids back where the rendered text tokenized it differently, so the
        prompt matches, position for position, what the KV cache holds from generating the answer. A run
        of tokens right after the generation prompt is replaced only by ids with the same text (up to the
        whitespace between the generation prompt and the answer, which then is what the model generated
        after it)."""
        if not answers:
            return segs
        n_vocab = self.llm.n_vocab()
        out = list(segs)
        si, cursor = 0, 0
        for ids, sep, anchor in answers:
            if not all(0 <= t < n_vocab for t in ids):
                continue
            for sj in range(si, len(out)):
                if out[sj][0] != "text":
                    continue
                hit = self._splice(out[sj][1], cursor if sj == si else 0, ids, sep, anchor)
                if hit is not None:
                    out[sj] = ("text", hit[0])
                    si, cursor = sj, hit[1]
                    break
        return out

    def _splice(self, toks: list[int], start: int, ids: list[int], sep: bytes,
                anchor: bytes) -> tuple[list[int], int] | None:
        pieces = [self._piece(t) for t in toks[start:]]
        first: dict[int, int] = {}  # byte offset -> the first / last token index starting there
        last: dict[int, int] = {}
        off = 0
        for i, pc in enumerate(pieces):
            first.setdefault(off, i)
            last[off] = i
            off += len(pc)
        first.setdefault(off, len(pieces))
        last[off] = len(pieces)
        text = b"".join(pieces)
        gen = [self._piece(t) for t in ids]
        a = text.find(anchor)
        while a != -1:
            g = a + len(anchor)  # where the generation prompt ends
            for k in range(len(ids), max(0, len(ids) - self._SPLICE_TAIL - 1), -1):
                mine = b"".join(gen[:k])
                core = mine.lstrip()
                if not core:
                    continue
                # the answer's own leading whitespace replaces the template's separator ...
                if g in last and text.startswith(sep + core, g) and g + len(sep + core) in first:
                    i, j = start + last[g], start + first[g + len(sep + core)]
                    return toks[:i] + ids[:k] + toks[j:], i + k
                # ... or the ids start after the separator, and then say exactly what the text says
                h = g + len(sep)
                if sep and mine == core and h in last and text.startswith(core, h) and h + len(core) in first:
                    i, j = start + last[h], start + first[h + len(core)]
                    return toks[:i] + ids[:k] + toks[j:], i + k
            a = text.find(anchor, a + 1)
        return None

    def _held(self) -> list:
        """What the KV cache holds, position by position: token ids, and (hash, k) for image rows."""
        llm = self.llm
        items: list = llm.input_ids[: llm.n_tokens].tolist()
        live = []
        for start, n, digest in self._spans:
            if start + n <= llm.n_tokens and all(t == self._image_token for t in items[start:start + n]):
                items[start:start + n] = [(digest, k) for k in range(n)]
                live.append((start, n, digest))
        self._spans = live
        return items

    def _evaluate(self, segs: list[tuple]) -> None:
        llm = self.llm
        want: list = []
        for seg in segs:
            want += seg[1] if seg[0] == "text" else [(seg[1], k) for k in range(seg[3])]
        n_ctx = self.n_ctx
        if len(want) >= n_ctx:
            raise LlavaGgufError(f"the prompt needs {len(want)} tokens ({sum(1 for x in want if isinstance(x, tuple))} "
                                 f"for images) but the context holds {n_ctx}", self._room_hint())
        held = self._held()
        p = 0
        for a, b in zip(held, want):
            if a != b:
                break
            p += 1
        p = min(p, len(want) - 1)  # the last position is always decoded again: its logits are needed
        pos = 0
        for seg in segs:  # never start inside an image
            n = len(seg[1]) if seg[0] == "text" else seg[3]
            if seg[0] == "image" and pos < p < pos + n:
                p = pos
            pos += n
        self.last = EvalStats(prompt_tokens=len(want), reused_tokens=p, evaluated_tokens=len(want) - p,
                              images=sum(1 for seg in segs if seg[0] == "image"))
        llm.n_tokens = p
        llm._ctx.kv_cache_seq_rm(-1, p, -1)
        self._spans = [sp for sp in self._spans if sp[0] + sp[1] <= p]
        pos = 0
        for seg in segs:
            n = len(seg[1]) if seg[0] == "text" else seg[3]
            if pos + n > p:
                if seg[0] == "text":
                    try:
                        llm.eval(seg[1][max(0, p - pos):])
                    except RuntimeError as e:
                        raise LlavaGgufError(f"llama.cpp failed to decode the prompt: {e}") from None
                else:
                    rows = self._image_rows(seg[1], seg[2])
                    self.eval_embeddings(rows)
                    self._spans.append((pos, n, seg[1]))
            pos += n

    @_open
    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.llm._model.vocab, token))

    @_open
    def stream_from_image(self, image: ImageInput, prompt: str, *, max_tokens: int = 256, temperature: float = 0.2,
                          top_p: float = 0.95, top_k: int = 40, repeat_penalty: float = 1.1,
                          stop: str | Sequence[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """Like generate_from_image, yielding text pieces as they are decoded."""
        return self.stream_messages([Message("user", prompt, n_images=1)], [image], max_tokens=max_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                    repeat_penalty=repeat_penalty, stop=stop, seed=seed)

    @_open
    def generate_from_image(self, image: ImageInput, prompt: str, **sampling) -> str:
        """Answer `prompt` about `image`: max_tokens=256, temperature=0.2 (0 = greedy), top_p=0.95,
        top_k=40, repeat_penalty=1.1, stop=None (a string or strings that end the answer, not
        included), seed=None (random)."""
        return "".join(self.stream_from_image(image, prompt, **sampling))

    @_open
    def stream_messages(self, messages: list[Message], images: Sequence[ImageInput], *, max_tokens: int = 256,
                        temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, repeat_penalty: float = 1.1,
                        stop: str | Sequence[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """The answer to a whole conversation (`messages`, their images in order), streamed. The settings
        are checked now (InvalidSetting, a ValueError); the prompt is decoded when the stream starts."""
        settings = sampling_settings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     repeat_penalty=repeat_penalty, stop=stop, seed=seed)
        return self._stream(messages, images, settings)

    @staticmethod
    def validate_sampling(**sampling) -> Sampling:
        """The sampling keywords of stream_messages checked, as it checks them (for callers that need a
        value, e.g. max_tokens, before they call it)."""
        return sampling_settings(**sampling)

    def _stream(self, messages: list[Message], images: Sequence[ImageInput], settings: Sampling) -> Iterator[str]:
        prompt_ids = self.eval_messages(messages, images)
        yield from self._sample(prompt_ids, settings)

    def _while_open(self, tokens: Iterator[int]) -> Iterator[int]:
        """`tokens`, checking before each one that the model was not closed meanwhile (a stream resumed
        after close() would decode on a freed context)."""
        while True:
            self._check_open()
            try:
                token = next(tokens)
            except StopIteration:
                return
            yield token

    @_open
    def chat(self, system: str | None = None, *, on_overflow: str = "error"):
        """A multi-turn conversation; follow-up turns decode only what is new. `on_overflow`: "error" or
        "drop_oldest" (drop the oldest turns when the conversation no longer fits the context)."""
        from .session import ChatSession

        return ChatSession(self, system, on_overflow=on_overflow)

    def _sample(self, prompt_ids: list[int], s: Sampling) -> Iterator[str]:
        llm = self.llm
        if s.max_tokens <= 0:
            return
        llm.set_seed(s.seed if s.seed is not None else
                     self._seed if self._seed is not None else self._lc.LLAMA_DEFAULT_SEED)  # None: random
        out = bytearray()
        emitted = 0
        held = ""
        n = 0
        t_first = None
        started = False
        stats = self.last
        ids: list[int] = []
        try:
            for token in self._while_open(_decode_errors(llm.generate(
                    prompt_ids, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                    repeat_penalty=s.repeat_penalty, reset=True))):
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.first_token_seconds = now - self._t_call
                stats.generate_seconds = now - t_first
                if self._lc.llama_vocab_is_eog(llm._model.vocab, token):
                    break
                n += 1
                ids.append(token)
                stats.generated_tokens = n
                # stop after the last wanted token, without asking llama.cpp for one more
                last = n >= s.max_tokens or llm.n_tokens >= self.n_ctx - 1
                out += llm.detokenize([token], prev_tokens=None)
                text = out.decode("utf-8", errors="ignore") if _complete_utf8(out) else None
                if text is None:
                    if last:
                        break
                    continue
                piece = text[emitted:]
                emitted = len(text)
                if not held and not started:
                    piece = piece.lstrip()  # the space SentencePiece puts before the answer's first word
                    started = bool(piece)
                held += piece
                hit = next((st for st in s.stop if st in held), None)
                if hit is not None:
                    yield held[: held.index(hit)]
                    return
                keep = max((len(st) - 1 for st in s.stop), default=0)
                if keep and len(held) > keep:
                    yield held[:-keep]
                    held = held[-keep:]
                elif not keep:
                    yield held
                    held = ""
                if last:
                    break
            if held:
                yield held
        finally:
            stats.answer_tokens = tuple(ids)


def _decode_errors(tokens: Iterator[int]) -> Iterator[int]:
    """llama-cpp-python raises RuntimeError when llama_decode fails: ours is one line."""
    try:
        yield from tokens
    except RuntimeError as e:
        raise LlavaGgufError(f"llama.cpp failed to decode: {e}") from None


class _Unencodable(LlavaGgufError):
    """A character the model's vocabulary has no token for (and no byte-fallback tokens to spell it)."""

    def __init__(self, char: str, in_user_text: bool | None = None) -> None:
        name = {"\n": "newline", "\t": "tab", " ": "space", "\r": "carriage return"}.get(char)
        shown = f"the {name} (U+{ord(char):04X})" if name else f"{char!r} (U+{ord(char):04X})"
        where = {True: "your text", False: "the prompt (the chat template adds it)", None: "the prompt"}[in_user_text]
        hint = ("leave the character out" if in_user_text else
                "convert the model again with a tokenizer that has byte_fallback or a piece for it")
        super().__init__(f"the model's vocabulary cannot encode {shown} in {where}: its SentencePiece tokenizer has "
                         "no piece for it and no byte fallback (libmtmd code 2)", hint)
        self.char = char

    def located(self, in_user_text: bool) -> _Unencodable:
        return _Unencodable(self.char, in_user_text)


def _one_of(a, b, name_a: str, name_b: str):
    if a is not None and b is not None:
        raise LlavaGgufError(f"give {name_a} or {name_b}, not both (they name the same file)")
    return a if a is not None else b


def _device_layers(device: str) -> int:
    """n_gpu_layers for a device name: 0 for the CPU, all layers (-1) for a GPU the build has."""
    key = device.lower()
    if key not in DEVICES:
        raise LlavaGgufError(f"unknown device {device!r}", f"choose one of {', '.join(DEVICES)}")
    if DEVICES[key] is None:
        return 0
    have = native.backend_devices()
    if not any(DEVICES[key].lower() in (d["name"] + " " + d["description"]).lower() and d["type"] != "cpu"
               for d in have):
        names = ", ".join(d["name"] for d in have) or "none"
        raise LlavaGgufError(f"device {device!r} is not in this build (its devices: {names})",
                             f"rebuild with the {DEVICES[key]} backend (CMAKE_ARGS=-DGGML_{DEVICES[key].upper()}=ON) or use device='cpu'")
    return -1


def _complete_utf8(buf: bytearray) -> bool:
    """False while the buffer ends inside a multi-byte UTF-8 sequence."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back >= need
    return True
