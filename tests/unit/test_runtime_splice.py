"""runtime/splice.py: an answer's own token ids put back where the rendered conversation tokenized its text
differently, found only right after the generation prompt (no model: a toy vocabulary)."""
from __future__ import annotations

from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.segments import ImageSegment, TextSegment
from llava_gguf.runtime.splice import answers, splice, splice_answers

VOCAB = {1: b"USER:", 2: b" hi", 3: b" ASSISTANT:", 4: b" Hel", 5: b"lo", 6: b" Hello", 7: b"</s>",
         8: b" world", 9: b" again", 10: b"Hello", 11: b" "}
piece = VOCAB.__getitem__
RENDERED = [1, 2, 3, 6, 7]  # "USER: hi ASSISTANT: Hello</s>", " Hello" as one token


def test_the_generated_ids_replace_the_tokens_of_the_same_text():
    assert splice(RENDERED, 0, [4, 5], b" ", b"ASSISTANT:", piece) == ([1, 2, 3, 4, 5, 7], 5)


def test_an_answer_cut_short_still_splices_what_the_text_has():
    # the last generated token (" world") was cut by a stop string: it is not in the text
    assert splice(RENDERED, 0, [4, 5, 8], b" ", b"ASSISTANT:", piece) == ([1, 2, 3, 4, 5, 7], 5)


def test_ids_generated_without_the_separator_replace_it():
    # the model wrote "Hello" right after "ASSISTANT:": that is what the cache holds, the template's " " is not
    toks = [1, 2, 3, 11, 10, 7]  # "... ASSISTANT:" " " "Hello" "</s>"
    assert splice(toks, 0, [10], b" ", b"ASSISTANT:", piece) == ([1, 2, 3, 10, 7], 4)


def test_other_text_is_never_replaced():
    assert splice(RENDERED, 0, [9], b" ", b"ASSISTANT:", piece) is None
    assert splice(RENDERED, 0, [4, 5], b" ", b"NOWHERE:", piece) is None
    assert splice(RENDERED, 4, [4, 5], b" ", b"ASSISTANT:", piece) is None  # only after `start`


def test_splice_answers_walks_text_segments_in_order():
    segs = [TextSegment((1, 2, 3)), ImageSegment("abc", 4), TextSegment(tuple(RENDERED))]
    out = splice_answers(segs, [([4, 5], b" ", b"ASSISTANT:")], piece, n_vocab=12)
    assert out[0] == TextSegment((1, 2, 3)) and out[1] == segs[1]
    assert out[2] == TextSegment((1, 2, 3, 4, 5, 7))
    # ids outside the vocabulary (a transcript from another model) are not spliced
    assert splice_answers(segs, [([4, 99], b" ", b"ASSISTANT:")], piece, n_vocab=12) == segs


def _vicuna(messages, add_generation_prompt=True):
    text = "".join(f"USER: {m.text} " if m.role == "user" else f"ASSISTANT: {m.text}</s>" for m in messages)
    return text + ("ASSISTANT:" if add_generation_prompt else "")


def test_answers_finds_the_separator_and_the_anchor():
    msgs = [Message("user", "hi"), Message("assistant", "Hello", tokens=(4, 5)), Message("user", "again")]
    assert answers(msgs, _vicuna, marker="<__media__>") == [([4, 5], b" ", b"SISTANT:")]
    # an answer without ids, or one the template does not put right after the generation prompt: none
    assert answers([Message("user", "hi"), Message("assistant", "Hello")], _vicuna, "<__media__>") == []

    def elsewhere(messages, add_generation_prompt=True):
        return _vicuna(messages, add_generation_prompt).replace("ASSISTANT: Hello", "ASSISTANT: [x] Hello")

    assert answers(msgs, elsewhere, "<__media__>") == []
