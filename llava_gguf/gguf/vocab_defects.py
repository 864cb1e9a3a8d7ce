"""What llama-vocab.cpp's load() aborts on in the token list, and a chat template that cannot render a
prompt (our chat refuses it; llama.cpp's --jinja route fails). The token list is checked over the
header's raw bytes with numpy: no Python object per token (a 32000-token vocabulary in milliseconds)."""
from __future__ import annotations

import numpy as np

from llava_gguf.gguf.chat_template import template_problem
from llava_gguf.gguf.header import GGUFHeader
from llava_gguf.gguf.layout import ARRAY, STRING, Defect, some_names

TOKENS_KEY = "tokenizer.ggml.tokens"
# A polynomial hash of each token's bytes, mod 2^64 (numpy's uint64 wraps), computed for all tokens at once
# one byte position at a time: equal texts hash equal, and tokens whose (length, hash) agree are then
# compared byte for byte, so a collision costs time, never a wrong answer.
_P = np.uint64(0x100000001B3)  # FNV-1's 64-bit prime
_MASK = (1 << 64) - 1
_LONG = 256  # longer tokens (no real vocabulary has many) are hashed one by one, with Python's hash


def text_hash(text: bytes) -> int:
    """The hash `token_hashes` gives a token of these bytes (for texts not in the file: "[EMPTY_<id>]")."""
    h = 0
    for b in text:
        h = (h * int(_P) + b + 1) & _MASK
    return h


def token_hashes(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`text_hash` of each raw[start:start + length]: one numpy step per byte position over the tokens
    that long (a 32000-token vocabulary: a few dozen steps), longer ones than _LONG one by one."""
    out = np.zeros(len(starts), np.uint64)
    for i in np.flatnonzero(lengths > _LONG).tolist():  # same length, same function: never compared across
        out[i] = hash(raw[starts[i]:starts[i] + lengths[i]].tobytes()) & _MASK
    short = np.flatnonzero(lengths <= _LONG)
    if not len(short):
        return out
    by_length = short[np.argsort(-lengths[short], kind="stable")]  # longest first: step k runs over a prefix
    pos, n = starts[by_length].copy(), lengths[by_length]
    ascending = n[::-1]
    h = np.zeros(len(by_length), np.uint64)
    one = np.uint64(1)
    for k in range(int(n[0]) if len(n) else 0):
        m = len(n) - int(np.searchsorted(ascending, k, side="right"))  # tokens longer than k
        h[:m] = h[:m] * _P + raw[pos[:m] + k].astype(np.uint64) + one
    out[by_length] = h
    return out


def duplicate_tokens(header: GGUFHeader) -> list[tuple[int, int, bytes]]:
    """(first id, id, text) for every token whose text an earlier token has, by id, comparing texts as
    llama-vocab.cpp's load() sees them: as C strings (up to the first NUL), an empty one named
    "[EMPTY_<id>]"."""
    starts, lengths = header.string_spans(TOKENS_KEY)
    if len(starts) < 2:
        return []
    raw = np.frombuffer(header.raw, np.uint8)
    lo, hi = int(starts[0]), int(starts[-1] + lengths[-1])
    nuls = np.flatnonzero(raw[lo:hi] == 0) + lo  # the length fields' zero bytes too: only those inside a text count
    cut = lengths.copy()
    if len(nuls):
        k = np.searchsorted(nuls, starts)
        first = nuls[np.minimum(k, len(nuls) - 1)]
        inside = (k < len(nuls)) & (first < starts + lengths)
        cut[inside] = first[inside] - starts[inside]
    hashes = token_hashes(raw, starts, cut)
    empty = np.flatnonzero(cut == 0).tolist()
    for i in empty:
        name = b"[EMPTY_%d]" % i
        cut[i], hashes[i] = len(name), text_hash(name)
    empty_set = set(empty)

    def text(i: int) -> bytes:
        return b"[EMPTY_%d]" % i if i in empty_set else header.raw[starts[i]:starts[i] + cut[i]]

    order = np.lexsort((hashes, cut))
    same = (cut[order][1:] == cut[order][:-1]) & (hashes[order][1:] == hashes[order][:-1])
    if not same.any():
        return []
    candidates = set(order[1:][same].tolist()) | set(order[:-1][same].tolist())
    first_id: dict[bytes, int] = {}
    found = []
    for i in sorted(candidates):  # byte for byte: a hash collision is not a duplicate
        t = text(i)
        f = first_id.setdefault(t, i)
        if f != i:
            found.append((f, i, t))
    return found


def vocab_defects(header: GGUFHeader) -> list[Defect]:
    """What llama-vocab.cpp's load() aborts on in the token list (its other refusals are key-type and
    hparam-invalid defects, llm_defects.py)."""
    entry = header.entry(TOKENS_KEY)
    if entry is None or (entry.type, entry.sub) != (ARRAY, STRING):
        return []
    # load() maps each token's text to its id and then asserts GGML_ASSERT(id_to_token.size() ==
    # token_to_id.size()): two equal texts abort the process.
    dups = [f"{t[:40].decode('utf-8', 'replace')!r} (ids {f} and {i})" for f, i, t in duplicate_tokens(header)]
    if not dups:
        return []
    return [Defect("vocab-duplicate-token", f"tokenizer.ggml.tokens holds the same token text more than once: "
                   f"{some_names(dups)}; llama.cpp aborts loading the vocabulary (GGML_ASSERT id_to_token.size() "
                   "== token_to_id.size())", False)]


def chat_template_defects(header: GGUFHeader) -> list[Defect]:
    """inspect's defect for an LLM GGUF whose tokenizer.chat_template cannot render a prompt."""
    template = header.raw_string("tokenizer.chat_template")  # None: absent, or not a STRING (key-type's concern)
    if template is None:
        return []
    problem = template_problem(template)
    if problem is None:
        return []
    return [Defect("chat-template-invalid", f"tokenizer.chat_template cannot render a prompt: {problem}; llava-gguf's "
                   "chat refuses the model (the family's default template may not be the model's prompt format), "
                   "and llama.cpp's Jinja route (--jinja) fails", False)]
