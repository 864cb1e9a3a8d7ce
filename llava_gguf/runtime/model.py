"""The LLaVA model object: an LLM GGUF and its mmproj on our own native libraries, the client of one
sequence of an engine (engine.py; its own engine of one sequence unless attached to a shared one).
Image -> libmtmd (pre-processing, CLIP, projector) -> embeddings decoded into the KV cache at the image's
place in the prompt -> sampling."""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.pairing import PYTHON_CHOICES, locate_pair
from llava_gguf.native.mtmd import Chunks
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.generate import EvalStats, stream_answer
from llava_gguf.runtime.images import ImageInput
from llava_gguf.runtime.loading import check_files, context_size, device_layers, room_hint
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER, Message
from llava_gguf.runtime.prompter import Prompter
from llava_gguf.runtime.resources import thread_count
from llava_gguf.runtime.sampling import Sampling, check_seed, sampling_settings
from llava_gguf.runtime.segments import ImageSegment
from llava_gguf.runtime.session import ChatSession
from llava_gguf.runtime.vision import IMAGE_CACHE_BYTES


def _open(method):
    """A public method of LLaVA: after close() it raises our error instead of reaching freed native state
    (which segfaults)."""
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self._check_open()
        return method(self, *args, **kwargs)

    return checked


class _CacheLimit:
    """LLaVA.IMAGE_CACHE_BYTES: the class default; on a model, its engine's embedding cache limit."""

    def __get__(self, obj, owner=None) -> int:
        return IMAGE_CACHE_BYTES if obj is None else obj.engine.images.cache.limit_bytes

    def __set__(self, obj, value: int) -> None:
        obj.engine.images.cache.limit_bytes = value


