"""One sequence's answer, streamed as text: tokens from the engine until the end of generation, max_tokens,
the context's end or a stop string; timed and counted in the turn's EvalStats."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llava_gguf.native.llama import LLAMA_DEFAULT_SEED
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.sampling import Sampling
from llava_gguf.runtime.slots import Slot
from llava_gguf.runtime.text import AnswerText


@dataclass
class EvalStats:
    """What the last prompt cost: how much of it came from the KV cache and what was computed."""

    prompt_tokens: int = 0  # positions of the whole prompt (text tokens + image rows)
    reused_tokens: int = 0  # taken from the KV cache (a prefix shared with what it held)
    evaluated_tokens: int = 0  # decoded now
    images: int = 0  # images in the prompt
    images_encoded: int = 0  # of those, run through the vision tower now (the rest: embedding cache)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0  # decoding the prompt, image encoding included (until stopped, if it was)
    first_token_seconds: float = 0.0  # from the call to the first answer token
    generate_seconds: float = 0.0  # from the first to the last answer token (0 for one token: no interval)
    answer_tokens: tuple[int, ...] = ()  # the answer's token ids (end-of-generation excluded)
    # where the turn was stopped (Ctrl-C, the stream closed, an error): "prompt" (no answer token yet) or
    # "answer"; None when it ran to its end (end of generation, max_tokens, a stop string, the context's end)
    stopped_in: str | None = None

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.evaluated_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """Answer tokens after the first per second of generate_seconds; 0.0 when there is no interval to
        time (an answer of one token or none)."""
        return (self.generated_tokens - 1) / self.generate_seconds if self.generate_seconds and self.generated_tokens > 1 else 0.0


def stream_answer(engine: Engine, slot: Slot, s: Sampling, stats: EvalStats, *, seed: int | None, t_call: float,
                  check_open: Callable[[], None]) -> Iterator[str]:
    """The answer after the prompt the sequence holds. `seed` is the model's (s.seed overrides it; neither:
    random); `check_open` runs before each token (a stream resumed after close() must not decode)."""
    if s.max_tokens <= 0:
        return
    stats.stopped_in = "answer"  # until it reaches one of its ends
    seed = s.seed if s.seed is not None else seed if seed is not None else LLAMA_DEFAULT_SEED
    engine.generate(slot, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                    repeat_penalty=s.repeat_penalty, seed=seed)
    model = engine.model
    text = AnswerText(s.stop)
    n = 0
    t_first = None
    ids: list[int] = []
    try:
        while True:
            check_open()
            token = engine.next_token(slot)
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                stats.first_token_seconds = now - t_call
            if model.is_eog(token):
                break
            # timed to this answer token, not to the end-of-generation one after it
            stats.generate_seconds = now - t_first
            n += 1
            ids.append(token)
            stats.generated_tokens = n
            # stop after the last wanted token, without asking llama.cpp for one more
            last = n >= s.max_tokens or len(slot.held) >= engine.n_ctx - 1
            for piece in text.add(model.piece(token, special=False)):
                yield piece
            if text.stopped:
                stats.stopped_in = None
                return
            if last:
                break
        stats.stopped_in = None  # every end but a stop string's comes here
        rest = text.flush()
        if rest:
            yield rest
    finally:
        stats.answer_tokens = tuple(ids)
        if not engine.closed:
            engine.finish(slot)  # the last token sampled is not decoded
