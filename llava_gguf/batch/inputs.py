"""What a batch answers: the records of a directory of images, a text file of image paths, a question JSONL
in LLaVA's evaluation format or a Parquet file (an image column of bytes or paths, an optional question column),
as a lazy stream of `Item`s (memory stays flat over any number of records).

Each kind is one reader function in READERS; `detect_kind` picks it. A file is validated in a first pass
(UTF-8, JSON, duplicate keys, not empty; for Parquet its columns and question_ids, no image read) so a
malformed input fails with one line naming file:line (file#row=N) before any model work, and re-read lazily
in a second. A problem with one record (its image missing, no question) is not an exception: the item carries
`error` and the runner writes it as an error record."""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from llava_gguf.batch.parquet import ParquetInput, Row
from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.runtime.images import IMAGE_SUFFIXES

# Files a list may name besides IMAGE_SUFFIXES: Pillow (+ the optional pillow-heif) reads them too.
LIST_SUFFIXES = frozenset(IMAGE_SUFFIXES) | {".heic", ".heif", ".avif", ".jfif", ".ppm", ".pgm", ".pbm"}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MAX_PATH_BYTES = 4096  # PATH_MAX: a longer "line" is text, not a path


@dataclass(frozen=True)
class Item:
    """One record to answer. `key` is the resume key (unique in the input); `error` a problem found while
    reading (the image cannot be located, no question): the runner writes it as an error record. The image is
    the file `image`, or the encoded bytes `data` when the input holds the image itself (Parquet; `image` is
    None then and `where` says which row)."""

    key: str
    question_id: str | int
    image: Path | None
    prompt: str
    category: str | None = None
    where: str = ""
    error: str | None = None
    data: bytes | None = field(default=None, repr=False)  # a repr (a failing test) shows no image bytes


class ItemSource(NamedTuple):
    """An input: its kind ("directory", "text", "jsonl", "parquet"), how many records it holds, and the records
    (lazy, single pass, deterministic order)."""

    kind: str
    count: int
    items: Iterator[Item]


