"""The scheduler `serve` and `batch` run an engine with: one thread owns the engine (nothing native is touched
from another thread) and runs llama-server's loop over it — admit queued requests into free sequences
(Engine.acquire: the one whose cache the prompt continues, else an empty one, else the least recently used; a
longer prefix held by another sequence is copied in by the engine), then one engine.step() for every sequence
at once (prompt chunks and one token per generating sequence in one llama_decode), then hand each sequence's
new token to its request as text. A request whose prompt starts with what another sequence is still decoding
(the same image, asked about again) waits for it and has it copied, rather than decoding it a second time.

Requests talk to it through Job: submit() queues one (QueueFull past `queue` waiting), job.cancel() stops it
(a client gone: its sequence's cells are freed), and the scheduler calls job.emit(event) from its thread with
Started, Text, Done or Failed — the caller moves them to its own thread (asyncio: call_soon_threadsafe)."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.kvcache import reusable_prefix
from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.prompter import Prompter
from llava_gguf.runtime.sampling import Sampling
from llava_gguf.runtime.segments import positions
from llava_gguf.runtime.slots import Slot
from llava_gguf.runtime.text import AnswerText


class QueueFull(Exception):
    """Every sequence is busy and `queue` requests already wait."""


@dataclass(frozen=True)
class Started:
    """The prompt is in the sequence's cache or on its way: `cached` of its positions were reused."""

    prompt_tokens: int
    cached: int
    images: int
    images_encoded: int


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length
    prompt_tokens: int
    cached: int
    completion_tokens: int
    prompt_seconds: float  # from admission to the first token (the prompt's decode, images included)
    generate_seconds: float  # from the first token to the last


@dataclass(frozen=True)
class Failed:
    """The request cannot be served: `kind` says how (bad_request, context_length_exceeded, grammar, internal)."""

    message: str
    kind: str
    prompt_tokens: int = 0  # context_length_exceeded: what the prompt needs and what a sequence holds
    n_ctx: int = 0


Event = Started | Text | Done | Failed


@dataclass(eq=False)
class Job:
    """One chat completion: what to answer and where its events go."""

    messages: Sequence[Message]
    images: Sequence[object]
    sampling: Sampling
    emit: Callable[[Event], None]
    grammar: str | None = None
    cancelled: bool = False
    want: list | None = None  # the prompt's positions, once tokenized (for deferring, see _coming)
    # set by the scheduler
    slot: Slot | None = None
    text: AnswerText | None = None
    started: Started | None = None
    generated: int = 0
    t_admit: float = 0.0
    t_first: float | None = None
    t_last: float = 0.0
    waker: Callable[[], None] = field(default=lambda: None, repr=False)

    def cancel(self) -> None:
        """Stop this request (from any thread): it leaves the queue, or its sequence is freed."""
        self.cancelled = True
        self.waker()


