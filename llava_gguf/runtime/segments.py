"""A prompt as the engine decodes it: text segments (token ids) and image segments (an image's content
hash and how many positions its embedding rows take), in order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from llava_gguf.runtime.kvcache import Position


@dataclass(frozen=True)
class TextSegment:
    tokens: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ImageSegment:
    """`chunk`: libmtmd's image chunk (valid while the prompt's chunks are), encoded when the rows are not
    cached; `image`: the picture itself where the rows are computed from it (anyres)."""

    digest: str
    n: int
    chunk: Any = None
    image: Any = None


Segment = Union[TextSegment, ImageSegment]


def positions(segments: list[Segment]) -> list[Position]:
    """What a KV cache holding the prompt holds, position by position."""
    out: list[Position] = []
    for seg in segments:
        out += list(seg.tokens) if isinstance(seg, TextSegment) else [(seg.digest, k) for k in range(seg.n)]
    return out


def tail(segments: list[Segment], p: int) -> list[Segment]:
    """What is left to decode of the prompt when a cache keeps its first `p` positions: text cut at p, an
    image whole (p never falls inside one, see kvcache.py)."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        if pos + seg.n > p:
            out.append(TextSegment(seg.tokens[max(0, p - pos):]) if isinstance(seg, TextSegment) else seg)
        pos += seg.n
    return out
