"""libllama, typed: a model and its vocabulary, one context with several sequences over a unified KV cache,
token and embedding batches, the KV memory operations, and the sampler chain. The runtime calls these and
never llama-cpp-python's ctypes functions or its private attributes itself.

Below `llama_cpp.Llama` on purpose: Llama compiles every chat template of the file with jinja2 and reads
every metadata key at load, holds one sequence, and keeps its own copy of the tokens; the engine keeps its
own bookkeeping of what each sequence holds."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_gguf.errors import LlavaGgufError
from llava_gguf.native import library

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: a random seed
PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64): the repeat penalty's window
_backend_ready = False


class DecodeError(RuntimeError):
    """llama_decode failed; said as llama-cpp-python says it ("llama_decode returned N") so the runtime's
    messages stay what they were."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode returned {code}")
        self.code = code


def _lc():
    return library.llama_cpp()


class Model:
    """A loaded LLM (llama_model_load_from_file) and its vocabulary."""

    def __init__(self, path: Path | str, *, n_gpu_layers: int = 0) -> None:
        global _backend_ready
        lc = _lc()
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers  # -1: every layer
        self.path = Path(path)
        self.handle = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.handle:
            self.handle = None
            raise ValueError(f"Failed to load model from file: {self.path}")
        self.vocab = lc.llama_model_get_vocab(self.handle)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(lc.llama_model_n_embd(self.handle))
        self.bos = int(lc.llama_vocab_bos(self.vocab))
        self.eos = int(lc.llama_vocab_eos(self.vocab))
        self._pieces: dict[int, bytes] = {}  # token -> its text with special tokens as written

    def close(self) -> None:
        if self.handle is not None:
            _lc().llama_model_free(self.handle)
            self.handle = None

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, <|im_end|>, ...): the vocabulary's own list."""
        return bool(_lc().llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int, *, special: bool = True) -> bytes:
        """A token's bytes; special tokens as written when `special` (else they are empty, as a stream shows)."""
        if special and token in self._pieces:
            return self._pieces[token]
        out = self._piece(token, special)
        if special:
            self._pieces[token] = out
        return out

    def _piece(self, token: int, special: bool) -> bytes:
        lc = _lc()
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:  # a longer piece: the negative length it needs
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n] if n > 0 else b""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama_tokenize (as Llama.tokenize: `add_bos`, `special` parses special tokens' text)."""
        lc = _lc()
        cap = len(text) + 8
        out = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, text, len(text), out, cap, add_bos, special)
        if n < 0:
            cap = -n
            out = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, text, len(text), out, cap, add_bos, special)
            if n < 0:
                raise RuntimeError(f'Failed to tokenize: text="{text!r}" n_tokens={n}')
        return list(out[:n])


