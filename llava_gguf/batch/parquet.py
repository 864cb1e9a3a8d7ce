"""The Parquet input of `llava-gguf batch`, at the file-format level: which columns hold the image, the question,
question_id and category, a cheap validation pass, and the rows streamed a record batch at a time.

pyarrow is optional (the `[parquet]` extra) and imported where a Parquet file is opened. The image column may
hold encoded bytes (binary), a path (string), or Hugging Face datasets' Image feature (a struct {bytes, path}).
Memory stays flat: only the needed columns are read, the validation pass never reads the image column, and
pre-buffering is off (pyarrow's default reads every row group of the selected columns up front), so at most
one row group of images is held at a time. inputs.py turns the rows into `Item`s."""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from llava_gguf.errors import LlavaGgufError

IMAGE_COLUMN = "image"
PATH_COLUMNS = ("image_path", "path", "file_name", "filename")  # a path column found by name only
QUESTION_COLUMNS = ("question", "text", "prompt")  # the first present is the question
QID_COLUMN, CATEGORY_COLUMN = "question_id", "category"
BATCH_ROWS = 32  # rows per record batch in the image pass: a few MB of encoded images at a time
CHECK_ROWS = 1 << 16  # rows per batch in the validation pass (question_id only: small values)
READ_BUFFER = 1 << 20  # read column chunks through a 1 MiB buffer, not whole (pyarrow's buffer_size=0)
LISTED = 20  # columns named in an error message (a wide table's list would not be one readable line)
INSTALL_HINT = "pip install 'llava-gguf[parquet]'"


@dataclass(frozen=True)
class Columns:
    """The columns a Parquet input is read from. `image_kind`: "bytes", "path" or "struct" ({bytes, path})."""

    image: str
    image_kind: str
    question: str | None = None
    question_id: str | None = None
    category: str | None = None

    def names(self) -> list[str]:
        return [c for c in (self.image, self.question, self.question_id, self.category) if c is not None]


class Row(NamedTuple):
    """One row, as read: `data` the image's encoded bytes, or `path` its file name (both None: no image)."""

    index: int  # 0-based row number in the file
    question_id: int | str | None
    question: str | None
    category: str | None
    data: bytes | None
    path: str | None


@dataclass(frozen=True)
class ParquetInput:
    """A Parquet file whose columns are found and whose question_ids are checked: `rows()` streams it."""

    source: Path
    columns: Columns
    count: int

    @classmethod
    def open(cls, source: Path, *, image_column: str | None = None,
             question_column: str | None = None) -> ParquetInput:
        """Find the columns (`image_column`/`question_column` when given, else by name and type) and check the
        question_ids (present, integers or strings, unique) in one pass that reads no image."""
        pq = _pyarrow_parquet(source)
        with _parquet_errors(source), pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER) as f:
            count = f.metadata.num_rows
            if count == 0:
                raise LlavaGgufError(f"{source} holds no rows")
            columns = find_columns(source, f.schema_arrow, image_column, question_column)
            if columns.question_id is not None:
                _check_question_ids(source, f, columns.question_id)
        return cls(source, columns, count)

    def rows(self) -> Iterator[Row]:
        """Every row in file order, a record batch of BATCH_ROWS at a time (a damaged part of the file: a
        one-line LlavaGgufError when the reading gets there)."""
        pq = _pyarrow_parquet(self.source)
        c = self.columns
        index = 0
        with _parquet_errors(self.source, lambda: f" near row {index}"), \
                pq.ParquetFile(self.source, pre_buffer=False, buffer_size=READ_BUFFER) as f:
            for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=c.names(), use_threads=False):
                n = batch.num_rows
                qids = _values(batch, c.question_id, n)
                questions = _values(batch, c.question, n)
                categories = _values(batch, c.category, n)
                images = batch.column(c.image).to_pylist()
                for i in range(n):
                    data, path = _image_cell(images[i], c.image_kind)
                    category = categories[i]
                    yield Row(index, qids[i], questions[i], None if category is None else str(category), data, path)
                    index += 1
                del batch, images  # this batch's images are freed before the next batch is read


# ---------------------------------------------------------------------------------------------- columns
def find_columns(source: Path, schema, image_column: str | None, question_column: str | None) -> Columns:
    """The columns of `schema` (a pyarrow.Schema) to read; one-line LlavaGgufError when the image column is
    ambiguous or missing, or a column has a type that cannot be what it is used for."""
    names = [field.name for field in schema]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # pyarrow can write them, but a column cannot be read by its name then
        raise LlavaGgufError(f"{source} has two or more columns named {', '.join(map(repr, twice[:5]))}",
                             "give each column its own name")
    types = {field.name: _unwrap(field.type) for field in schema}
    listing = ", ".join(f"{name} ({t})" for name, t in itertools.islice(types.items(), LISTED))
    listing += ", ..." if len(types) > LISTED else ""

    if image_column is not None:
        if image_column not in types:
            raise LlavaGgufError(f"{source} has no column {image_column!r}; its columns: {listing}",
                                 "--image-column names one of them")
        image = image_column
    else:
        image = _detect_image(source, types, listing)
    kind = image_kind(types[image])
    if kind is None:
        raise LlavaGgufError(f"{source}: column {image!r} is {types[image]}, not image bytes, a path or an image "
                             "struct {bytes, path}", "--image-column names the column with the images")

    if question_column is not None:
        if question_column not in types:
            raise LlavaGgufError(f"{source} has no column {question_column!r}; its columns: {listing}",
                                 "--question-column names one of them")
        question = question_column
        if question == image:
            raise LlavaGgufError(f"{source}: the images and the questions cannot both be in column {image!r}")
    else:
        question = next((name for name in QUESTION_COLUMNS if name in types and name != image), None)
    if question is not None and not _is_string(types[question]):
        raise LlavaGgufError(f"{source}: the question column {question!r} is {types[question]}, not text",
                             "--question-column names the column with the questions")

    qid = QID_COLUMN if QID_COLUMN in types and QID_COLUMN not in (image, question) else None
    if qid is not None and not (_is_string(types[qid]) or _pa().types.is_integer(types[qid])):
        raise LlavaGgufError(f"{source}: the question_id column is {types[qid]}, not integers or strings")
    category = CATEGORY_COLUMN if CATEGORY_COLUMN in types and CATEGORY_COLUMN not in (image, question) else None
    return Columns(image, kind, question, qid, category)


