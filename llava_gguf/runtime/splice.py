"""Putting an answer's own token ids back into the next prompt. A follow-up turn renders the whole
conversation again, and the answer's text may tokenize differently from the ids the model generated
(SentencePiece merges, a trimmed leading space): the KV cache holds the generated ids, so the rendered
prompt is made to match them, position for position, and the follow-up decodes only what is new.
Pure: tokens are turned into bytes by the `piece` function given."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER, Message
from llava_gguf.runtime.segments import Segment, TextSegment

Piece = Callable[[int], bytes]
# an answer cut short (stop string, stripped trailing space, an unfinished UTF-8 character) still has all but
# its last few tokens in the rendered text
SPLICE_TAIL = 8
Answer = tuple[list[int], bytes, bytes]  # (ids, sep, anchor), see answers()


def answers(messages: list[Message], render: Callable[..., str], marker: str) -> list[Answer]:
    """Each assistant message with token ids: (ids, sep, anchor). `sep` is what the template puts between
    the generation prompt and the answer (" " after Vicuna's "ASSISTANT:", nothing after a prompt ending in
    a newline): the ids were generated right after the generation prompt, so they replace both. `anchor`
    is the generation prompt's last word: the answer is looked for only right after it. `render(messages,
    add_generation_prompt=...)` is the model's rendering."""
    out = []
    for i, m in enumerate(messages):
        if m.role != "assistant" or not m.tokens:
            continue
        try:
            head = render(messages[:i])
            whole = render(messages[: i + 1], add_generation_prompt=False)
        except LlavaGgufError:
            continue
        text = m.text.replace(marker, "").replace(IMAGE_PLACEHOLDER, "< image>")
        at = whole.find(text, len(head)) if text and whole.startswith(head) else -1
        gap = whole[len(head):at] if at >= 0 else ""
        anchor = head.rstrip().split()[-1][-8:] if head.strip() else ""
        if at < 0 or (gap and not gap.isspace()) or not anchor:
            continue  # the template does not put the answer right after the generation prompt
        out.append((list(m.tokens), gap.encode(), anchor.encode()))
    return out


def splice_answers(segments: list[Segment], found: list[Answer], piece: Piece, n_vocab: int) -> list[Segment]:
    """`segments` with each answer's ids in place of the tokens its text became, in order (an answer is
    looked for after the previous one)."""
    if not found:
        return segments
    out = list(segments)
    si, cursor = 0, 0
    for ids, sep, anchor in found:
        if not all(0 <= t < n_vocab for t in ids):
            continue
        for sj in range(si, len(out)):
            seg = out[sj]
            if not isinstance(seg, TextSegment):
                continue
            hit = splice(list(seg.tokens), cursor if sj == si else 0, ids, sep, anchor, piece)
            if hit is not None:
                out[sj] = replace(seg, tokens=tuple(hit[0]))
                si, cursor = sj, hit[1]
                break
    return out


def splice(toks: list[int], start: int, ids: list[int], sep: bytes, anchor: bytes,
           piece: Piece) -> tuple[list[int], int] | None:
    """(tokens with `ids` spliced in, the index after them), or None when the answer is not found after
    `start`. A run of tokens right after the generation prompt is replaced only by ids with the same text
    (up to the whitespace between the generation prompt and the answer, which then is what the model
    generated after it)."""
    pieces = [piece(t) for t in toks[start:]]
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
    gen = [piece(t) for t in ids]
    a = text.find(anchor)
    while a != -1:
        g = a + len(anchor)  # where the generation prompt ends
        for k in range(len(ids), max(0, len(ids) - SPLICE_TAIL - 1), -1):
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