def caption_key(relative: str, prompt: str) -> str:
    """The resume key of an image asked `prompt` (directory and text inputs): the same folder captioned
    with two prompts into one OUT is two sets of records."""
    return json.dumps([relative, prompt], ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- detection
def detect_kind(source: Path) -> str:
    """"directory", "jsonl" (a .jsonl, or any file whose first non-blank line is a JSON object), "parquet"
    (by suffix) or "text"."""
    if source.is_dir():
        return "directory"
    if not source.exists():
        raise LlavaGgufError(f"input {source} does not exist")
    if not source.is_file():
        raise LlavaGgufError(f"input {source} is not a file or a directory")
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    for _, line in _lines(source):
        return "jsonl" if line.lstrip().startswith("{") else "text"
    raise LlavaGgufError(f"input {source} is empty")


def read_items(source: Path | str, *, prompt: str | None = None, image_folder: Path | str | None = None,
               image_column: str | None = None, question_column: str | None = None) -> ItemSource:
    """The records of `source`. `prompt`: the question where the input has none (directory, text file, a
    JSONL record without `text`, a Parquet without a question column or a row whose question is null);
    `image_folder`: where relative image paths start (default: the input file's directory);
    `image_column`/`question_column`: a Parquet's columns, when not found by name and type.
    A malformed input raises one-line LlavaGgufError here, before any record is read."""
    source = Path(source)
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise LlavaGgufError(f"--image-folder {folder} is not a directory")
    if prompt is not None and not prompt.strip():
        raise LlavaGgufError("--prompt is empty")
    columns = {"--image-column": image_column, "--question-column": question_column}
    for option, name in columns.items():
        if name is not None and not name.strip():
            raise LlavaGgufError(f"{option} is empty")
    kind = detect_kind(source)
    reader = READERS[kind]
    if kind == "parquet":
        reader = functools.partial(reader, image_column=image_column, question_column=question_column)
    elif given := [option for option, name in columns.items() if name is not None]:
        raise LlavaGgufError(f"{given[0]} is for a Parquet input; {source} is a {_KIND_NAMES[kind]}")
    count, items = reader(source, prompt, folder)
    return ItemSource(kind, count, items)


_KIND_NAMES = {"directory": "directory of images", "text": "list of image paths", "jsonl": "question JSONL"}


def _need_prompt(source: Path, prompt: str | None, what: str) -> str:
    if prompt is None:
        raise LlavaGgufError(f"{source} is {what}, which holds no questions", "give the question with --prompt")
    return prompt


# ---------------------------------------------------------------------------------------------- directory
def read_directory(source: Path, prompt: str | None, folder: Path | None) -> tuple[int, Iterator[Item]]:
    """Every image under `source` (recursive, sorted by name at each level, symlinked directories followed
    once: a loop cannot recur). Names starting with "." are skipped (macOS' `._x.jpg` are not images)."""
    question = _need_prompt(source, prompt, "a directory of images")
    count = sum(1 for _ in _walk(source))
    if count == 0:
        raise LlavaGgufError(f"no images in {source}", f"it should hold {', '.join(IMAGE_SUFFIXES)} files")

    def items() -> Iterator[Item]:
        for path, rel in _walk(source, warn_unreadable=True):
            error = None if path.exists() else f"image not found: {path} (a broken symbolic link)"
            yield Item(caption_key(rel, question), rel, None if error else path, question, None, str(path), error)

    return count, items()


def _walk(root: Path, *, warn_unreadable: bool = False) -> Iterator[tuple[Path, str]]:
    seen: set[tuple[int, int]] = set()
    st = root.stat()
    seen.add((st.st_dev, st.st_ino))
    stack: list[Iterator[tuple[Path, str]]] = [_listing(root, "", warn_unreadable)]
    while stack:  # iterative depth-first: no recursion limit on deep trees
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        path, rel = entry
        try:
            st = path.stat()
        except OSError:
            if path.is_symlink() and path.suffix.lower() in IMAGE_SUFFIXES:
                yield path, rel  # a broken link to an image: an error record, not silence
            continue
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                stack.append(_listing(path, rel + "/", warn_unreadable))
        elif stat.S_ISREG(st.st_mode) and path.suffix.lower() in IMAGE_SUFFIXES:
            yield path, rel


def _listing(directory: Path, prefix: str, warn_unreadable: bool) -> Iterator[tuple[Path, str]]:
    try:
        names = sorted(e.name for e in os.scandir(directory) if not e.name.startswith("."))
    except OSError as e:
        if warn_unreadable:
            warn(f"skipping {directory}: {e.strerror}")
        return iter(())
    return ((directory / n, prefix + n) for n in names)


# ---------------------------------------------------------------------------------------------- text list
def read_text(source: Path, prompt: str | None, folder: Path | None) -> tuple[int, Iterator[Item]]:
    """One image path a line, relative to `folder` or the file's directory; blank and `#` lines skipped."""
    question = _need_prompt(source, prompt, "a list of image paths")
    base = folder if folder is not None else source.parent
    first: dict[str, int] = {}
    for n, line in _text_paths(source):
        _check_path_line(source, n, line, base)
        if line in first:
            raise LlavaGgufError(f"{source}:{n}: {line} is listed twice (first on line {first[line]})")
        first[line] = n
    if not first:
        raise LlavaGgufError(f"{source} lists no images")
    count = len(first)
    first.clear()  # the lazy pass needs none of it

    def items() -> Iterator[Item]:
        for n, line in _text_paths(source):
            yield _located(caption_key(line, question), line, base / line, question, None, f"{source}:{n}")

    return count, items()


def _text_paths(source: Path) -> Iterator[tuple[int, str]]:
    for n, line in _lines(source):
        line = line.strip()
        if line and not line.startswith("#"):
            yield n, line


def _check_path_line(source: Path, n: int, line: str, base: Path) -> None:
    if line[0] in "{[":
        raise LlavaGgufError(f"{source}:{n}: a JSON value, not an image path",
                             "questions go one JSON object a line in a .jsonl file")
    if _CONTROL.search(line) or len(line.encode()) > _MAX_PATH_BYTES:
        raise LlavaGgufError(f"{source}:{n}: not an image path", "the file should list one image path a line")
    if Path(line).suffix.lower() not in LIST_SUFFIXES and not (base / line).is_file():
        raise LlavaGgufError(f"{source}:{n}: {line[:80]!r} is neither an image file name nor an existing file",
                             "the file should list one image path a line")


# ---------------------------------------------------------------------------------------------- JSONL
def read_jsonl(source: Path, prompt: str | None, folder: Path | None) -> tuple[int, Iterator[Item]]:
    """LLaVA's question format, one object a line: `question_id` (int or str), `image` (relative to
    `folder`, else the file's directory), `text`, optional `category`; other fields are ignored."""
    base = folder if folder is not None else source.parent
    first: dict[str, int] = {}
    for n, record in _records(source):
        key = str(record["question_id"])
        if key in first:
            raise LlavaGgufError(f"{source}:{n}: question_id {key} is already on line {first[key]}",
                                 "every question needs its own question_id")
        first[key] = n
    if not first:
        raise LlavaGgufError(f"{source} holds no questions")
    count = len(first)
    first.clear()

    def items() -> Iterator[Item]:
        for n, record in _records(source):
            yield _question(record, base, prompt, f"{source}:{n}")

    return count, items()


def _records(source: Path) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(source):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise LlavaGgufError(f"{source}:{n}: not valid JSON ({e.args[0].split(':')[0]})",
                                 "a question file holds one JSON object a line") from None
        if not isinstance(record, dict):
            raise LlavaGgufError(f"{source}:{n}: a JSON {type(record).__name__}, not an object",
                                 "a question file holds one JSON object a line")
        qid = record.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
            what = "has no question_id" if qid is None else "has a question_id that is not an integer or a string"
            raise LlavaGgufError(f"{source}:{n}: the question {what}", "LLaVA's format: question_id, image, text")
        yield n, record


def _question(record: dict, base: Path, prompt: str | None, where: str) -> Item:
    qid = record["question_id"]
    key = str(qid)
    category = record.get("category")
    category = None if category is None else str(category)
    text = record.get("text")
    problem = None
    if text is None:
        if prompt is None:
            problem = "the question has no text (give --prompt for questions without one)"
        text = prompt or ""
    elif not isinstance(text, str):
        problem, text = "the question's text is not a string", ""
    image = record.get("image")
    if problem is None and (not isinstance(image, str) or not image):
        problem = "the question names no image" if image is None else "the question's image is not a file name"
    if problem is not None:
        return Item(key, qid, None, text, category, where, problem)
    return _located(key, qid, base / image, text, category, where)


# ---------------------------------------------------------------------------------------------- Parquet
def read_parquet(source: Path, prompt: str | None, folder: Path | None, *, image_column: str | None = None,
                 question_column: str | None = None) -> tuple[int, Iterator[Item]]:
    """A Parquet file, one record a row (see llava_gguf.batch.parquet for how its columns are found): the image
    as bytes, or a path relative to `folder` else the file's directory; the question from its column, else
    `prompt`. The resume key is the question_id column's value, else the file's name, row and question."""
    table = ParquetInput.open(source, image_column=image_column, question_column=question_column)
    if table.columns.question is None and prompt is None:
        raise LlavaGgufError(f"{source} has no question column (question, text or prompt)",
                             "give the question with --prompt, or name its column with --question-column")
    base = folder if folder is not None else source.parent
    keyed = table.columns.question_id is not None

    def items() -> Iterator[Item]:
        for row in table.rows():
            yield _row_item(source, row, prompt, base, keyed)

    return table.count, items()


def _row_item(source: Path, row: Row, prompt: str | None, base: Path, keyed: bool) -> Item:
    text, problem = row.question, None
    if text is None:  # no question column, or this row's question is null
        if prompt is None:
            problem = f"row {row.index} has no question (give --prompt for rows without one)"
        text = prompt or ""
    qid = row.question_id if keyed else row.index
    key = str(qid) if keyed else caption_key(f"{source.name}#{row.index}", text)
    where = f"{source}#row={row.index}"
    if problem is None and row.data is None and not row.path:
        problem = f"row {row.index} has no image"
    if problem is None and row.data == b"":
        problem = f"row {row.index}'s image is empty (0 bytes)"
    if problem is not None:
        return Item(key, qid, None, text, row.category, where, problem)
    if row.data is not None:
        return Item(key, qid, None, text, row.category, where, data=row.data)
    return _located(key, qid, base / row.path, text, row.category, where)


# ---------------------------------------------------------------------------------------------- shared
def _located(key: str, qid: str | int, path: Path, prompt: str, category: str | None, where: str) -> Item:
    """An item whose image is checked to be a file now, so a missing one is an error record, not a stop (its
    path made absolute: what the record and every error say, in this process and on Ray alike)."""
    path = path.absolute()
    try:
        ok = path.is_file()
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        ok = False
    if ok:
        return Item(key, qid, path, prompt, category, where)
    what = "is not a file" if path.exists() else "not found"
    return Item(key, qid, None, prompt, category, where, f"image {what}: {path}")


def _lines(source: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, read a line at a time (memory flat); a BOM is dropped."""
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed by the generator's `with`
    except OSError as e:
        raise LlavaGgufError(f"cannot read {source}: {e.strerror}") from None
    with f:
        for n, raw in zip(itertools.count(1), f):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LlavaGgufError(f"{source}:{n}: not UTF-8 text") from None
            if n == 1:
                text = text.removeprefix("\ufeff")
            yield n, text.rstrip("\r\n")


Reader = Callable[[Path, "str | None", "Path | None"], "tuple[int, Iterator[Item]]"]
# One function per kind detect_kind names: (source, prompt, image folder) -> (count, lazy items). A kind with
# options of its own takes them as keywords, bound by read_items (Parquet: image_column, question_column).
READERS: dict[str, Reader] = {"directory": read_directory, "text": read_text, "jsonl": read_jsonl,
                              "parquet": read_parquet}