class Context:
    """One llama_context: `n_seq_max` sequences, each with a KV cache of its own (n_ctx / n_seq_max cells;
    kv_unified=false). A decode then attends over the sequence's own cells only: with one cache for all
    (kv_unified), every token's attention spans the cells every sequence holds, masked — at LLaVA-1.5-7B
    geometry, one answer ran 24% slower while three other conversations kept their ~650 cells (bench/serve.py).
    A prefix is still copied between sequences (seq_cp): llama.cpp copies whole caches between split
    sequences, so the donor's cache is copied and trimmed (a memcpy of the cache, far cheaper than decoding
    even a few positions). The others are the ones llama-cpp-python's Llama used, so answers stay what they
    were: n_batch = n_ubatch = min(n_ctx, 512), no flash attention."""

    def __init__(self, model: Model, *, n_ctx: int, n_threads: int, n_seq_max: int = 1, n_batch: int = 512) -> None:
        lc = _lc()
        params = lc.llama_context_default_params()
        self.n_batch = min(n_ctx, n_batch)
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = n_seq_max == 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = False  # llama.cpp's own counters, as Llama(no_perf=False) kept them (bench/chat.py)
        self.model = model
        self.handle = lc.llama_init_from_model(model.handle, params)
        if not self.handle:
            self.handle = None
            raise ValueError("Failed to create llama_context")
        self.memory = lc.llama_get_memory(self.handle)
        self.n_ctx = int(lc.llama_n_ctx(self.handle))
        self.n_seq_max = n_seq_max
        self.n_threads = n_threads

    def close(self) -> None:
        if self.handle is not None:
            _lc().llama_free(self.handle)
            self.handle = None

    def decode(self, batch: Batch) -> None:
        rc = _lc().llama_decode(self.handle, batch.handle)
        if rc != 0:
            raise DecodeError(rc)

    def logits(self, row: int) -> np.ndarray:
        """A copy of the logits of batch row `row` of the last decode (-1: its last output)."""
        ptr = _lc().llama_get_logits_ith(self.handle, row)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # ------------------------------------------------------------------ the KV cache
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Forget positions [p0, p1) of `seq` (p1 < 0: to the end)."""
        return bool(_lc().llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """`dst` (holding nothing) holds positions [p0, p1) of `src` (p1 < 0: to the end), nothing computed.
        Between split caches llama.cpp copies only whole caches ("seq_cp() is only supported for full KV
        buffers"): the whole of src's cache is copied (at the next decode, before it writes anything), then
        what lies outside [p0, p1) forgotten."""
        lc = _lc()
        if src == dst:  # also every call on a one-sequence context
            return
        lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        if p1 >= 0:
            lc.llama_memory_seq_rm(self.memory, dst, p1, -1)
        if p0 > 0:
            lc.llama_memory_seq_rm(self.memory, dst, 0, p0)

    def seq_pos_max(self, seq: int) -> int:
        """The last position `seq` holds (-1: none)."""
        return int(_lc().llama_memory_seq_pos_max(self.memory, seq))

    def clear(self) -> None:
        _lc().llama_memory_clear(self.memory, True)

    # ------------------------------------------------------------------ llama.cpp's own counters
    def perf(self) -> Perf:
        return _perf(self.handle)

    def perf_reset(self) -> None:
        _lc().llama_perf_context_reset(self.handle)


class Batch:
    """One llama_batch: of tokens (`width` 0) or of embedding rows `width` wide, for `capacity` rows."""

    def __init__(self, capacity: int, width: int = 0, n_seq_max: int = 1) -> None:
        self.capacity, self.width = capacity, width
        self.handle = _lc().llama_batch_init(capacity, width, n_seq_max)
        self.handle.n_tokens = 0

    def close(self) -> None:
        if self.handle is not None:
            _lc().llama_batch_free(self.handle)
            self.handle = None

    def __len__(self) -> int:
        return int(self.handle.n_tokens)

    def clear(self) -> None:
        self.handle.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Add one token at `pos` of `seq`; returns its row."""
        b, i = self.handle, self.handle.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def set_rows(self, rows: np.ndarray, pos: int, seq: int, logits_last: bool) -> None:
        """Embedding rows (n, width) at positions pos.. of `seq`."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        b = self.handle
        ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        for j in range(len(rows)):
            b.pos[j] = pos + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = logits_last and j == len(rows) - 1
        b.n_tokens = len(rows)


class Sampler:
    """The sampler chain llama-cpp-python 0.3.36's Llama.generate builds (Llama._init_sampler) for these
    settings: the repeat penalty over the last 64 tokens this chain accepted (the answer's own), then the
    grammar when one is given, then greedy at temperature 0, else top-k, typical (p=1: a no-op, kept for the
    same chain), top-p, min-p, temperature and the seeded draw. A given seed gives the answers it gave before.

    The grammar (GBNF, root rule `root`) sits where _init_sampler puts it: after the penalties, before the
    pick, so greedy and top-k only ever see tokens it allows (it sets the others to -inf; the penalties only
    scale and shift logits, so -inf stays -inf and the order of the two does not change the pick — llama.cpp's
    common_sampler applies the grammar first on its resampling path, with the same result). When the grammar
    allows no token of the vocabulary, llama.cpp would accept the -inf pick and throw through the C API (the
    process aborts): `sample` checks the pick first and ends the answer with EOS instead (`dead_end` is set)."""

    def __init__(self, model: Model, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 repeat_penalty: float, seed: int, grammar: str | None = None) -> None:
        lc = _lc()
        self.handle = None
        self.model, self.grammar, self.dead_end = model, grammar, False
        rule = _grammar_sampler(model, grammar) if grammar is not None else None  # may raise: nothing built yet
        self.handle = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        parts = [lc.llama_sampler_init_penalties(model.n_vocab, PENALTY_LAST_N, repeat_penalty, 0.0, 0.0)]
        if rule is not None:
            parts.append(rule)
        if temperature == 0.0:
            parts.append(lc.llama_sampler_init_greedy())
        else:
            parts += [lc.llama_sampler_init_top_k(top_k), lc.llama_sampler_init_typical(1.0, 1),
                      lc.llama_sampler_init_top_p(top_p, 1), lc.llama_sampler_init_min_p(min_p, 1),
                      lc.llama_sampler_init_temp(temperature), lc.llama_sampler_init_dist(seed)]
        for part in parts:
            lc.llama_sampler_chain_add(self.handle, part)  # the chain owns (and frees) its parts
        self._candidates: np.ndarray | None = None

    def sample(self, ctx: Context, row: int) -> int:
        """The next token from the logits of batch row `row` (accepted into the chain's history)."""
        if self.grammar is None:
            return int(_lc().llama_sampler_sample(self.handle, ctx.handle, row))
        return self._sample_checked(ctx, row)

    def _sample_checked(self, ctx: Context, row: int) -> int:
        """llama_sampler_sample's own steps (candidates from the logits, apply the chain, accept the pick),
        with a look at the pick before it is accepted (see the class docstring)."""
        lc, n = _lc(), self.model.n_vocab
        if self._candidates is None:
            self._candidates = np.zeros(n, dtype=_TOKEN_DATA)
            self._candidates["id"] = np.arange(n, dtype=np.int32)
        cur = self._candidates
        cur["logit"] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.handle, row), shape=(n,))
        cur["p"] = 0.0
        array = lc.llama_token_data_array(cur.ctypes.data_as(lc.llama_token_data_p), n, -1, False)
        lc.llama_sampler_apply(self.handle, ctypes.byref(array))
        if not 0 <= array.selected < array.size:  # pragma: no cover - llama.cpp asserts the same
            raise RuntimeError("the sampler chain selected no token")
        picked = array.data[array.selected]
        if np.isneginf(picked.logit):  # the grammar allows nothing the vocabulary can say
            self.dead_end = True
            return self.model.eos
        lc.llama_sampler_accept(self.handle, picked.id)
        return int(picked.id)

    def close(self) -> None:
        if self.handle is not None:
            _lc().llama_sampler_free(self.handle)
            self.handle = None


# llama_token_data: {int32 id; float logit; float p}, as an array llama_sampler_apply can work on in place
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_NESTING = 256  # llama.cpp's GBNF parser recurses per group: a deeper one could overflow the stack


def _grammar_sampler(model: Model, grammar: str):
    """llama_sampler_init_grammar(vocab, grammar, "root"), or a LlavaGgufError when llama.cpp (or our size
    and nesting limits, which keep its recursive parser on the stack) refuse it."""
    try:
        data = grammar.encode() if isinstance(grammar, str) else b""
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800")
        data = b""
    # an empty string is "no grammar" to llama.cpp (a sampler that allows everything): not what was asked
    if not data.strip() or b"\0" in data:
        raise LlavaGgufError("the grammar could not be parsed: it is empty, not a string or not valid text",
                             "give a GBNF grammar with a `root` rule")
    if len(data) > MAX_GRAMMAR_BYTES or _nesting(grammar) > MAX_GRAMMAR_NESTING:
        raise LlavaGgufError(f"the grammar could not be parsed: over {MAX_GRAMMAR_BYTES} bytes or nested deeper "
                             f"than {MAX_GRAMMAR_NESTING} groups", "give a smaller grammar")
    rule = _lc().llama_sampler_init_grammar(model.vocab, data, b"root")
    if not rule:  # NULL: llama.cpp printed why on stderr; nothing was built
        raise LlavaGgufError("the grammar could not be parsed by llama.cpp (GBNF with a `root` rule, no left "
                             "recursion)", "llama.cpp prints the reason on stderr")
    return rule


def _nesting(grammar: str) -> int:
    """The deepest ( ... ) nesting of a GBNF text, outside "literals", [classes] and # comments."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


@dataclass(frozen=True)
class Perf:
    """llama_perf_context: prompt (batch) and single-token evaluations since the last reset."""

    n_p_eval: int
    t_p_eval_ms: float
    n_eval: int
    t_eval_ms: float
    t_load_ms: float = 0.0  # the model's load, as llama.cpp counts it (what llama-mtmd-cli prints as load time)

    @property
    def eval_tokens_per_second(self) -> float:
        return self.n_eval / (self.t_eval_ms / 1000) if self.t_eval_ms else 0.0


def _perf(ctx_handle) -> Perf:
    d = _lc().llama_perf_context(ctx_handle)
    return Perf(int(d.n_p_eval), float(d.t_p_eval_ms), int(d.n_eval), float(d.t_eval_ms), float(d.t_load_ms))


def stock_perf(llm, reset: bool = False) -> Perf:
    """The same counters for llama-cpp-python's own `llama_cpp.Llama` (the benchmarks' stock contender),
    read through its private context: the one place that reaches into it."""
    if reset:
        _lc().llama_perf_context_reset(llm._ctx.ctx)
    return _perf(llm._ctx.ctx)