@dataclass
class Counters:
    """For /metrics: totals since the start."""

    requests: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0  # queue full
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Scheduler:
    """See the module docstring. `queue`: requests that may wait for a sequence."""

    def __init__(self, engine: Engine, *, queue: int = 16) -> None:
        self.engine = engine
        self.prompter = Prompter(engine)
        self.queue_max = queue
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.counters = Counters()
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llava-gguf-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ from other threads
    def submit(self, job: Job) -> Job:
        with self.cv:
            if not self.has_room():  # the waiting take the free sequences first
                self.counters.requests_rejected += 1
                raise QueueFull
            job.waker = self._wake
            self.waiting.append(job)
            self.counters.requests += 1
            self.cv.notify()
        return job

    def _wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def shutdown(self) -> None:
        """Start stopping, without waiting: every request still queued or answering gets Failed ("the server
        is shutting down") from the thread, so open streams end with an error event and [DONE]."""
        with self.cv:
            self.stopping = True
            self.cv.notify()

    def stop(self, timeout: float = 30) -> bool:
        """shutdown() and wait for the thread; False if it is still running (in a long native call): the
        engine must not be closed under it then."""
        self.shutdown()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def has_room(self) -> bool:
        """Whether a request submitted now would be queued (cheap, before its body is read)."""
        free = sum(1 for s in self.engine.slots if not s.in_use)
        return not self.stopping and len(self.waiting) < self.queue_max + free

    def snapshot(self) -> dict:
        """Queue depth and each sequence's state, for /metrics and /health (read without the engine)."""
        states = []
        for s in self.engine.slots:
            state = "idle" if not s.in_use else "prompt" if s.pending else "generating" if s.generating else "busy"
            states.append((s.seq, state, len(s.held)))
        return {"queue": len(self.waiting), "slots": states}

    # ------------------------------------------------------------------ the loop (its own thread)
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.stopping or self.waiting or self.active):
                    self.cv.wait()
                if self.stopping:
                    break
            try:
                self._reap()
                self._admit()
                if self.active:
                    self.engine.step()
                    self._collect()
            except LlavaGgufError as e:  # a decode failed: the sequences in it lost their work
                for job in list(self.active):
                    self._fail(job, e.one_line(), "internal")
            except Exception as e:  # noqa: BLE001 - the loop must outlive a bug in one request
                for job in list(self.active):
                    self._fail(job, f"internal error: {type(e).__name__}: {str(e)[:200]}", "internal")
        for job in list(self.active) + list(self.waiting):
            self._fail(job, "the server is shutting down", "unavailable")

    def _reap(self) -> None:
        with self.cv:
            gone = [j for j in self.waiting if j.cancelled]
            for j in gone:
                self.waiting.remove(j)
        for job in [j for j in self.active if j.cancelled]:
            self.active.remove(job)
            self.engine.release(job.slot)  # the client is gone: its cells are freed
            self.counters.requests_cancelled += 1
        self.counters.requests_cancelled += len(gone)

    def _admit(self) -> None:
        with self.cv:
            queued = list(self.waiting)
        for job in queued:
            if not any(not s.in_use for s in self.engine.slots):
                return
            if job.cancelled or (job.want is not None and self._coming(job.want)):
                continue  # cancelled: _reap drops it; coming: admitted once the prefix is decoded
            with self.cv:
                self.waiting.remove(job)
            try:
                if not self._start(job):
                    with self.cv:
                        self.waiting.appendleft(job)
            except Exception as e:  # noqa: BLE001 - one request's bug must not stop the others
                if job.slot is not None and job not in self.active:
                    self.engine.release(job.slot)
                self._fail(job, f"internal error: {type(e).__name__}: {str(e)[:200]}", "internal")

    def _coming(self, want: list) -> bool:
        """Whether a longer prefix of `want` than any sequence holds is in another sequence's pending work (an
        image an earlier request is decoding): then the request waits and copies it, instead of decoding it
        again (the pending work is decoded by the next steps, so the wait ends)."""
        if not self.engine.shares:
            return False  # prompts that share nothing: no copies, so nothing is worth waiting for
        now = max((reusable_prefix(s.held, want) for s in self.engine.slots if s.held), default=0)
        later = max((reusable_prefix(s.future(), want) for s in self.engine.slots if s.in_use and s.pending),
                    default=0)
        return later > now

    def _start(self, job: Job) -> bool:
        """Admit the job (True; or fail it: also True), or False: what its prompt starts with is still being
        decoded for another request — it goes back to the queue."""
        job.t_admit = time.perf_counter()
        try:
            chunks, segments = self.prompter.prompt(list(job.messages), list(job.images))
        except LlavaGgufError as e:
            self._fail(job, e.one_line(), "bad_request")
            return True
        with chunks:
            want = job.want = positions(segments)
            n_ctx = self.engine.n_ctx
            if len(want) >= n_ctx:
                n_img = len(want) - sum(1 for x in want if isinstance(x, int))
                self._fail(job, f"the prompt needs {len(want)} tokens ({n_img} for images) but the context holds "
                                f"{n_ctx} per conversation", "context_length_exceeded", len(want), n_ctx)
                return True
            if self._coming(want):
                return False
            slot = job.slot = self.engine.acquire(want)
            try:
                report = self.engine.load(slot, segments)
                s = job.sampling
                self.engine.generate(slot, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                     repeat_penalty=s.repeat_penalty, seed=s.seed, grammar=job.grammar)
            except LlavaGgufError as e:
                self.engine.release(slot)
                job.slot = None
                self._fail(job, e.one_line(), "grammar" if "grammar" in e.message else "bad_request")
                return True
        job.text = AnswerText(job.sampling.stop)
        job.started = Started(report.positions, report.reused, report.images, report.images_encoded)  # copied included
        self.active.append(job)
        self.counters.prompt_tokens += report.positions
        self.counters.cached_tokens += job.started.cached
        self._emit(job, job.started)
        return True

    def _collect(self) -> None:
        """Each generating sequence's new token as text; finished answers end their request."""
        model = self.engine.model
        for job in list(self.active):
            if job.cancelled:
                continue
            token = self.engine.take(job.slot)
            if token is None:
                continue
            now = time.perf_counter()
            if job.t_first is None:
                job.t_first = now
            job.t_last = now
            if model.is_eog(token):
                self._finish(job, "stop")
                continue
            job.generated += 1
            self.counters.completion_tokens += 1
            for piece in job.text.add(model.piece(token, special=False)):
                if piece:
                    self._emit(job, Text(piece))
            if job.text.stopped:
                self._finish(job, "stop")
            elif job.generated >= job.sampling.max_tokens or len(job.slot.held) >= self.engine.n_ctx - 1:
                self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        rest = job.text.flush()
        if rest:
            self._emit(job, Text(rest))
        self.active.remove(job)
        # the sequence keeps its cells (prompt and answer): a follow-up, or another client with the same
        # prefix, reuses them
        self.engine.release(job.slot, keep=True)
        st = job.started
        t_first = job.t_first or job.t_last
        self._emit(job, Done(reason, st.prompt_tokens, st.cached, job.generated, t_first - job.t_admit,
                             job.t_last - t_first))

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # noqa: BLE001 - the request's side is gone (its event loop closed): it is cancelled
            job.cancelled = True

    def _fail(self, job: Job, message: str, kind: str, prompt_tokens: int = 0, n_ctx: int = 0) -> None:
        if job in self.active:
            self.active.remove(job)
            if not self.engine.closed:
                self.engine.release(job.slot)
        self.counters.requests_failed += 1
        self._emit(job, Failed(message, kind, prompt_tokens, n_ctx))
