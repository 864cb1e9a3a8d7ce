"""`llava-gguf batch` in one process: one model load, images read ahead in a background thread, several
records answered at once through the engine's scheduler (one llama_decode per step for every sequence), and
questions about one image sharing its prefill (the scheduler copies the image's cells to the next question).
Records come back as they finish, in LLaVA's answer format plus ours; a record that cannot be answered (an
unreadable image, a prompt over the context) is a record with an `error`, and the run goes on."""
from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.batch.inputs import Item, read_items
from llava_gguf.errors import InvalidSetting, LlavaGgufError
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.images import content_hash, load_image
from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.sampling import Sampling, check_text, is_int, sampling_settings
from llava_gguf.runtime.scheduler import Done, Failed, Job, Scheduler, Text

@dataclass(frozen=True)
class Settings:
    """How to answer: the sampling table (SAMPLING_DEFAULTS where not given), sequences, system prompt."""

    sampling: Sampling
    parallel: int = 2
    system: str | None = None


def _record(item: Item, model_id: str, **fields) -> dict:
    """LLaVA's answer record (question_id, prompt, text, answer_id, model_id, metadata) and ours."""
    rec = {"question_id": item.question_id, "prompt": item.prompt, "text": "", "answer_id": uuid.uuid4().hex,
           "model_id": model_id, "metadata": {}, "key": item.key,
           "image": None if item.image is None else str(item.image)}
    if item.category is not None:
        rec["category"] = item.category
    rec.update(fields)
    return rec


class _Flight:
    """A record in flight: its item, image hash, the text so far, and when it started."""

    def __init__(self, item: Item, sha256: str) -> None:
        self.item, self.sha256, self.text, self.t0 = item, sha256, [], time.perf_counter()


def answer(engine: Engine, items: Iterable[Item], settings: Settings, *, model_id: str,
           read_ahead: int | None = None) -> Iterator[dict]:
    """One record per item, as each finishes (not in input order). `read_ahead`: images decoded ahead of the
    engine (bounded: memory stays flat over any number of items)."""
    scheduler = Scheduler(engine, queue=1 << 30)
    events: queue.Queue = queue.Queue()
    ahead = threading.Semaphore(read_ahead or settings.parallel * 2 + 2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                ahead.acquire()
                events.put(("item", _prepare(item)))
        except BaseException as e:  # noqa: BLE001 - the input's own error (a bad line): raised by answer()
            errors.append(e)
        finally:
            events.put(("end", None))

    def _prepare(item: Item):
        """(item, image, its content hash, problem): decoded and hashed here, off the loop that feeds the engine."""
        if item.error is not None:
            return item, None, None, item.error
        try:
            image = load_image(item.image)
            return item, image, content_hash(image), None
        except LlavaGgufError as e:
            return item, None, None, e.one_line()

    thread = threading.Thread(target=reader, name="llava-gguf-batch-reader", daemon=True)
    thread.start()
    flights: dict[int, _Flight] = {}
    ids = iter(range(1 << 62))
    reading = True
    try:
        while reading or flights:
            kind, value = events.get()
            if kind == "end":
                reading = False
                if errors:
                    raise errors[0]
            elif kind == "item":
                item, image, sha256, problem = value
                if problem is not None:
                    ahead.release()
                    yield _record(item, model_id, error=problem)
                    continue
                n = next(ids)
                flights[n] = _Flight(item, sha256)
                messages = ([Message("system", settings.system)] if settings.system else []) + \
                    [Message("user", item.prompt, n_images=1)]
                scheduler.submit(Job(messages, [image], settings.sampling,
                                     emit=lambda ev, n=n: events.put(("event", (n, ev)))))
            else:
                n, ev = value
                flight = flights.get(n)
                if isinstance(ev, Text):
                    flight.text.append(ev.text)
                elif isinstance(ev, (Done, Failed)):
                    del flights[n]
                    ahead.release()
                    yield _finished(flight, ev, model_id)
    finally:
        stop.set()
        for _ in range(len(flights) + 2):
            ahead.release()  # the reader is not left waiting
        scheduler.stop()


def _finished(flight: _Flight, ev, model_id: str) -> dict:
    item = flight.item
    if isinstance(ev, Failed):
        return _record(item, model_id, image_sha256=flight.sha256, error=ev.message)
    return _record(item, model_id, text="".join(flight.text), image_sha256=flight.sha256,
                   finish_reason=ev.finish_reason,
                   tokens={"prompt": ev.prompt_tokens, "cached": ev.cached, "completion": ev.completion_tokens},
                   timings={"prompt_s": round(ev.prompt_seconds, 4), "generate_s": round(ev.generate_seconds, 4),
                            "total_s": round(time.perf_counter() - flight.t0, 4)})


def model_id_of(llm: Path) -> str:
    """The `model_id` LLaVA's scoring scripts see: the LLM file's stem."""
    return llm.stem


def run(path: str | Path, source: str | Path, *, prompt: str | None = None, image_folder: str | Path | None = None,
        system: str | None = None, parallel: int = 2, sampling: Sampling | None = None, threads: int | None = None,
        n_ctx: int | None = None, llm: str | Path | None = None, mmproj: str | Path | None = None,
        skip: Collection[str] = (), verbose: bool = False) -> BatchRun:
    """`llava_gguf.batch.run(...)`: the model at `path` (what `chat` takes) answering every record of `source`
    (a directory of images, a text file of image paths, or LLaVA's question JSONL) whose key is not in `skip`
    (looked up as records are read: a set filled after this call, e.g. from the output's keys, counts).
    Everything is checked now (one-line LlavaGgufError); iterate the result for records, as they finish."""
    if not is_int(parallel) or not 1 <= parallel <= 64:
        raise InvalidSetting(f"--parallel must be from 1 to 64, not {parallel!r}")
    if system is not None:
        check_text(system, "the system prompt")
    if prompt is not None:
        check_text(prompt, "the prompt")
    settings = Settings(sampling or sampling_settings(), parallel, system)
    found = read_items(Path(source), prompt=prompt, image_folder=image_folder)
    llm_path, mmproj_path = locate_pair(path, llm, mmproj)
    engine = Engine.open(llm_path, mmproj_path, n_seq_max=parallel, n_ctx=n_ctx, n_threads=threads, verbose=verbose)
    items = (it for it in found.items if it.key not in skip)
    return BatchRun(engine, answer(engine, items, settings, model_id=model_id_of(llm_path)), found.kind, found.count)


class BatchRun:
    """The records of a run (an iterator), what the input is, and its engine (closed when the run ends)."""

    def __init__(self, engine: Engine, records: Iterator[dict], kind: str, total: int) -> None:
        self.engine, self.records, self.kind, self.total = engine, records, kind, total

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self.records
        finally:
            self.close()

    def close(self) -> None:
        """Stop answering and free the model (also when the records were never iterated)."""
        self.records.close()
        self.engine.close()

    def __enter__(self) -> BatchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