class LLaVA:
    """A LLaVA model ready to answer questions about images.

    >>> model = LLaVA("out/llava-Q4_K_M.gguf", "out/mmproj-llava-F16.gguf")
    >>> model.generate_from_image("cat.jpg", "What can you see?")

    Also `LLaVA.load("out/")` for a directory `convert`/`quantize` wrote, and the reference
    implementation's names: `LLaVA(language_model_path=..., vision_model_path=..., device="cpu")`.

    Follow-up prompts reuse the KV cache for the prefix they share with what was evaluated before
    (system prompt, earlier turns, images), and an image seen before is not encoded again (its
    embedding rows are cached by content hash). `model.engine` is the engine underneath;
    `LLaVA.attach(engine)` is a model on one more sequence of a shared engine."""

    IMAGE_CACHE_BYTES = _CacheLimit()  # embedding rows kept for images seen before (LRU)

    def __init__(self, model_path: str | Path | None = None, mmproj_path: str | Path | None = None, *,
                 n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int | None = None,
                 seed: int | None = None, verbose: bool = False, language_model_path: str | Path | None = None,
                 vision_model_path: str | Path | None = None, device: str | None = None) -> None:
        model_path = _one_of(model_path, language_model_path, "model_path", "language_model_path")
        mmproj_path = _one_of(mmproj_path, vision_model_path, "mmproj_path", "vision_model_path")
        if model_path is None or mmproj_path is None:
            raise LlavaGgufError("LLaVA needs the language model and the mmproj",
                                 "LLaVA(model_path, mmproj_path), or LLaVA.load(directory)")
        if device is not None and n_gpu_layers is not None:
            raise LlavaGgufError("give device or n_gpu_layers, not both")
        files = check_files(Path(model_path), Path(mmproj_path))
        n_threads = thread_count(n_threads)
        seed = check_seed(seed)
        # offloaded layers keep their KV cache in device memory, which we cannot measure from here
        offload = bool(n_gpu_layers) or (device is not None and device.lower() != "cpu")
        size = context_size(files.llm_info, n_ctx, files.image_tokens, check=not offload, stacklevel=3)
        if device is not None:
            n_gpu_layers = device_layers(device)
        engine = Engine(files, n_ctx=size.n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers or 0,
                        verbose=verbose, hint=room_hint(files.llm_info, size))
        self._setup(engine, owns_engine=True, seed=seed, context_limit=size.limit)

    def _setup(self, engine: Engine, *, owns_engine: bool, seed: int | None, context_limit: str | None) -> None:
        files = engine.files
        self.engine = engine
        self.model_path, self.mmproj_path = files.model_path, files.mmproj_path
        self.llm_info, self.mmproj_info = files.llm_info, files.mmproj_info
        self.family_template = files.family_template
        self.verbose = engine.verbose
        self.n_threads = engine.ctx.n_threads
        self.image_tokens = files.image_tokens
        self.context_limit = context_limit
        self.libs = engine.libs
        self.slot = engine.acquire()
        self.prompter = Prompter(engine)
        self.llm = engine.model  # the loaded LLM: tokenize(), piece(), is_eog(), n_vocab
        self.last = EvalStats()
        self._owns_engine = owns_engine
        self._seed = seed
        self._t_call = 0.0

    @classmethod
    def attach(cls, engine: Engine, *, seed: int | None = None) -> LLaVA:
        """A model on a free sequence of a shared engine; close() frees the sequence, not the engine."""
        model = cls.__new__(cls)
        cls._setup(model, engine, owns_engine=False, seed=check_seed(seed), context_limit=None)
        return model

    @classmethod
    def load(cls, path: str | Path, *, llm: str | Path | None = None, mmproj: str | Path | None = None,
             **options) -> LLaVA:
        """A directory that `convert`/`quantize` wrote: the LLM (the quantized one when there is exactly
        one; `llm=` to choose) and its mmproj (`mmproj=` to choose); `options` go to the constructor."""
        llm_path, mmproj_path = locate_pair(path, llm, mmproj, choices=PYTHON_CHOICES)
        return cls(llm_path, mmproj_path, **options)

    @property
    def n_ctx(self) -> int:
        """Positions the context holds for this model's sequence."""
        self._check_open()
        return self.engine.n_ctx

    @property
    def closed(self) -> bool:
        """True after close(): every method then raises LlavaGgufError("the model is closed")."""
        return getattr(self, "llm", None) is None or self.engine.closed

    def _check_open(self) -> None:
        if self.closed:
            raise LlavaGgufError("the model is closed", "create a new LLaVA to use it again")

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        self.llm = None
        if self._owns_engine:
            self.engine.close()
        elif not self.engine.closed:
            self.engine.release(self.slot)

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
    @_open
    def embed_image(self, image: ImageInput) -> np.ndarray:
        """The rows the runtime feeds the LLM for `image`: shape (n_tokens, n_embd) — after
        pre-processing, the vision tower and the projector."""
        return self.engine.images.embed(image)

    # ----------------------------------------------------------------- evaluation
    @_open
    def reset(self) -> None:
        """Forget the KV cache (the image embedding cache stays)."""
        self.engine.clear(self.slot)

    @_open
    def eval_chunks(self, chunks) -> list[int]:
        """Decode mtmd chunks (an mtmd_input_chunks pointer) after what the context holds; returns the
        context's token ids."""
        for chunk in Chunks(chunks.handle if isinstance(chunks, Chunks) else chunks, owned=False):
            if chunk.is_text:
                self.engine.decode_tokens(self.slot, chunk.tokens)
            else:
                self.engine.eval_chunk(self.slot, chunk)
        return self.engine.held_ids(self.slot)

    @_open
    def eval_image(self, image: ImageInput) -> None:
        """Encode `image` and decode its rows after what the context holds."""
        chunks, segments = self.engine.tokenize(IMAGE_PLACEHOLDER, [image], add_special=False)
        with chunks:
            for seg in segments:
                if isinstance(seg, ImageSegment):
                    self.engine.decode_rows(self.slot, self.engine.images.rows(seg)[0], seg.digest)

    @_open
    def eval_embeddings(self, embd: np.ndarray) -> None:
        """Decode raw embedding rows (e.g. from embed_image) after what the context holds."""
        embd = np.asarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.llm.n_embd:
            raise LlavaGgufError(f"embedding rows must have shape (n, {self.llm.n_embd}), not {embd.shape}")
        self.engine.decode_rows(self.slot, embd)

    @_open
    def eval_tokens(self, tokens: Sequence[int]) -> None:
        self.engine.decode_tokens(self.slot, list(tokens))

    @_open
    def last_logits(self) -> np.ndarray:
        return self.engine.logits(self.slot)

    # ----------------------------------------------------------------- prompting
    @_open
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.prompter.render(messages, add_generation_prompt)

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
        # stats first: a prompt stopped part way (Ctrl-C while an image encodes or the prompt decodes) says
        # so, with the time it really took and what was decoded, instead of the last answer's figures
        self.last = EvalStats(stopped_in="prompt")
        try:
            chunks, segments = self.prompter.prompt(messages, images)
            with chunks:
                report = self.engine.load(self.slot, segments)
            self.last = EvalStats(prompt_tokens=report.positions, reused_tokens=report.reused,
                                  evaluated_tokens=report.to_decode, images=report.images,
                                  images_encoded=report.images_encoded, stopped_in="prompt")
            try:
                self.engine.run(self.slot)
            finally:
                self.last.evaluated_tokens = report.to_decode - self.slot.n_pending
            self.last.stopped_in = None
        finally:
            self.last.prompt_seconds = time.perf_counter() - t0
        return self.engine.held_ids(self.slot)

    @_open
    def count_prompt(self, messages: list[Message], images: Sequence[ImageInput]) -> int:
        """Positions `messages` would take in the context (text tokens + image rows), without decoding."""
        return self.prompter.count(messages, images)

    # ----------------------------------------------------------------- answering
    @_open
    def is_end_of_generation(self, token: int) -> bool:
        return self.llm.is_eog(token)

    @_open
    def stream_from_image(self, image: ImageInput, prompt: str, *, max_tokens: int = Sampling.max_tokens,
                          temperature: float = Sampling.temperature, top_p: float = Sampling.top_p,
                          top_k: int = Sampling.top_k, repeat_penalty: float = Sampling.repeat_penalty,
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
    def stream_messages(self, messages: list[Message], images: Sequence[ImageInput], *,
                        max_tokens: int = Sampling.max_tokens, temperature: float = Sampling.temperature,
                        top_p: float = Sampling.top_p, top_k: int = Sampling.top_k,
                        repeat_penalty: float = Sampling.repeat_penalty, stop: str | Sequence[str] | None = None,
                        seed: int | None = None) -> Iterator[str]:
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
        self.eval_messages(messages, images)
        yield from stream_answer(self.engine, self.slot, settings, self.last, seed=self._seed, t_call=self._t_call,
                                 check_open=self._check_open)

    @_open
    def chat(self, system: str | None = None, *, on_overflow: str = "error") -> ChatSession:
        """A multi-turn conversation; follow-up turns decode only what is new. `on_overflow`: "error" or
        "drop_oldest" (drop the oldest turns when the conversation no longer fits the context)."""
        return ChatSession(self, system, on_overflow=on_overflow)


def _one_of(a, b, name_a: str, name_b: str):
    if a is not None and b is not None:
        raise LlavaGgufError(f"give {name_a} or {name_b}, not both (they name the same file)")
    return a if a is not None else b
