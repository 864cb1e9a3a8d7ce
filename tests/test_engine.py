"""The engine (runtime/engine.py) on a tiny model: several sequences in one llama context, stepped together
in one llama_decode per step, each answering as it would alone; a prefix one sequence holds is copied
into another (llama_memory_seq_cp), not decoded again; a released sequence is free; LLaVA, a client of
one sequence, works beside the others."""
from __future__ import annotations

import pytest

from devkit.tiny import sample_image
from llava_gguf import LLaVA, LlavaGgufError
from llava_gguf.runtime.engine import Engine

GREEDY = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=0)
N = 8
PROMPTS = ["USER: <image>\nWhat is in the image? ASSISTANT:",
           "USER: <image>\nDescribe the colours. ASSISTANT:",
           "USER: Hello there, how are you today? ASSISTANT:"]


@pytest.fixture(scope="module")
def pair(tiny, converted):
    return converted(tiny(), "f16")


@pytest.fixture(scope="module")
def engine(pair):
    e = Engine.open(*pair, n_seq_max=3, n_ctx=512, n_threads=2)
    yield e
    e.close()


def _images(i: int) -> list:
    return [sample_image(112, seed=10 + i)] if "<image>" in PROMPTS[i] else []


def _load(engine: Engine, slot, i: int, extra: str = ""):
    chunks, segments = engine.tokenize(PROMPTS[i] + extra, _images(i))
    with chunks:
        return engine.load(slot, segments)


def _alone(engine: Engine, i: int, extra: str = "") -> list[int]:
    slot = engine.acquire()
    try:
        _load(engine, slot, i, extra)
        engine.generate(slot, **GREEDY)
        return [engine.next_token(slot) for _ in range(N)]
    finally:
        engine.release(slot)


def test_sequences_stepped_together_answer_as_alone(engine):
    alone = [_alone(engine, i) for i in range(3)]
    slots = [engine.acquire() for _ in range(3)]
    try:
        for i, slot in enumerate(slots):
            _load(engine, slot, i)
            engine.generate(slot, **GREEDY)
        got: list[list[int]] = [[], [], []]
        shared = 0
        while any(len(g) < N for g in got):
            result = engine.step()
            shared = max(shared, len(result.batch))
            for i, slot in enumerate(slots):
                token = engine.take(slot) if len(got[i]) < N else None
                if token is not None:
                    got[i].append(token)
                    if len(got[i]) == N:
                        engine.finish(slot)
        assert shared == 3  # a step decoded work of all three sequences in one llama_decode
        assert got == alone
    finally:
        for slot in slots:
            engine.release(slot)


def test_one_batch_mixes_a_prompt_chunk_and_a_generated_token(engine):
    a, b = engine.acquire(), engine.acquire()
    try:
        _load(engine, a, 0)
        engine.generate(a, **GREEDY)
        engine.next_token(a)  # a generates ...
        report = _load(engine, b, 2)  # ... when b's text prompt arrives
        calls = engine.stats.decode_calls
        result = engine.step()
        assert engine.stats.decode_calls == calls + 1
        assert set(result.batch) == {a.seq, b.seq} and result.prompts_done == (b.seq,)
        assert result.decoded == report.to_decode + 1
        assert result.token_for(a.seq) is not None and not b.generating
    finally:
        engine.release(a)
        engine.release(b)


def test_a_held_prefix_is_copied_not_decoded(engine):
    fresh = _alone(engine, 0, " Yes. USER: And then? ASSISTANT:")
    a, b = engine.acquire(), engine.acquire()
    try:
        first = _load(engine, a, 0)
        engine.run(a)
        before = engine.stats.decoded, engine.stats.copied
        report = _load(engine, b, 0, " Yes. USER: And then? ASSISTANT:")
        assert report.copied_from == a.seq and report.copied == first.positions and report.images_encoded == 0
        engine.generate(b, **GREEDY)
        got = [engine.next_token(b) for _ in range(N)]
        assert engine.stats.copied - before[1] == first.positions
        # only the new text was decoded, then the N - 1 tokens fed back
        assert engine.stats.decoded - before[0] == report.to_decode + N - 1
        assert report.to_decode == report.positions - first.positions
        assert got == fresh
    finally:
        engine.release(a)
        engine.release(b)


