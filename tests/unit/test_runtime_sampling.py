"""runtime/sampling.py: the one validation of sampling settings the API, the CLI and the server share;
its defaults are llava_gguf.settings.SAMPLING_DEFAULTS."""
from __future__ import annotations

import pytest

from llava_gguf.errors import InvalidSetting, LlavaGgufError
from llava_gguf.runtime.sampling import Sampling, check_seed, check_text, sampling_settings
from llava_gguf.settings import SAMPLING_DEFAULTS


def test_defaults_come_from_the_settings():
    s = sampling_settings()
    assert {k: getattr(s, k) for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert s == Sampling() and s.stop == () and s.seed is None and s.min_p == 0.05


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_tokens=0), r"max_tokens \(--max-tokens\) must be an integer of at least 1"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-0.1), r"temperature \(--temp\) must be a number of at least 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), r"top_p \(--top-p\) must be a number from 0 to 1"),
    (dict(top_k=-1), r"top_k \(--top-k\) must be an integer of at least 0"),
    (dict(top_k=2.5), "top_k"),
    (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(min_p=2), "min_p must be a number from 0 to 1"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stop=b"x"), "stop must be a string or a list of strings"),
    (dict(stop=3), "stop must be a string or a list of strings"),
    (dict(seed=2**32), "seed"),
    (dict(seed="1"), "seed"),
])
def test_bad_settings_are_refused_naming_the_option(kwargs, words):
    with pytest.raises(InvalidSetting, match=words):
        sampling_settings(**kwargs)


def test_values_are_normalised():
    s = sampling_settings(max_tokens=3, temperature=0, top_p=0, top_k=0, stop=(x for x in ["a", "bc"]), seed=7)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.seed) == (3, 0.0, 0.0, 0, ("a", "bc"), 7)
    assert sampling_settings(stop="END").stop == ("END",)
    assert check_seed(-1) is None and check_seed(0xFFFFFFFF) is None and check_seed(0) == 0


def test_text_that_is_not_utf8_names_the_character():
    check_text("fine ✓", "the prompt")
    with pytest.raises(LlavaGgufError, match="character 3 is the byte 0xFF, which is not UTF-8"):
        check_text("ab\udcff", "the prompt")
    with pytest.raises(LlavaGgufError, match="a stop string is not valid text"):
        sampling_settings(stop="\ud83d")
    with pytest.raises(LlavaGgufError, match="must be a string"):
        check_text(None, "the prompt")  # type: ignore[arg-type]
