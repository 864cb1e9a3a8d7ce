"""The LLaVA model object: an LLM GGUF and its mmproj, loaded through llama-cpp-python on our own
native libraries (see native.py). Image -> libmtmd (pre-processing, CLIP, projector) -> embeddings
decoded into the LLM's KV cache at the image's place in the prompt -> sampling."""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlavaGgufError
from . import native
from .images import ImageInput, load_image
from .prompt import IMAGE_PLACEHOLDER, Message, render_with_images


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str
    n_embd: int
    chat_template: str | None
    context_length: int | None
    image_tokens: int | None  # mmproj only


def read_gguf_info(path: Path, what: str) -> GGUFInfo:
    import gguf

    if not path.is_file():
        raise LlavaGgufError(f"{what} {path} does not exist")
    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise LlavaGgufError(f"{path} is not a readable GGUF file ({str(e)[:200]})", "convert the model again") from None

    def field(key: str):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture") or "?"
    if arch == "clip":
        n_embd = field("clip.vision.projection_dim")
        size, patch = field("clip.vision.image_size"), field("clip.vision.patch_size")
        tokens = (size // patch) ** 2 if size and patch else None
        return GGUFInfo(path, arch, int(n_embd or 0), None, None, tokens)
    return GGUFInfo(path, arch, int(field(f"{arch}.embedding_length") or 0), field("tokenizer.chat_template"),
                    field(f"{arch}.context_length"), None)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None


class LLaVA:
    """A LLaVA model ready to answer questions about images.

    >>> model = LLaVA("out/llava-F16.gguf", "out/mmproj-llava-F16.gguf")
    >>> model.generate_from_image("cat.jpg", "What can you see?")
    """

    def __init__(self, model_path: str | Path, mmproj_path: str | Path, *, n_ctx: int | None = None,
                 n_threads: int | None = None, n_gpu_layers: int = 0, seed: int | None = None,
                 verbose: bool = False) -> None:
        from ..convert.families.llava15 import FAMILY

        self.model_path, self.mmproj_path = Path(model_path), Path(mmproj_path)
        self.llm_info = read_gguf_info(self.model_path, "model")
        self.mmproj_info = read_gguf_info(self.mmproj_path, "mmproj")
        if self.llm_info.arch == "clip":
            raise LlavaGgufError(f"{self.model_path} is an mmproj file, not a language model",
                                 "pass the LLM .gguf as the model and the mmproj-*.gguf as the mmproj")
        if self.mmproj_info.arch != "clip":
            raise LlavaGgufError(f"{self.mmproj_path} is not an mmproj file (architecture {self.mmproj_info.arch!r})")
        if self.mmproj_info.n_embd != self.llm_info.n_embd:
            raise LlavaGgufError(f"the mmproj projects to width {self.mmproj_info.n_embd} but the language model's "
                                 f"embedding width is {self.llm_info.n_embd}", "these two files are not a pair")
        self.family_template = FAMILY.default_chat_template
        self.verbose = verbose
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        image_tokens = self.mmproj_info.image_tokens or 576
        if n_ctx is None:
            n_ctx = max(2048, image_tokens + 1024)
            if self.llm_info.context_length:
                n_ctx = min(n_ctx, int(self.llm_info.context_length))
        self.libs = native.configure()
        native.quiet_logs(verbose)
        lc = native.llama_cpp()
        self._lc = lc
        self._mtmd = native.mtmd_cpp()
        try:
            self.llm = lc.Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=self.n_threads,
                                n_threads_batch=self.n_threads, n_gpu_layers=n_gpu_layers,
                                seed=seed if seed is not None else lc.LLAMA_DEFAULT_SEED, verbose=verbose)
        except ValueError as e:
            raise LlavaGgufError(f"llama.cpp could not load {self.model_path}: {e}") from None
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

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> LLaVA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- images
    def _bitmap(self, image: ImageInput):
        img = load_image(image)
        data = img.tobytes()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bmp = self._mtmd.mtmd_bitmap_init(img.width, img.height, buf)
        if not bmp:
            raise LlavaGgufError("libmtmd could not take the image")
        return bmp

    def _tokenize(self, text: str, images: Sequence[ImageInput], add_special: bool):
        """mtmd chunks for `text`, whose IMAGE_PLACEHOLDERs are replaced by `images` in order."""
        mt = self._mtmd
        bitmaps = [self._bitmap(im) for im in images]
        chunks = mt.mtmd_input_chunks_init()
        try:
            encoded = text.replace(IMAGE_PLACEHOLDER, self._marker).encode()
            inp = mt.mtmd_input_text()
            inp.text = encoded
            inp.text_len = len(encoded)
            inp.add_special = add_special
            inp.parse_special = True
            arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mt.mtmd_input_chunks_free(chunks)
                raise LlavaGgufError(f"libmtmd could not tokenize the prompt with {len(bitmaps)} image(s) (code {rc})")
            return chunks
        finally:
            for b in bitmaps:
                mt.mtmd_bitmap_free(b)

    def embed_image(self, image: ImageInput) -> np.ndarray:
        """The rows the runtime feeds the LLM for `image`: shape (n_tokens, n_embd)."""
        mt = self._mtmd
        chunks = self._tokenize(IMAGE_PLACEHOLDER, [image], add_special=False)
        try:
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mt.mtmd_input_chunk_get_n_tokens(chunk)
                    if mt.mtmd_encode_chunk(self._ctx, chunk) != 0:
                        raise LlavaGgufError("libmtmd failed to encode the image")
                    ptr = mt.mtmd_get_output_embd(self._ctx)
                    return np.ctypeslib.as_array(ptr, shape=(n * self.llm_info.n_embd,)).reshape(n, -1).copy()
        finally:
            mt.mtmd_input_chunks_free(chunks)
        raise LlavaGgufError("libmtmd produced no image chunk")

    # ----------------------------------------------------------------- evaluation
    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

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
                rc = mt.mtmd_helper_eval_chunk_single(self._ctx, llm._ctx.ctx, chunk, start, 0, llm.n_batch,
                                                      False, ctypes.byref(new_past))
                if rc != 0:
                    raise LlavaGgufError(f"libmtmd failed to evaluate the image (code {rc})")
                # image positions carry the <image> id, so repeat penalties never see stale ids
                llm.input_ids[start:new_past.value] = self._image_token
                llm.n_tokens = new_past.value
        return llm.input_ids[: llm.n_tokens].tolist()

    def eval_image(self, image: ImageInput) -> None:
        """Encode `image` and decode its rows after what the context holds."""
        chunks = self._tokenize(IMAGE_PLACEHOLDER, [image], add_special=False)
        try:
            self.eval_chunks(chunks)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def eval_embeddings(self, embd: np.ndarray) -> None:
        """Decode raw embedding rows (e.g. from embed_image) after what the context holds."""
        lc, llm = self._lc, self.llm
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n, width = embd.shape
        self._check_room(n)
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

    def eval_tokens(self, tokens: Sequence[int]) -> None:
        self._check_room(len(tokens))
        self.llm.eval(list(tokens))

    def last_logits(self) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _check_room(self, n: int) -> None:
        if self.llm.n_tokens + n > self.llm.n_ctx():
            raise LlavaGgufError(f"the prompt needs {self.llm.n_tokens + n} tokens but the context holds "
                                 f"{self.llm.n_ctx()}", "pass a larger n_ctx (--n-ctx)")

    # ----------------------------------------------------------------- prompting
    def render(self, messages: list[Message]) -> str:
        llm = self.llm
        bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="replace") if llm.token_bos() >= 0 else ""
        eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace") if llm.token_eos() >= 0 else ""
        templates = [t for t in (self.llm_info.chat_template, self.family_template) if t]
        return render_with_images(templates, messages, bos=bos, eos=eos)

    def eval_prompt(self, prompt: str, images: Sequence[ImageInput] = ()) -> list[int]:
        """Start afresh with one user turn (the images before the text), rendered from the chat template
        and decoded; returns the context's token ids (image positions carry the <image> id)."""
        text = self.render([Message("user", prompt, n_images=len(images))])
        self.reset()
        chunks = self._tokenize(text, list(images), add_special=True)
        try:
            return self.eval_chunks(chunks)
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.llm._model.vocab, token))

    def stream_from_image(self, image: ImageInput, prompt: str, *, max_tokens: int = 256, temperature: float = 0.2,
                          top_p: float = 0.95, top_k: int = 40, repeat_penalty: float = 1.1,
                          stop: str | Sequence[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """Like generate_from_image, yielding text pieces as they are decoded."""
        prompt_ids = self.eval_prompt(prompt, [image])
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        yield from self._sample(prompt_ids, Sampling(max_tokens, temperature, top_p, top_k, 0.05, repeat_penalty,
                                                     stops, seed))

    def generate_from_image(self, image: ImageInput, prompt: str, **sampling) -> str:
        """Answer `prompt` about `image`. temperature=0 is greedy."""
        return "".join(self.stream_from_image(image, prompt, **sampling))

    def _sample(self, prompt_ids: list[int], s: Sampling) -> Iterator[str]:
        llm = self.llm
        if s.seed is not None:
            llm.set_seed(s.seed)
        out = bytearray()
        emitted = 0
        held = ""
        n = 0
        for token in llm.generate(prompt_ids, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                                  repeat_penalty=s.repeat_penalty, reset=True):
            if self._lc.llama_vocab_is_eog(llm._model.vocab, token) or n >= s.max_tokens:
                break
            n += 1
            out += llm.detokenize([token], prev_tokens=None)
            text = out.decode("utf-8", errors="ignore") if _complete_utf8(out) else None
            if text is None:
                continue
            piece = text[emitted:]
            emitted = len(text)
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
            if llm.n_tokens >= llm.n_ctx() - 1:
                break
        if held:
            yield held


def _complete_utf8(buf: bytearray) -> bool:
    """False while the buffer ends inside a multi-byte UTF-8 sequence."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back >= need
    return True
