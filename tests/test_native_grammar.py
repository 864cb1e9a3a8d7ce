"""Grammar-constrained sampling (native/llama.py's Sampler with a GBNF grammar) on a real tiny model: the
greedy answer of random weights follows the grammar exactly — a word of two, or JSON that parses and has
the schema's keys — where the same model without a grammar says something else; a grammar llama.cpp cannot
parse (or that our limits refuse) is one LlavaGgufError, and the engine goes on serving; a grammar that
allows no token of the vocabulary ends the answer instead of aborting the process."""
from __future__ import annotations

import json

import pytest

from devkit.tiny import sample_image
from llava_gguf import LlavaGgufError
from llava_gguf.native.llama import MAX_GRAMMAR_NESTING, Sampler
from llava_gguf.runtime.engine import Engine
from llava_gguf.serve.grammar import schema_grammar

GREEDY = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=0)
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=7)
PROMPT = "USER: <image>\nIs there a red square in the image? Answer as JSON. ASSISTANT:"
YES_NO = 'root ::= "yes" | "no"'
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count", "shape"],
          "properties": {"colour": {"type": "string", "maxLength": 12},
                         "count": {"type": "integer"},
                         "shape": {"enum": ["square", "circle", "triangle"]}}}
BUDGET = 160  # tokens: the schema's longest answer is far shorter, so the grammar, not the budget, ends it


@pytest.fixture(scope="module")
def engine(tiny, converted):
    e = Engine.open(*converted(tiny(), "f16"), n_seq_max=2, n_ctx=768, n_threads=2)
    yield e
    e.close()


def answer(engine: Engine, grammar: str | None, settings: dict = GREEDY, image_seed: int = 3) -> tuple[str, bool]:
    """The answer's text, and whether it ended with an end-of-generation token (not the budget)."""
    slot = engine.acquire()
    try:
        chunks, segments = engine.tokenize(PROMPT, [sample_image(112, seed=image_seed)])
        with chunks:
            engine.load(slot, segments)
        engine.generate(slot, **settings, grammar=grammar)
        out = b""
        for _ in range(BUDGET):
            token = engine.next_token(slot)
            if engine.model.is_eog(token):
                return out.decode("utf-8", "replace"), True
            out += engine.model.piece(token, special=False)
        return out.decode("utf-8", "replace"), False
    finally:
        engine.finish(slot)
        engine.release(slot)


def json_grammar() -> str:
    """The server's grammar for the schema: llama-cpp-python's converter, with control characters kept out
    of strings (its `char ::= [^"\\]` lets them in, and strict JSON parsers refuse them)."""
    return schema_grammar(SCHEMA)


def test_a_word_grammar_leaves_greedy_one_of_its_words(engine):
    free, _ = answer(engine, None)
    assert free.strip() not in ("yes", "no")  # random weights say something else on their own
    for seed in (3, 4, 5):
        text, ended = answer(engine, YES_NO, image_seed=seed)
        assert ended and text in ("yes", "no"), text


def test_a_json_schema_grammar_gives_json_with_the_schema_keys(engine):
    free, _ = answer(engine, None)
    with pytest.raises(ValueError):
        json.loads(free)
    for settings in (GREEDY, SAMPLED):
        text, ended = answer(engine, json_grammar(), settings)
        assert ended, text
        value = json.loads(text)  # strict: no control character inside a string

        assert set(value) == {"colour", "count", "shape"}
        assert isinstance(value["colour"], str) and len(value["colour"]) <= 12
        assert isinstance(value["count"], int)
        assert value["shape"] in ("square", "circle", "triangle")


def test_the_grammar_does_not_change_what_it_allows_anyway(engine):
    """A grammar that allows any text picks the same greedy tokens as no grammar, up to the first byte
    token that is not UTF-8 on its own (a grammar matches characters, so it refuses a lone byte)."""
    free, _ = answer(engine, None)
    valid = free.split("\ufffd")[0]
    assert len(valid) > 10
    constrained, _ = answer(engine, 'root ::= [^\\x00]*')
    assert constrained.startswith(valid) and "\ufffd" not in constrained


@pytest.mark.parametrize("grammar", [
    'root ::= ("yes" | "no"',             # llama.cpp: expecting ')'
    'root ::= missing',                     # an undefined rule
    'answer ::= "yes"',                     # no root rule
    'root ::= root "a" | "b"',              # left recursion
    'root ::= "unterminated',
    "",                                     # llama.cpp would take "" as no grammar at all
    "   \n",
    "(" * (MAX_GRAMMAR_NESTING + 1),        # deeper than its recursive parser is let go
    'root ::= "\ud800"',                    # not encodable text
])
def test_a_bad_grammar_is_one_error_and_the_engine_goes_on(engine, grammar):
    slot = engine.acquire()
    try:
        chunks, segments = engine.tokenize(PROMPT, [sample_image(112, seed=3)])
        with chunks:
            engine.load(slot, segments)
        with pytest.raises(LlavaGgufError, match="grammar could not be parsed") as e:
            engine.generate(slot, **GREEDY, grammar=grammar)
        assert "\n" not in str(e.value)
        assert slot.sampler is None  # nothing half-built is kept
    finally:
        engine.finish(slot)
        engine.release(slot)
    text, _ = answer(engine, YES_NO)
    assert text in ("yes", "no")


def test_a_grammar_nothing_can_follow_ends_the_answer_instead_of_aborting(engine):
    # every token's text starts with a character >= U+0001 (or a byte of one), and a NUL is never a
    # candidate (llama.cpp): the class allows nothing that can be said
    grammar = 'root ::= [^\\x01-\\UFFFFFFFF] "x"'
    sampler = Sampler(engine.model, **GREEDY, grammar=grammar)
    sampler.close()  # it parses: only sampling finds the dead end
    text, ended = answer(engine, grammar)
    assert ended and text == ""


def test_a_failing_grammar_builds_no_chain_and_close_is_idempotent(engine):
    for _ in range(50):  # the grammar is parsed before the chain is built: a failure leaves nothing to free
        with pytest.raises(LlavaGgufError):
            Sampler(engine.model, **GREEDY, grammar="root ::= nothing")
    s = Sampler(engine.model, **GREEDY, grammar=YES_NO)
    assert s.handle is not None
    s.close()
    s.close()
    assert s.handle is None