def test_a_copied_prefix_is_trimmed_to_what_is_shared(engine):
    """Each sequence has a KV cache of its own, and llama.cpp copies only whole caches between them: the
    donor's cache is copied, then trimmed to the shared prefix; the donor keeps all of its own."""
    fresh = _alone(engine, 0, " No. USER: Why not? ASSISTANT:")
    a, b = engine.acquire(), engine.acquire()
    try:
        _load(engine, a, 0, " Yes. USER: And then? ASSISTANT:")
        engine.run(a)
        report = _load(engine, b, 0, " No. USER: Why not? ASSISTANT:")
        assert report.copied_from == a.seq and 0 < report.copied < len(a.held)
        engine.generate(b, **GREEDY)
        got = [engine.next_token(b) for _ in range(N)]
        assert got == fresh
        ctx = engine.ctx
        assert ctx.seq_pos_max(b.seq) == len(b.held) - 1 and ctx.seq_pos_max(a.seq) == len(a.held) - 1
    finally:
        engine.release(a)
        engine.release(b)


def test_a_prompt_decoded_before_another_still_answers(engine):
    """Its logits are gone from the context by then: its last position is decoded again."""
    want = _alone(engine, 2)
    a, b = engine.acquire(), engine.acquire()
    try:
        _load(engine, a, 2)
        engine.run(a)
        _load(engine, b, 0)
        engine.run(b)
        engine.generate(a, **GREEDY)
        assert [engine.next_token(a) for _ in range(N)] == want
    finally:
        engine.release(a)
        engine.release(b)


def test_release_frees_the_sequence(engine):
    slots = [engine.acquire() for _ in range(3)]
    _load(engine, slots[1], 2)
    engine.run(slots[1])
    assert engine.ctx.seq_pos_max(slots[1].seq) == len(slots[1].held) - 1 > 0
    with pytest.raises(LlavaGgufError, match="all 3 sequences of the engine are in use"):
        engine.acquire()
    engine.release(slots[1])
    assert engine.ctx.seq_pos_max(slots[1].seq) == -1 and slots[1].held == [] and not slots[1].in_use
    again = engine.acquire()
    assert again is slots[1]
    for slot in slots:
        engine.release(slot)


def test_llava_on_a_shared_engine(engine, pair):
    img = sample_image(112, seed=3)
    with LLaVA(*pair, n_threads=2) as own:
        want = own.generate_from_image(img, "What is in the image?", temperature=0, max_tokens=6)
        assert own.engine.n_ctx == own.n_ctx and len(own.engine.slots) == 1
    other = engine.acquire()
    try:
        _load(engine, other, 1)
        engine.run(other)
        m = LLaVA.attach(engine)
        assert m.generate_from_image(img, "What is in the image?", temperature=0, max_tokens=6) == want
        m.close()
        assert m.closed and not engine.closed and not m.slot.in_use and other.held
    finally:
        engine.release(other)


def test_the_bookkeeping_matches_the_kv_cache(pair):
    """What the engine says a sequence holds is what llama.cpp's cache holds, after answers that end on
    max_tokens (their last token is never decoded), a stream left open, and a follow-up turn."""
    img = sample_image(112, seed=4)
    with LLaVA(*pair, n_threads=2) as m:
        seq, ctx = m.slot.seq, m.engine.ctx

        def consistent() -> None:
            assert ctx.seq_pos_max(seq) == len(m.slot.held) - 1

        want = m.generate_from_image(img, "Hi?", temperature=0, max_tokens=5)
        consistent()
        n = m.last.generated_tokens  # on max_tokens the last token is not decoded; after an end-of-generation all are
        assert len(m.slot.held) == m.last.prompt_tokens + (n - 1 if n == 5 else n)
        stream = m.stream_from_image(img, "Hi?", temperature=0, max_tokens=5)
        next(stream)  # left open: the next prompt ends it
        assert m.generate_from_image(img, "Hi?", temperature=0, max_tokens=5) == want
        consistent()
        s = m.chat()
        s.ask("What is it?", [img], temperature=0, max_tokens=4)
        s.ask("And then?", temperature=0, max_tokens=4)
        consistent()
        assert m.last.images_encoded == 0 and m.last.reused_tokens > m.last.evaluated_tokens
        m.eval_tokens([1, 2, 3])
        consistent()
        m.reset()
        assert ctx.seq_pos_max(seq) == -1 and m.slot.held == []
