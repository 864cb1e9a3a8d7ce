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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.batch.inputs import Item
from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.images import content_hash, load_image
from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.sampling import Sampling
from llava_gguf.runtime.scheduler import Done, Failed, Job, Scheduler, Text

@dataclass(frozen=True)
class Settings:
    """How to answer: the sampling table (SAMPLING_DEFAULTS where not given), sequences, system prompt, and
    whether records share prefixes (several questions about one image: prefixes copied between sequences) or
    not (a caption each: nothing worth a copy, nor a wait for one)."""

    sampling: Sampling
    parallel: int = 2
    system: str | None = None
    share_prefixes: bool = True


def _record(item: Item, model_id: str, **fields) -> dict:
    """LLaVA's answer record (question_id, prompt, text, answer_id, model_id, metadata) and ours."""
    rec = {"question_id": item.question_id, "prompt": item.prompt, "text": "", "answer_id": uuid.uuid4().hex,
           "model_id": model_id, "metadata": {}, "key": item.key,
           "image": item.where if item.image is None else str(Path(item.image).absolute())}
    if item.category is not None:
        rec["category"] = item.category
    rec.update(fields)
    return rec


def error_record(item: Item, model_id: str, message: str) -> dict:
    """The record of an item that could not be answered: `error` says why."""
    return _record(item, model_id, error=message)


def prepare(item: Item) -> tuple[Item, object, str | None, str | None]:
    """(item, image, its content hash, problem): decoded and hashed off the loop that feeds the engine."""
    if item.error is not None:
        return item, None, None, item.error
    try:
        image = load_image(item.data if item.data is not None else item.image)
        return item, image, content_hash(image), None
    except LlavaGgufError as e:
        return item, None, None, e.one_line()


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
                events.put(("item", prepare(item)))
        except BaseException as e:  # noqa: BLE001 - the input's own error (a bad line): raised by answer()
            errors.append(e)
        finally:
            events.put(("end", None))

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
                    yield error_record(item, model_id, problem)
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


class BatchRun:
    """The records of a run (an iterator), what the input is and how many records it holds; `close` frees
    what answers them (the model, or the Ray connection) when the run ends; `engine` is the model answering
    in this process (None on Ray), for its counters."""

    def __init__(self, records: Iterator[dict], kind: str, total: int, close: Callable[[], None],
                 engine: Engine | None = None) -> None:
        self.records, self.kind, self.total, self._close, self.engine = records, kind, total, close, engine

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self.records
        finally:
            self.close()

    def close(self) -> None:
        """Stop answering and free the model (also when the records were never iterated)."""
        try:
            self.records.close()
        finally:
            self._close()

    def __enter__(self) -> BatchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
