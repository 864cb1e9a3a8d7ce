"""The batch's inputs (llava_gguf/batch/inputs.py): each kind read from real files, keys, relative paths,
error items for missing images, one-line errors naming file:line for malformed input, a lazy stream."""
from __future__ import annotations

import json
import os
import time
import tracemalloc
import types
from pathlib import Path

import pytest

from llava_gguf.batch.inputs import Item, caption_key, detect_kind, read_items
from support import one_line_error

PROMPT = "Describe the image."


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not decoded by the reader")
    return path


def jsonl(path: Path, *records, raw: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- directory
def test_directory_recursive_sorted_images_only(tmp_path):
    d = tmp_path / "photos"
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.jpeg", "notes.txt", ".hidden.jpg", "._a.jpg",
                 ".cache/e.jpg", "a0/f.bmp"]:
        touch(d / name)
    src = read_items(d, prompt=PROMPT)
    items = list(src.items)
    assert src.kind == "directory" and src.count == 5
    assert [i.question_id for i in items] == ["a.PNG", "a0/f.bmp", "b.jpg", "sub/c.webp", "sub/deeper/d.jpeg"]
    assert all(i.error is None and i.image == d / i.question_id and i.prompt == PROMPT for i in items)
    assert items[0].key == caption_key("a.PNG", PROMPT)
    assert [i.key for i in read_items(d, prompt=PROMPT).items] == [i.key for i in items]  # deterministic


def test_same_folder_two_prompts_are_two_sets_of_keys(tmp_path):
    touch(tmp_path / "d" / "x.jpg")
    k1 = {i.key for i in read_items(tmp_path / "d", prompt="Caption it.").items}
    k2 = {i.key for i in read_items(tmp_path / "d", prompt="What colour?").items}
    assert len(k1) == len(k2) == 1 and not k1 & k2


def test_directory_symlink_loop_is_walked_once(tmp_path):
    d = tmp_path / "d"
    touch(d / "sub" / "x.jpg")
    os.symlink(d, d / "sub" / "loop")  # d/sub/loop -> d
    os.symlink(tmp_path / "gone.jpg", d / "broken.jpg")
    items = list(read_items(d, prompt=PROMPT).items)
    assert [i.question_id for i in items] == ["broken.jpg", "sub/x.jpg"]
    assert items[0].image is None and "image not found" in items[0].error
    assert items[1].error is None


def test_directory_needs_a_prompt_and_images(tmp_path):
    touch(tmp_path / "d" / "x.jpg")
    one_line_error("--prompt", read_items, tmp_path / "d", prompt=None)
    one_line_error("--prompt is empty", read_items, tmp_path / "d", prompt="  ")
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "empty" / "readme.md")
    one_line_error("no images in", read_items, tmp_path / "empty", prompt=PROMPT)
    one_line_error("does not exist", read_items, tmp_path / "nope", prompt=PROMPT)


# ---------------------------------------------------------------------------------------------- text list
def test_text_list_relative_to_the_file_or_image_folder(tmp_path):
    touch(tmp_path / "lists" / "imgs" / "a.jpg")
    touch(tmp_path / "other" / "imgs" / "a.jpg")
    lst = tmp_path / "lists" / "todo.txt"
    lst.write_text("# my images\n\nimgs/a.jpg\n  imgs/missing.png  \n", encoding="utf-8")
    src = read_items(lst, prompt=PROMPT)
    items = list(src.items)
    assert src.kind == "text" and src.count == 2
    assert items[0] == Item(caption_key("imgs/a.jpg", PROMPT), "imgs/a.jpg", tmp_path / "lists" / "imgs" / "a.jpg",
                            PROMPT, None, f"{lst}:3")
    assert items[1].image is None and items[1].error.startswith("image not found") and items[1].where == f"{lst}:4"
    moved = list(read_items(lst, prompt=PROMPT, image_folder=tmp_path / "other").items)
    assert moved[0].image == tmp_path / "other" / "imgs" / "a.jpg"


def test_text_that_is_not_a_list_of_paths(tmp_path):
    prose = tmp_path / "readme.txt"
    prose.write_text("This is a list.\nOf nothing at all\n", encoding="utf-8")
    assert f"{prose}:1" in one_line_error("neither an image", read_items, prose, prompt=PROMPT)
    arr = tmp_path / "q.json"
    arr.write_text('[{"question_id": 1}]\n', encoding="utf-8")
    assert f"{arr}:1" in one_line_error("JSON value", read_items, arr, prompt=PROMPT)
    dup = tmp_path / "dup.txt"
    dup.write_text("a.jpg\nb.jpg\na.jpg\n", encoding="utf-8")
    assert "line 1" in one_line_error(f"{dup}:3: a.jpg is listed twice", read_items, dup, prompt=PROMPT)
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n", encoding="utf-8")
    one_line_error("lists no images", read_items, blank, prompt=PROMPT)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"a.jpg\n\xff\xfe.jpg\n")
    one_line_error(f"{binary}:2: not UTF-8", read_items, binary, prompt=PROMPT)


