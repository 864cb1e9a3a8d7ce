"""The batch's Parquet input (llava_gguf/batch/parquet.py and inputs.read_parquet), on real Parquet files
written with pyarrow: image columns of bytes, paths and Hugging Face's Image struct, column detection and its
one-line errors, question_id keys, and a lazy stream that holds one row group at a time."""
from __future__ import annotations

import io
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_gguf.batch.inputs import Item, caption_key, read_items
from llava_gguf.batch.parquet import BATCH_ROWS
from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.images import load_image
from support import one_line_error

PROMPT = "Describe the image."
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image() as stored in Parquet


def png(colour=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def parquet(path: Path, columns: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------- image kinds
def test_binary_image_column_with_question_id_and_category(tmp_path):
    red, blue = png(), png((0, 0, 255))
    src = parquet(tmp_path / "eval.parquet", {
        "question_id": [10, 11, 12],
        "image": pa.array([red, blue, None], pa.binary()),
        "question": ["Is it red?", None, "Anything?"],
        "category": ["colour", None, "x"],
        "ignored": [1.5, 2.5, 3.5]})
    found = read_items(src)
    items = list(found.items)
    assert found.kind == "parquet" and found.count == 3
    assert items[0] == Item("10", 10, None, "Is it red?", "colour", f"{src}#row=0", None, red)
    assert items[1].error and "--prompt" in items[1].error and items[1].data is None  # a null question, no --prompt
    assert items[2].error == "row 2 has no image" and items[2].key == "12" and items[2].category == "x"
    with_prompt = list(read_items(src, prompt=PROMPT).items)
    assert with_prompt[1].error is None and with_prompt[1].prompt == PROMPT and with_prompt[1].data == blue
    assert with_prompt[0].prompt == "Is it red?"  # the row's own question wins over --prompt


def test_string_question_ids_and_large_binary(tmp_path):
    src = parquet(tmp_path / "q.parquet", {"question_id": ["gqa-1", "gqa-2"],
                                           "pixels": pa.array([png(), b""], pa.large_binary()),
                                           "text": ["A?", "B?"]})
    a, b = read_items(src).items
    assert (a.key, a.question_id, a.prompt, a.error) == ("gqa-1", "gqa-1", "A?", None) and a.data == png()
    assert b.error == "row 1's image is empty (0 bytes)"


def test_path_column_relative_to_the_file_or_image_folder(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "other" / "imgs").mkdir(parents=True)
    (tmp_path / "other" / "imgs" / "a.png").write_bytes(png())
    src = parquet(tmp_path / "data" / "list.parquet", {"file_name": ["imgs/a.png", "imgs/gone.png", ""]})
    found = read_items(src, prompt=PROMPT)
    a, gone, empty = found.items
    assert found.count == 3
    assert a == Item(caption_key("list.parquet#0", PROMPT), 0, tmp_path / "data" / "imgs" / "a.png", PROMPT, None,
                     f"{src}#row=0")
    assert gone.image is None and gone.error == f"image not found: {tmp_path / 'data' / 'imgs' / 'gone.png'}"
    assert gone.question_id == 1 and gone.where == f"{src}#row=1"  # a missing image is an error item, not a stop
    assert empty.error == "row 2 has no image"
    (moved, *_) = read_items(src, prompt=PROMPT, image_folder=tmp_path / "other").items
    assert moved.image == tmp_path / "other" / "imgs" / "a.png" and moved.error is None


def test_hugging_face_image_struct_bytes_or_path(tmp_path):
    (tmp_path / "local.png").write_bytes(png((0, 255, 0)))
    cells = [{"bytes": png(), "path": "embedded.png"},  # embedded: its path is only the original name
             {"bytes": None, "path": "local.png"},
             {"bytes": None, "path": None},
             None]
    src = parquet(tmp_path / "train-00000-of-00001.parquet",
                  {"img": pa.array(cells, HF_IMAGE), "label": [0, 1, 2, 3]})
    embedded, local, neither, null = read_items(src, prompt=PROMPT).items
    assert embedded.data == png() and embedded.image is None and embedded.error is None
    assert local.data is None and local.image == tmp_path / "local.png" and local.error is None
    assert neither.error == "row 2 has no image" and null.error == "row 3 has no image"
    assert [i.question_id for i in (embedded, local, neither, null)] == [0, 1, 2, 3]


def test_hugging_face_struct_with_empty_bytes_uses_its_path(tmp_path):
    (tmp_path / "local.png").write_bytes(png((0, 255, 0)))
    src = parquet(tmp_path / "x.parquet", {"image": pa.array([{"bytes": b"", "path": "local.png"}], HF_IMAGE)})
    (item,) = read_items(src, prompt=PROMPT).items
    assert item.error is None and item.data is None and item.image == tmp_path / "local.png"


def test_two_columns_with_one_name_are_one_line(tmp_path):
    table = pa.Table.from_arrays([pa.array([png()], pa.binary()), pa.array(["q?"]), pa.array(["r?"])],
                                 names=["image", "question", "question"])
    pq.write_table(table, tmp_path / "dup.parquet")
    one_line_error("two or more columns named 'question'", read_items, tmp_path / "dup.parquet")


def test_decoded_bytes_round_trip_through_load_image(tmp_path):
    pixels = np.zeros((6, 8, 3), np.uint8)
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    src = parquet(tmp_path / "x.parquet", {"image": pa.array([{"bytes": buf.getvalue(), "path": None}], HF_IMAGE)})
    (item,) = read_items(src, prompt=PROMPT).items
    image = load_image(item.data)
    assert image.size == (8, 6) and np.array_equal(np.asarray(image), pixels)


# ---------------------------------------------------------------------------------------------- keys, questions
def test_keys_without_question_id_are_row_and_question(tmp_path):
    src = parquet(tmp_path / "caps.parquet", {"image": pa.array([png(), png()], pa.binary())})
    k1 = [i.key for i in read_items(src, prompt="Caption it.").items]
    assert k1 == [caption_key("caps.parquet#0", "Caption it."), caption_key("caps.parquet#1", "Caption it.")]
    assert k1 == [i.key for i in read_items(src, prompt="Caption it.").items]  # stable for one file
    k2 = [i.key for i in read_items(src, prompt="What colour?").items]
    assert not set(k1) & set(k2)  # two prompts into one OUT: two sets of records
    one_line_error("no question column .*--prompt", read_items, src)


def test_question_column_by_name_or_option(tmp_path):
    src = parquet(tmp_path / "q.parquet", {"image": pa.array([png()], pa.binary()), "prompt": ["from prompt"],
                                           "text": ["from text"]})
    (item,) = read_items(src).items
    assert item.prompt == "from text"  # question, then text, then prompt
    (item,) = read_items(src, question_column="prompt").items
    assert item.prompt == "from prompt"


def test_duplicate_or_missing_question_id_names_the_row(tmp_path):
    images = pa.array([png()] * 3, pa.binary())
    dup = parquet(tmp_path / "dup.parquet", {"image": images, "question_id": [5, 6, 5]})
    text = one_line_error("question_id 5 is already on row 0", read_items, dup, prompt=PROMPT)
    assert f"{dup}#row=2" in text
    null = parquet(tmp_path / "null.parquet", {"image": images, "question_id": ["a", None, "c"]})
    assert f"{null}#row=1" in one_line_error("no question_id", read_items, null, prompt=PROMPT)
    floats = parquet(tmp_path / "f.parquet", {"image": images, "question_id": [1.0, 2.0, 3.0]})
    one_line_error("question_id column is double, not integers or strings", read_items, floats, prompt=PROMPT)


# ---------------------------------------------------------------------------------------------- errors
def test_image_column_detection_errors_are_one_line(tmp_path):
    two = parquet(tmp_path / "two.parquet", {"a": pa.array([png()], pa.binary()),
                                             "b": pa.array([png()], pa.large_binary())})
    text = one_line_error("several columns could be the image", read_items, two, prompt=PROMPT)
    assert "a, b" in text and "--image-column" in text
    (item,) = read_items(two, prompt=PROMPT, image_column="b").items
    assert item.data == png()
    none = parquet(tmp_path / "none.parquet", {"caption": ["x"], "n": [1]})
    text = one_line_error("has no image column", read_items, none, prompt=PROMPT)
    assert "caption (string), n (int64)" in text and "--image-column" in text
    text = one_line_error("has no column 'pic'", read_items, two, prompt=PROMPT, image_column="pic")
    assert "a (binary), b (large_binary)" in text
    one_line_error("has no column 'q'", read_items, two, prompt=PROMPT, image_column="a", question_column="q")
    one_line_error("column 'n' is int64, not image bytes", read_items, none, prompt=PROMPT, image_column="n")
    bad_q = parquet(tmp_path / "badq.parquet", {"image": pa.array([png()], pa.binary()), "question": [3]})
    one_line_error("question column 'question' is int64, not text", read_items, bad_q)
    one_line_error("--image-column is empty", read_items, two, prompt=PROMPT, image_column=" ")
    one_line_error("cannot both be in column 'a'", read_items, two, image_column="a", question_column="a")
    wide = parquet(tmp_path / "wide.parquet", {f"c{i}": [i] for i in range(30)})
    text = one_line_error("has no image column", read_items, wide, prompt=PROMPT)
    assert "c19 (int64), ..." in text and "c20" not in text


def test_column_options_are_for_parquet_only(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(png())
    one_line_error("--image-column is for a Parquet input; .* is a directory of images", read_items,
                   tmp_path / "d", prompt=PROMPT, image_column="image")
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "image": "d/x.png", "text": "Hi"}\n', encoding="utf-8")
    one_line_error("--question-column is for a Parquet input; .* is a question JSONL", read_items, q,
                   question_column="text")


def test_not_parquet_empty_or_no_rows(tmp_path):
    fake = tmp_path / "t.parquet"
    fake.write_bytes(b"PAR1 but nothing else")
    assert str(fake) in one_line_error("is not a readable Parquet file", read_items, fake, prompt=PROMPT)
    text_file = tmp_path / "notes.parquet"
    text_file.write_text("image\nx.png\n", encoding="utf-8")
    one_line_error("is not a readable Parquet file .*magic bytes", read_items, text_file, prompt=PROMPT)
    (tmp_path / "zero.parquet").write_bytes(b"")
    one_line_error("is not a readable Parquet file", read_items, tmp_path / "zero.parquet", prompt=PROMPT)
    no_rows = parquet(tmp_path / "rows.parquet", {"image": pa.array([], pa.binary())})
    one_line_error(f"{no_rows} holds no rows", read_items, no_rows, prompt=PROMPT)


def test_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    src = parquet(tmp_path / "x.parquet", {"image": pa.array([png()], pa.binary())})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what `import` sees when pyarrow is absent
    text = one_line_error("needs pyarrow", read_items, src, prompt=PROMPT)
    assert "pip install 'llava-gguf[parquet]'" in text


# ---------------------------------------------------------------------------------------------- streaming
def _zero_column_chunk(path: Path, row_group: int, column: str) -> None:
    """Overwrite one column chunk's pages with zeros (its page headers no longer parse): a damaged part of the
    file that only a reader of that column in that row group trips over."""
    meta = pq.ParquetFile(path).metadata
    rg = meta.row_group(row_group)
    chunk = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * chunk.total_compressed_size)


def test_large_file_is_streamed_a_row_group_at_a_time(tmp_path):
    rows, size = 2000, 10_000  # 20 MB of incompressible "images" in 20 row groups
    blobs = [os.urandom(size) for _ in range(rows)]
    src = parquet(tmp_path / "big.parquet", {"question_id": list(range(rows)), "image": pa.array(blobs, pa.binary())},
                  row_group_size=100, compression="none")
    del blobs
    _zero_column_chunk(src, 19, "image")  # the last row group's images are damaged

    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    tracemalloc.start()
    try:
        found = read_items(src, prompt=PROMPT)  # the validation pass reads question_id only: the damage is unseen
        first = [next(found.items) for _ in range(3)]
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arrow_held = pool.bytes_allocated() - before
    assert found.count == rows and [i.key for i in first] == ["0", "1", "2"] and first[2].data is not None
    # one row group of images is 1 MB; pyarrow's default (pre-buffering every row group of the column) or a
    # whole-table read holds 20 MB
    assert arrow_held < 4 * 2**20 and python_peak < 4 * 2**20, (arrow_held, python_peak)

    seen = 3
    with pytest.raises(LlavaGgufError) as e:
        for _ in found.items:
            seen += 1
    # every row before the damaged row group came out, but for the last record batch (it reaches into it)
    assert 1900 - BATCH_ROWS <= seen < 1900
    text = str(e.value)
    assert "\n" not in text and f"{src} is not a readable Parquet file near row {seen}" in text
