"""runtime/text.py: an answer's bytes become whole characters, lose the tokenizer's leading space, and end
at a stop string that may arrive split over several tokens."""
from __future__ import annotations

from llava_gguf.runtime.text import AnswerText, complete_utf8


def test_complete_utf8():
    e = "é".encode()
    emoji = "😀".encode()
    assert complete_utf8(b"") and complete_utf8(b"abc") and complete_utf8(e) and complete_utf8(emoji)
    assert not complete_utf8(e[:1]) and not complete_utf8(emoji[:3]) and not complete_utf8(b"a" + emoji[:2])
    assert complete_utf8(b"\xff")  # not UTF-8 at all: nothing to wait for


def _stream(pieces: list[bytes], stop=()) -> list[str]:
    t = AnswerText(stop)
    out = []
    for p in pieces:
        out += t.add(p)
        if t.stopped:
            return out
    return out + [t.flush()]


def test_characters_split_over_tokens_come_out_whole():
    e = "é".encode()
    assert _stream([b" caf", e[:1], e[1:], b"!"]) == ["caf", "é", "!", ""]


def test_the_leading_space_is_dropped_once():
    assert "".join(_stream([b" ", b" Hello", b" world"])) == "Hello world"


def test_a_stop_string_split_over_tokens_ends_the_answer_before_it():
    assert "".join(_stream([b" Hello", b" EN", b"D more"], stop=("END",))) == "Hello "
    # text that only starts like a stop string is held back, then given
    assert "".join(_stream([b" a E", b"N", b"x"], stop=("END",))) == "a ENx"
    t = AnswerText(("END",))
    assert t.add(b" abc") == ["a"] and t.add(b"EN") == ["bc"] and t.add(b"D") == [""] and t.stopped
    assert t.add(b"more") == []