def _detect_image(source: Path, types: dict, listing: str) -> str:
    """"image" if present; else the one column holding image bytes (binary, or an {bytes, path} struct); else
    the one string column named like a path. Bytes columns are looked at first: a dataset with embedded images
    often keeps their original file names beside them."""
    if IMAGE_COLUMN in types:
        return IMAGE_COLUMN
    hint = "name the image column with --image-column"
    holding = [name for name, t in types.items() if image_kind(t) in ("bytes", "struct")]
    if not holding:
        holding = [name for name in PATH_COLUMNS if name in types and _is_string(types[name])]
    if len(holding) == 1:
        return holding[0]
    if holding:
        raise LlavaGgufError(f"{source}: several columns could be the image ({', '.join(holding)})", hint)
    raise LlavaGgufError(f"{source} has no image column (binary, an image struct, or a path named "
                         f"{', '.join((IMAGE_COLUMN, *PATH_COLUMNS))}); its columns: {listing}", hint)


def image_kind(arrow_type) -> str | None:
    """"bytes", "path", "struct" (a struct with a binary `bytes` field: Hugging Face's Image feature), or None."""
    t = _unwrap(arrow_type)
    if _is_binary(t):
        return "bytes"
    if _is_string(t):
        return "path"
    if _pa().types.is_struct(t):
        i = t.get_field_index("bytes")
        if i >= 0 and _is_binary(_unwrap(t.field(i).type)):
            return "struct"
    return None


def _is_binary(t) -> bool:
    types = _pa().types
    return types.is_binary(t) or types.is_large_binary(t) or _is_view(t, "is_binary_view")


def _is_string(t) -> bool:
    types = _pa().types
    return types.is_string(t) or types.is_large_string(t) or _is_view(t, "is_string_view")


def _is_view(t, test: str) -> bool:
    """The view types came in pyarrow 16; the `[parquet]` extra allows 14."""
    check = getattr(_pa().types, test, None)
    return check is not None and bool(check(t))


def _unwrap(t):
    """A dictionary-encoded column reads as its values."""
    return t.value_type if _pa().types.is_dictionary(t) else t


# ---------------------------------------------------------------------------------------------- rows
def _check_question_ids(source: Path, f, column: str) -> None:
    first: dict[str, int] = {}
    index = 0
    for batch in f.iter_batches(batch_size=CHECK_ROWS, columns=[column], use_threads=False):
        for qid in batch.column(0).to_pylist():
            if qid is None or qid == "":
                raise LlavaGgufError(f"{source}#row={index}: the question has no question_id",
                                     "every row needs a question_id (or drop the column)")
            key = str(qid)
            if key in first:
                raise LlavaGgufError(f"{source}#row={index}: question_id {key} is already on row {first[key]}",
                                     "every question needs its own question_id")
            first[key] = index
            index += 1


def _values(batch, column: str | None, n: int) -> list:
    return batch.column(column).to_pylist() if column is not None else [None] * n


def _image_cell(cell, kind: str) -> tuple[bytes | None, str | None]:
    if cell is None:
        return None, None
    if kind == "bytes":
        return cell, None
    if kind == "path":
        return None, cell
    data, path = cell.get("bytes"), cell.get("path")  # Hugging Face's Image: bytes when embedded, else a path
    if data or not isinstance(path, str) or not path:  # b"" beside a path: the path is the image
        return data, None
    return None, path


# ---------------------------------------------------------------------------------------------- pyarrow
def _pa():
    import pyarrow  # why: heavy optional dependency ([parquet] extra); loaded only when a Parquet is read

    return pyarrow


def _pyarrow_parquet(source: Path):
    try:
        import pyarrow.parquet as pq  # why: heavy optional dependency ([parquet] extra), only for a Parquet input
    except ImportError:
        raise LlavaGgufError(f"reading the Parquet file {source} needs pyarrow", INSTALL_HINT) from None
    return pq


@contextlib.contextmanager
def _parquet_errors(source: Path, where: Callable[[], str] = lambda: "") -> Iterator[None]:
    """pyarrow's errors on a damaged, truncated or unreadable file as one line naming it (`where`: how far the
    reading got)."""
    try:
        yield
    except (OSError, _pa().ArrowException) as e:
        what = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlavaGgufError(f"{source} is not a readable Parquet file{where()} ({what[:200]})") from None