# ---------------------------------------------------------------------------------------------- JSONL
def test_llava_question_jsonl(tmp_path):
    touch(tmp_path / "images" / "COCO_1.jpg")
    (tmp_path / "eval").mkdir()
    q = jsonl(tmp_path / "eval" / "questions.jsonl",
              {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog?", "category": "adversarial"},
              {"question_id": "gqa-7", "image": "COCO_1.jpg", "text": "What colour?", "extra": [1, 2]},
              {"question_id": 3, "image": "nope.jpg", "text": "Anything?"},
              {"question_id": 4, "image": "COCO_1.jpg"},
              {"question_id": 5, "text": "No image?"})
    src = read_items(q, prompt=None, image_folder=tmp_path / "images")
    items = list(src.items)
    assert src.kind == "jsonl" and src.count == 5
    assert items[0] == Item("1", 1, tmp_path / "images" / "COCO_1.jpg", "Is there a dog?", "adversarial", f"{q}:1")
    assert items[1].key == "gqa-7" and items[1].question_id == "gqa-7" and items[1].error is None
    assert items[2].image is None and items[2].error == f"image not found: {tmp_path / 'images' / 'nope.jpg'}"
    assert items[3].error and "--prompt" in items[3].error and items[3].image is None
    assert items[4].error == "the question names no image"
    with_prompt = list(read_items(q, prompt="Describe.", image_folder=tmp_path / "images").items)
    assert with_prompt[3].error is None and with_prompt[3].prompt == "Describe."
    assert with_prompt[0].prompt == "Is there a dog?"  # the record's own text wins over --prompt


def test_jsonl_images_default_to_the_files_directory(tmp_path):
    touch(tmp_path / "x.jpg")
    q = jsonl(tmp_path / "q.jsonl", {"question_id": 0, "image": "x.jpg", "text": "Hi"})
    (item,) = read_items(q).items
    assert item.image == tmp_path / "x.jpg" and item.error is None


def test_jsonl_detected_by_content_and_bom_and_crlf(tmp_path):
    touch(tmp_path / "x.jpg")
    q = tmp_path / "question.json"  # LLaVA's scripts often name a JSONL ".json"
    q.write_bytes(b'\xef\xbb\xbf{"question_id": 0, "image": "x.jpg", "text": "Hi"}\r\n')
    assert detect_kind(q) == "jsonl"
    (item,) = read_items(q).items
    assert item.prompt == "Hi" and item.error is None


def test_duplicate_question_id_names_both_lines(tmp_path):
    q = jsonl(tmp_path / "q.jsonl", {"question_id": 7, "image": "a.jpg", "text": "A"},
              {"question_id": 8, "image": "a.jpg", "text": "B"}, {"question_id": "7", "image": "b.jpg", "text": "C"})
    text = one_line_error("question_id 7", read_items, q)
    assert f"{q}:3" in text and "line 1" in text


@pytest.mark.parametrize("raw, match", [
    ('{"question_id": 1, "image": "a.jpg"\n', "not valid JSON"),
    ('[1, 2]\n', "not an object"),
    ('{"image": "a.jpg", "text": "x"}\n', "no question_id"),
    ('{"question_id": 1.5, "image": "a.jpg"}\n', "not an integer or a string"),
    ('{"question_id": true, "image": "a.jpg"}\n', "not an integer or a string"),
])
def test_malformed_jsonl_line_is_one_line_error_with_file_and_line(tmp_path, raw, match):
    q = jsonl(tmp_path / "q.jsonl", {"question_id": 0, "image": "a.jpg", "text": "ok"}, raw=raw)
    assert f"{q}:2:" in one_line_error(match, read_items, q)


def test_malformed_input_fails_before_any_item(tmp_path):
    """The first pass sees the whole file: a bad last line stops the run before the first record."""
    q = jsonl(tmp_path / "q.jsonl", *[{"question_id": i, "image": "a.jpg", "text": "x"} for i in range(50)],
              raw="oops\n")
    one_line_error(f"{q}:51", read_items, q)


def test_empty_jsonl_text_and_parquet(tmp_path):
    empty = tmp_path / "q.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    one_line_error("holds no questions", read_items, empty)
    (tmp_path / "e.txt").write_bytes(b"")
    one_line_error("is empty", read_items, tmp_path / "e.txt", prompt=PROMPT)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    one_line_error("is not a readable Parquet file", read_items, tmp_path / "t.parquet", prompt=PROMPT)


def test_image_folder_must_be_a_directory(tmp_path):
    q = jsonl(tmp_path / "q.jsonl", {"question_id": 0, "image": "a.jpg", "text": "x"})
    one_line_error("--image-folder", read_items, q, image_folder=tmp_path / "missing")


def test_large_jsonl_is_read_lazily(tmp_path):
    touch(tmp_path / "a.jpg")
    q = tmp_path / "big.jsonl"
    with open(q, "w", encoding="utf-8") as f:
        for i in range(20000):
            f.write(json.dumps({"question_id": i, "image": "a.jpg", "text": f"Question {i}?"}) + "\n")
    t0 = time.perf_counter()
    src = read_items(q)
    first = next(src.items)
    assert time.perf_counter() - t0 < 5  # the validation pass only: no item is built ahead
    assert src.count == 20000 and first.key == "0"
    assert isinstance(src.items, types.GeneratorType)  # a stream, not a list
    tracemalloc.start()
    try:
        assert sum(1 for _ in src.items) == 19999
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # memory flat: 20000 items held at once would take several MiB
