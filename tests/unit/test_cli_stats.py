"""cli/render.py's `timings` (the REPL's /stats and `chat --verbose`), from constructed EvalStats: how each
way an answer ends is said — answered, one token, no token, stopped in the answer, stopped before its
first token, stopped while the prompt was decoded or prepared (no model, no file)."""
from __future__ import annotations

import pytest

from llava_gguf.cli import render
from llava_gguf.runtime.generate import EvalStats

PROMPT = dict(prompt_tokens=120, reused_tokens=25, evaluated_tokens=95, images_encoded=1, prompt_seconds=0.5)
PROMPT_TEXT = "prompt: 120 tokens (25 from the cache, 95 decoded, 1 image(s) encoded) in 0.50 s, 190.0 tok/s"


def test_an_answer_of_several_tokens_has_a_rate():
    st = EvalStats(**PROMPT, generated_tokens=5, first_token_seconds=0.6, generate_seconds=0.4)
    assert render.timings(st) == f"{PROMPT_TEXT}; first token after 0.60 s; 5 tokens at 10.0 tok/s"


def test_one_token_is_singular_and_has_no_rate():
    # one answer token: nothing to time between tokens, so no "0.0 tok/s" and no "1 tokens"
    st = EvalStats(**PROMPT, generated_tokens=1, first_token_seconds=0.6, generate_seconds=0.0)
    text = render.timings(st)
    assert text == (f"{PROMPT_TEXT}; first token after 0.60 s; "
                    "1 token (no generation rate: a single token has no interval to time)")
    assert "1 tokens" not in text and "tok/s" not in text.split("first token")[1]
    assert st.generation_tokens_per_second == 0.0


def test_an_answer_that_ended_at_once():
    st = EvalStats(**PROMPT, generated_tokens=0, first_token_seconds=0.6)
    assert render.timings(st).endswith("first token after 0.60 s; no answer tokens (the model ended its answer at once)")


def test_stopped_during_the_answer():
    st = EvalStats(**PROMPT, generated_tokens=7, first_token_seconds=0.6, generate_seconds=0.6, stopped_in="answer")
    assert render.timings(st) == f"{PROMPT_TEXT}; first token after 0.60 s; 7 tokens at 10.0 tok/s (stopped)"


def test_stopped_after_the_prompt_before_the_first_token():
    st = EvalStats(**PROMPT, stopped_in="answer")
    text = render.timings(st)
    assert text == f"{PROMPT_TEXT}; the answer was stopped before its first token"
    assert "first token after" not in text and "; 0 tokens" not in text


def test_stopped_while_the_prompt_was_decoded_says_what_was_decoded_and_the_real_time():
    # Ctrl-C after 40 of the 95 positions to decode, 1.23 s in: not "95 decoded in 0.00 s"
    st = EvalStats(prompt_tokens=120, reused_tokens=25, evaluated_tokens=40, images_encoded=1, prompt_seconds=1.234,
                   stopped_in="prompt")
    text = render.timings(st)
    assert text == ("prompt: 120 tokens (25 from the cache, 40 of 95 decoded, 1 image(s) encoded), stopped after "
                    "1.23 s; the answer was stopped before its first token")
    assert "0.00 s" not in text and "tok/s" not in text


def test_stopped_while_the_prompt_was_prepared():
    st = EvalStats(prompt_seconds=2.5, stopped_in="prompt")  # e.g. Ctrl-C while an image was encoded
    assert render.timings(st) == ("prompt: stopped after 2.50 s, while it was prepared; "
                                  "the answer was stopped before its first token")


def test_before_any_answer():
    assert render.timings(EvalStats()) == "no answer yet"


@pytest.mark.parametrize("n", [2, 3, 10])
def test_several_tokens_are_plural(n):
    st = EvalStats(**PROMPT, generated_tokens=n, first_token_seconds=0.1, generate_seconds=1.0)
    assert render.timings(st).endswith(f"; {n} tokens at {n - 1:.1f} tok/s")
