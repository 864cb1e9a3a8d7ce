"""The engine's per-sequence state and what it reports, as data (llama-server's `server_slot`): what a
sequence's KV cache holds, position by position; the prompt work not decoded yet; its sampler while it
generates; and the results of a load and of a step."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llava_gguf.native.llama import Sampler
from llava_gguf.runtime.kvcache import Position


@dataclass
class TextWork:
    """Prompt tokens still to decode."""

    tokens: list[int]


@dataclass
class ImageWork:
    """An image's embedding rows still to decode; `tag` names its positions ((tag, k) in the bookkeeping)."""

    tag: str
    rows: np.ndarray
    done: int = 0  # rows decoded so far


@dataclass(eq=False)  # a sequence is itself, not equal to another in the same state
class Slot:
    """One sequence of the engine. The engine changes it; callers read it.

    held: what the KV cache holds for this sequence, position by position: token ids, and (image hash, row)
    for image rows. pending: prompt work, in order, decoded by the next steps. sampler: set while the
    sequence generates; next_token: the token sampled last, decoded by the next step unless the caller
    stops (finish) first, so a finished answer's last token is never decoded for nothing."""

    seq: int
    in_use: bool = False
    held: list[Position] = field(default_factory=list)
    pending: deque[TextWork | ImageWork] = field(default_factory=deque)
    sampler: Sampler | None = None
    next_token: int | None = None
    taken: bool = False  # the owner has taken next_token: the next step decodes it and samples another
    want_sample: bool = False  # generating, and the next token is not sampled yet
    generated: int = 0  # tokens sampled since generate()
    logits: np.ndarray | None = None  # of the last position decoded with logits
    logits_row: int = -1  # that position's row in the decode `logits_serial` of the engine
    logits_serial: int = -1
    used: int = 0  # when the sequence was last acquired (the engine's count): the least recent is reused first

    @property
    def generating(self) -> bool:
        return self.sampler is not None

    def future(self) -> list[Position]:
        """What the sequence will hold once its pending prompt work is decoded."""
        out = list(self.held)
        for w in self.pending:
            out += w.tokens if isinstance(w, TextWork) else [(w.tag, k) for k in range(w.done, len(w.rows))]
        return out

    @property
    def n_pending(self) -> int:
        """Positions of prompt work not decoded yet."""
        return sum(len(w.tokens) if isinstance(w, TextWork) else len(w.rows) - w.done for w in self.pending)


@dataclass(frozen=True)
class LoadReport:
    """What making a sequence hold a prompt cost: positions of the prompt, kept from its own cache, copied
    from another sequence's (seq_cp, nothing computed), left to decode; images and how many were encoded
    now (the rest came from the embedding cache)."""

    positions: int
    reused: int
    copied: int
    copied_from: int | None
    to_decode: int
    images: int
    images_encoded: int


@dataclass(frozen=True)
class Sampled:
    """A token sampled for a sequence in a step; end_of_generation: the vocabulary's EOS/EOT."""

    seq: int
    token: int
    end_of_generation: bool


@dataclass(frozen=True)
class StepResult:
    """One step: the sequences whose work shared its llama_decode (prompt chunks and generated tokens),
    positions decoded (images included), the sequences whose prompt is now fully decoded, and the tokens
    sampled."""

    batch: tuple[int, ...]
    decoded: int
    prompts_done: tuple[int, ...]
    sampled: tuple[Sampled, ...]

    def token_for(self, seq: int) -> Sampled | None:
        return next((s for s in self.sampled if s.seq == seq), None)


@dataclass
class EngineStats:
    """Counters since the engine started: positions decoded, kept from a sequence's own cache, copied
    between sequences, llama_decode calls, images encoded."""

    decoded: int = 0
    reused: int = 0
    copied: int = 0
    decode_calls: int = 0
    images_encoded: int = 0
