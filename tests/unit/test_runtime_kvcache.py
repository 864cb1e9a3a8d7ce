"""runtime/kvcache.py: how much of a wanted prompt a sequence's KV cache keeps — the longest common
prefix, never the last position (its logits are needed), never ending inside an image — and which other
sequence holds the longest prefix to copy."""
from __future__ import annotations

from llava_gguf.runtime.kvcache import best_donor, common_prefix, image_spans, reusable_prefix, pick_free
from llava_gguf.runtime.segments import ImageSegment, TextSegment, positions, tail


def img(h: str, n: int) -> list:
    return [(h, k) for k in range(n)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, ("a", 0)], [1, ("a", 1)]) == 1


def test_the_last_position_is_always_decoded_again():
    assert reusable_prefix([1, 2, 3, 4], [1, 2, 3, 4]) == 3
    assert reusable_prefix([1, 2, 3, 4, 5, 6], [1, 2, 3]) == 2
    assert reusable_prefix([9], [1]) == 0
    assert reusable_prefix([], []) == 0


def test_a_follow_up_keeps_the_image_and_the_earlier_turn():
    held = [1, 2] + img("a", 3) + [5, 6, 7]
    want = [1, 2] + img("a", 3) + [5, 6, 7, 8, 9]
    assert reusable_prefix(held, want) == len(held)


def test_never_starts_inside_an_image():
    # the cache holds part of the image only (the prompt ended there) or another image follows
    assert reusable_prefix([1] + img("a", 2), [1] + img("a", 4) + [9]) == 1
    assert reusable_prefix([1] + img("a", 4) + [2], [1] + img("a", 4)) == 1  # the last position is an image row
    assert reusable_prefix([1] + img("a", 3), [1] + img("b", 3) + [2]) == 1


def test_the_same_image_twice_in_a_row_is_two_images():
    assert image_spans(img("a", 2) + img("a", 2)) == [(0, 2), (2, 2)]
    assert image_spans([1] + img("a", 2) + [3] + img("b", 1)) == [(1, 2), (4, 1)]
    assert reusable_prefix(img("a", 2) + img("a", 1), img("a", 2) + img("a", 2) + [7]) == 2


def test_best_donor_takes_the_longest_usable_prefix_lowest_id_on_a_tie():
    want = [1, 2, 3, 4, 5]
    assert best_donor(want, {3: [1, 2, 3], 1: [1, 2, 3], 2: [1, 9]}) == (1, 3)
    assert best_donor(want, {0: [1, 2, 3, 4, 5, 6]}) == (0, 4)
    assert best_donor(want, {0: [7]}) == (None, 0)
    assert best_donor(want, {}) == (None, 0)


def test_positions_of_segments():
    segs = [TextSegment((1, 2)), ImageSegment("h", 2), TextSegment((3,))]
    assert positions(segs) == [1, 2, ("h", 0), ("h", 1), 3]
    assert sum(s.n for s in segs) == 5


def test_the_tail_left_to_decode():
    segs = [TextSegment((1, 2)), ImageSegment("h", 2), TextSegment((3, 4))]
    assert tail(segs, 0) == segs
    assert tail(segs, 1) == [TextSegment((2,)), segs[1], segs[2]]
    assert tail(segs, 2) == [segs[1], segs[2]]  # the image whole
    assert tail(segs, 5) == [TextSegment((4,))]
    assert tail(segs, 6) == []


def test_pick_free_continues_a_conversation_else_takes_an_empty_sequence_else_the_least_recent():
    img = [("h", k) for k in range(4)]
    conversation = [1] + img + [5, 6, 7, 8]
    # a follow-up turn goes back to the sequence that holds its conversation
    assert pick_free({0: ([], 1), 1: (conversation, 2)}, conversation + [9, 10]) == 1
    # the same image with another question: an empty sequence takes it (the image rows are copied there),
    # the first conversation keeps its cells
    assert pick_free({0: ([], 1), 1: (conversation, 2)}, [1] + img + [11, 12]) == 0
    # no empty sequence: the least recently used one is overwritten
    assert pick_free({0: ([2, 3], 5), 1: ([4, 5], 3)}, [7, 8]) == 1
    # the same prompt again continues its own cache (only the last position is decoded again)
    assert pick_free({0: ([], 1), 1: (conversation, 2)}, conversation) == 1
