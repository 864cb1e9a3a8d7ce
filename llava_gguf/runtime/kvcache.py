"""What a sequence's KV cache holds, position by position, and how much of a wanted prompt it can keep.
Pure functions over positions: a text position is its token id, an image position is (image hash, row).

The rules: keep the longest common prefix of what is held and what is wanted; always decode the last
wanted position again (its logits are needed to sample); never start decoding inside an image (an image's
rows are decoded together, after a prefix that ends before or after the whole image)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

Position = Union[int, tuple[str, int]]


def common_prefix(held: Sequence[Position], want: Sequence[Position]) -> int:
    """How many leading positions are the same."""
    n = 0
    for a, b in zip(held, want):
        if a != b:
            break
        n += 1
    return n


def image_spans(want: Sequence[Position]) -> list[tuple[int, int]]:
    """(start, length) of each run of one image's rows in `want`."""
    spans: list[tuple[int, int]] = []
    for i, x in enumerate(want):
        if not isinstance(x, tuple):
            continue
        if x[1] > 0 and i and want[i - 1] == (x[0], x[1] - 1):
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans


def clamp_prefix(p: int, want: Sequence[Position]) -> int:
    """A shared prefix of length `p` made usable: at most all but the last wanted position, and moved back
    to the start of an image it would end inside."""
    p = max(0, min(p, len(want) - 1))
    for start, n in image_spans(want):
        if start < p < start + n:
            return start
    return p


def reusable_prefix(held: Sequence[Position], want: Sequence[Position]) -> int:
    """How many positions of `want` a sequence holding `held` keeps (the rest is decoded)."""
    return clamp_prefix(common_prefix(held, want), want)


def best_donor(want: Sequence[Position], others: Mapping[int, Sequence[Position]]) -> tuple[int | None, int]:
    """The other sequence whose cache holds the longest usable prefix of `want`: (its id, the prefix), or
    (None, 0). The lowest id wins a tie, so the choice does not depend on dict order."""
    best: tuple[int | None, int] = (None, 0)
    for seq in sorted(others):
        p = reusable_prefix(others[seq], want)
        if p > best[1]:
            best = (seq, p)
    return best


def pick_free(free: Mapping[int, tuple[Sequence[Position], int]], want: Sequence[Position]) -> int:
    """Which free sequence a prompt should take (the longest prefix any sequence holds is copied in anyway,
    see best_donor): one whose whole cache the prompt continues (a follow-up turn), the longest such; else an
    empty one; else the least recently used. So a conversation's cells are not overwritten by another
    prompt that merely shares their start. `free`: seq -> (what it holds, when it was last used)."""
    def key(seq: int) -> tuple[bool, int, bool, int, int]:
        held, used = free[seq]
        keep = reusable_prefix(held, want) if held and want else 0
        continues = bool(held) and keep >= len(held) - 1  # the last position is decoded again anyway
        return (continues, keep if continues else 0, not held, -used, -seq)
    return max(free, key=key)
