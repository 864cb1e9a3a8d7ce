"""The engine: one model, its mmproj (libmtmd), ONE llama context holding several sequences (each its own KV
cache: see native Context), the image-embedding cache they share, and what each holds.
As llama-server's update_slots does, `step()` gathers the pending work of every sequence — prompt chunks,
and one token per generating sequence whose last token its owner has taken — into ONE llama_decode, then
samples each generating sequence's next token. Image rows are embeddings, which a token batch cannot
carry: they are decoded before it, in batches of their own. A sequence given a prompt keeps the longest
prefix its own cache shares with it, or has a longer prefix another sequence holds copied in
(llama_memory_seq_cp: a copy of cells, nothing computed) — a prompt prefix is decoded once per engine.
Use: slot = engine.acquire(); chunks, segments = engine.tokenize(text, images); with chunks:
engine.load(slot, segments); engine.generate(slot, ...); engine.next_token(slot) (or step() + take(slot)
for every sequence, as a server loop does) until done; engine.finish(slot); engine.release(slot).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llava_gguf.errors import InvalidSetting, LlavaGgufError
from llava_gguf.native import library
from llava_gguf.native.llama import LLAMA_DEFAULT_SEED, Batch, Context, DecodeError, Model, Sampler
from llava_gguf.native.mtmd import Chunk, Chunks, Vision
from llava_gguf.runtime.images import ImageInput
from llava_gguf.runtime.kvcache import Position, best_donor, pick_free, reusable_prefix
from llava_gguf.runtime.loading import ModelFiles, check_files, context_size, room_hint
from llava_gguf.runtime.prompt import IMAGE_PLACEHOLDER
from llava_gguf.runtime.resources import thread_count
from llava_gguf.runtime.sampling import is_int
from llava_gguf.runtime.segments import ImageSegment, Segment, TextSegment, positions, tail
from llava_gguf.runtime.slots import (EngineStats, ImageWork, LoadReport, Sampled, Slot, StepResult, TextWork)
from llava_gguf.runtime.vision import ImageSide

RAW_ROWS = "embeddings"  # the tag of rows decoded as given (eval_embeddings): never equal to an image hash


class Engine:
    """See the module docstring. `n_ctx`: positions each sequence can hold (the context has n_ctx x
    n_seq_max cells, n_ctx for each sequence). Build with Engine.open(paths) or from checked ModelFiles."""

    def __init__(self, files: ModelFiles, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 n_seq_max: int = 1, verbose: bool = False, hint: str = "pass a larger n_ctx (--ctx)",
                 share_prefixes: bool = True) -> None:
        self.files, self.verbose, self.room_hint = files, verbose, hint
        self.shares = share_prefixes  # False: no prefix copied between sequences (see open)
        self.libs = library.configure()
        library.quiet_logs(verbose)
        self.model: Model | None = None
        self.ctx: Context | None = None
        self.images: ImageSide | None = None
        try:
            self._build(n_ctx, n_threads, n_gpu_layers, n_seq_max)
        except BaseException:
            self.close()
            raise
        self.n_ctx = min(n_ctx, self.ctx.n_ctx)
        self.slots = [Slot(i) for i in range(n_seq_max)]
        self.batch = Batch(self.ctx.n_batch)
        self.rows_batch = Batch(self.ctx.n_batch, self.model.n_embd)
        ids = self.model.tokenize(IMAGE_PLACEHOLDER.encode(), add_bos=False, special=True)
        self.image_token = ids[0] if len(ids) == 1 else 0  # what image positions show as token ids
        self.serial = 0  # llama_decode calls so far: logits of an older decode are gone from the context
        self.stats, self.acquisitions = EngineStats(), 0

    def _build(self, n_ctx: int, n_threads: int, n_gpu_layers: int, n_seq_max: int) -> None:
        """The model, then the llama context and libmtmd's context at once: both only read the model and
        spend about a second each in native code (the KV cache; the mmproj's weights), without the GIL."""
        files = self.files
        try:
            self.model = Model(files.model_path, n_gpu_layers=n_gpu_layers)
            with ThreadPoolExecutor(1) as pool:
                vision = pool.submit(Vision, files.mmproj_path, self.model, n_threads=n_threads,
                                     use_gpu=n_gpu_layers != 0, verbose=self.verbose)
                try:
                    self.ctx = Context(self.model, n_ctx=n_ctx * n_seq_max, n_threads=n_threads, n_seq_max=n_seq_max)
                finally:  # libmtmd's context is kept whatever happened here, for close() to free
                    if vision.exception() is None:
                        self.images = ImageSide(vision.result(), files.anyres)
        except Exception as e:  # noqa: BLE001 - llama.cpp's refusal (NULL), said in one line
            raise LlavaGgufError(f"llama.cpp could not load {files.model_path}: "
                                 f"{' '.join(str(e).split())[:300] or type(e).__name__}") from None
        if self.images is None:
            raise LlavaGgufError(f"libmtmd could not load {files.mmproj_path}",
                                 "run with --verbose for llama.cpp's log")

    @classmethod
    def open(cls, model_path: str | Path, mmproj_path: str | Path, *, n_seq_max: int = 1, n_ctx: int | None = None,
             n_threads: int | None = None, n_gpu_layers: int = 0, verbose: bool = False,
             share_prefixes: bool = True) -> Engine:
        """An engine for an LLM and its mmproj, checked as LLaVA checks them; n_ctx per sequence. share_prefixes=False:
        no prefix is copied between sequences (nor waited for: see Scheduler), for prompts that share nothing."""
        if not is_int(n_seq_max) or not 1 <= n_seq_max <= 256:  # llama.cpp's LLAMA_MAX_SEQ
            raise InvalidSetting(f"n_seq_max must be an integer from 1 to 256, not {n_seq_max!r}")
        files = check_files(Path(model_path), Path(mmproj_path))
        size = context_size(files.llm_info, n_ctx, files.image_tokens, check=not n_gpu_layers, sequences=n_seq_max,
                            stacklevel=3)
        return cls(files, n_ctx=size.n_ctx, n_threads=thread_count(n_threads), n_gpu_layers=n_gpu_layers,
                   n_seq_max=n_seq_max, verbose=verbose, hint=room_hint(files.llm_info, size), share_prefixes=share_prefixes)

    # ------------------------------------------------------------------ lifecycle
    closed = property(lambda self: self.ctx is None)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown
            self.close()

    def close(self) -> None:
        """Free everything native (the mtmd and llama contexts before the model they use)."""
        for slot in getattr(self, "slots", []):
            self.finish(slot)
        if self.images is not None:
            self.images.cache.clear()
        for part in (getattr(self, "batch", None), getattr(self, "rows_batch", None),
                     self.images and self.images.vision, self.ctx, self.model):
            if part is not None:
                part.close()
        self.ctx = self.model = None

    # ------------------------------------------------------------------ sequences
    def acquire(self, want: Sequence[Position] = ()) -> Slot:
        """A free sequence for the prompt `want` (positions), as kvcache.pick_free chooses: one whose whole cache
        it continues, else an empty one, else the least recently used (a released sequence may hold cells)."""
        free = {s.seq: (s.held, s.used) for s in self.slots if not s.in_use}
        if not free:
            raise LlavaGgufError(f"all {len(self.slots)} sequences of the engine are in use")
        slot = self.slots[pick_free(free, want)]
        self.acquisitions += 1
        slot.in_use, slot.used = True, self.acquisitions
        return slot

    def release(self, slot: Slot, keep: bool = False) -> None:
        """The sequence is free again; its cache emptied, or with `keep` left for later prompts to reuse."""
        self.finish(slot) if keep else self.clear(slot)
        slot.pending.clear()
        slot.in_use = False

    def clear(self, slot: Slot) -> None:
        """Forget what the sequence holds (the embedding cache stays)."""
        self.finish(slot)
        slot.pending.clear()
        if self.ctx is not None:
            self.ctx.seq_rm(slot.seq, 0, -1)
        slot.held = []
        slot.logits, slot.logits_serial = None, -1

    def held_ids(self, slot: Slot) -> list[int]:
        """The sequence's positions as token ids (image rows show the <image> token's id)."""
        return [x if isinstance(x, int) else self.image_token for x in slot.held]

    def logits(self, slot: Slot) -> np.ndarray:
        """The logits of the last position decoded for the sequence."""
        if slot.logits is None:
            raise LlavaGgufError("nothing has been decoded yet")
        return slot.logits.copy()

    # ------------------------------------------------------------------ prompts
    def tokenize(self, text: str, images: Sequence[ImageInput] = (), add_special: bool = True
                 ) -> tuple[Chunks, list[Segment]]:
        """libmtmd's chunks and the segments of `text` (IMAGE_PLACEHOLDER where each image goes). The caller
        closes the chunks once the segments are loaded."""
        return self.images.tokenize(text, images, add_special)

    def load(self, slot: Slot, segments: list[Segment]) -> LoadReport:
        """Make the sequence hold exactly this prompt: keep what its cache shares with it, or copy a longer
        prefix from another sequence; the rest is pending work for the next steps (image rows computed
        now, from the embedding cache when there). The last position is always decoded again."""
        want = positions(segments)
        image_rows = [seg.n for seg in segments if isinstance(seg, ImageSegment)]
        if len(want) >= self.n_ctx:
            raise LlavaGgufError(f"the prompt needs {len(want)} tokens ({sum(image_rows)} for images) but the context "
                                 f"holds {self.n_ctx}", self.room_hint)
        self.finish(slot)
        slot.pending.clear()
        own = reusable_prefix(slot.held, want)
        donor, shared = best_donor(want, {s.seq: s.held for s in self.slots if s is not slot and s.held and self.shares})
        copied = 0
        if donor is not None and shared > own:
            self.ctx.seq_rm(slot.seq, 0, -1)
            self.ctx.seq_cp(donor, slot.seq, 0, shared)
            p = copied = shared
        else:
            self.ctx.seq_rm(slot.seq, own, -1)
            p, donor = own, None
        slot.held = list(want[:p])
        slot.logits, slot.logits_serial = None, -1
        encoded = 0
        for seg in tail(segments, p):
            if isinstance(seg, TextSegment):
                slot.pending.append(TextWork(list(seg.tokens)))
            else:
                rows, new = self.images.rows(seg)
                encoded += new
                slot.pending.append(ImageWork(seg.digest, rows))
        self.stats.reused += p - copied
        self.stats.copied += copied
        self.stats.images_encoded += encoded
        return LoadReport(len(want), p, copied, donor, len(want) - p, len(image_rows), encoded)

    def _check_room(self, slot: Slot, n: int) -> None:
        """Room for n more positions (decoding directly ends a generation: its last token is not held)."""
        self.finish(slot)
        if len(slot.held) + slot.n_pending + n > self.n_ctx:
            raise LlavaGgufError(f"the prompt needs {len(slot.held) + slot.n_pending + n} tokens but the context "
                                 f"holds {self.n_ctx}", self.room_hint)

    def decode_tokens(self, slot: Slot, tokens: Sequence[int]) -> None:
        """Decode tokens after what the sequence holds (now, stepping the engine)."""
        self._check_room(slot, len(tokens))
        if tokens:
            self.ctx.seq_rm(slot.seq, len(slot.held) + slot.n_pending, -1)
            slot.pending.append(TextWork([int(t) for t in tokens]))
            self.run(slot)

    def decode_rows(self, slot: Slot, rows: np.ndarray, tag: str = RAW_ROWS) -> None:
        """Decode embedding rows (n, n_embd) after what the sequence holds; its positions are (tag, k)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._check_room(slot, len(rows))
        self.ctx.seq_rm(slot.seq, len(slot.held) + slot.n_pending, -1)
        slot.pending.append(ImageWork(tag, rows))
        self.run(slot)

    def eval_chunk(self, slot: Slot, chunk: Chunk) -> None:
        """libmtmd's own evaluation of an image chunk after what the sequence holds."""
        self.run(slot)
        self._check_room(slot, chunk.n_tokens)
        start = len(slot.held)
        self.ctx.seq_rm(slot.seq, start, -1)
        rc, end = self.images.vision.eval_chunk(self.ctx, chunk, start, slot.seq)
        self.serial += 1
        if rc != 0:
            self.ctx.seq_rm(slot.seq, start, -1)
            raise LlavaGgufError(f"libmtmd failed to evaluate the image (code {rc})")
        slot.held += [(RAW_ROWS, k) for k in range(end - start)]
        self.stats.decoded += end - start

    def run(self, slot: Slot) -> None:
        """Step until the sequence's prompt work is decoded (other sequences' work goes along)."""
        while slot.pending:
            self.step()

    # ------------------------------------------------------------------ generation
    def generate(self, slot: Slot, *, temperature: float, top_k: int, top_p: float, min_p: float,
                 repeat_penalty: float, seed: int | None, grammar: str | None = None) -> None:
        """Start sampling the sequence's answer after its prompt (llama-cpp-python's sampler chain, see
        native/llama.py; seed None: random; grammar: GBNF the answer must follow)."""
        self.finish(slot)
        slot.sampler = Sampler(self.model, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repeat_penalty=repeat_penalty, seed=LLAMA_DEFAULT_SEED if seed is None else seed,
                               grammar=grammar)
        slot.want_sample, slot.generated = True, 0

    def _redecode_last(self, slot: Slot) -> None:
        """The context no longer has the sequence's logits: its last position is decoded again (as
        llama-cpp-python does for a prompt it holds but did not just decode)."""
        last = slot.held[-1] if slot.held else None
        rows = self.images.cache.get(last[0]) if isinstance(last, tuple) else None
        if last is None or (isinstance(last, tuple) and rows is None):
            self.finish(slot)
            raise LlavaGgufError("nothing to generate from: the sequence holds no prompt that can be decoded again")
        slot.held.pop()
        self.ctx.seq_rm(slot.seq, len(slot.held), -1)
        slot.pending.append(TextWork([last]) if rows is None else ImageWork(last[0], rows[:last[1] + 1], done=last[1]))

    def next_token(self, slot: Slot) -> int:
        """The sequence's next token: steps the engine until it is sampled. Taking it lets the next step
        decode it (unless finish() comes first)."""
        if not slot.generating:
            raise LlavaGgufError("the sequence is not generating")
        while slot.next_token is None or slot.taken:
            result = self.step()
            if not result.decoded and not result.sampled:  # pragma: no cover - a bookkeeping bug
                raise LlavaGgufError("internal error: the engine has no work for a generating sequence")
        return self.take(slot)

    def take(self, slot: Slot) -> int | None:
        """The token sampled for the sequence since it last took one (None: not sampled yet); for callers
        that run step() themselves, as a server's loop does."""
        if slot.next_token is None or slot.taken:
            return None
        slot.taken = True
        return slot.next_token

    def finish(self, slot: Slot) -> None:
        """Stop generating (a sampled token not decoded yet stays undecoded)."""
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler, slot.next_token, slot.want_sample, slot.taken = None, None, False, False

    def step(self) -> StepResult:
        """One round of work for every sequence (see the module docstring)."""
        sampled: list[Sampled] = []
        done: list[int] = []
        decoded, active = 0, [s for s in self.slots if s.in_use]
        continuing = [s for s in active if s.next_token is not None and s.taken]
        for s in active:  # a prompt decoded earlier: sampled from its logits if still the context's latest
            if s.want_sample and s.next_token is None and not s.pending:
                if s.logits_serial == self.serial:
                    sampled.append(self._sample(s, s.logits_row))
                else:
                    self._redecode_last(s)
        for s in active:
            while s.pending and isinstance(s.pending[0], ImageWork):
                decoded += self._decode_rows(s)
                if not s.pending:
                    done.append(s.seq)
                    if s.want_sample:
                        sampled.append(self._sample(s, s.logits_row))
        batch, entries = self.batch, []
        batch.clear()
        for s in continuing:
            entries.append((s, [s.next_token], batch.add(s.next_token, len(s.held), s.seq, True), False))
        for s in active:
            room = batch.capacity - len(batch)
            if room <= 0 or not s.pending or not isinstance(s.pending[0], TextWork):
                continue
            work = s.pending[0]
            take = work.tokens[:room]
            last = len(take) == len(work.tokens) and len(s.pending) == 1
            for j, t in enumerate(take):
                row = batch.add(t, len(s.held) + j, s.seq, last and j == len(take) - 1)
            entries.append((s, take, row, last))
        if entries:
            self._decode(batch, entries)
            decoded += len(batch)
            for s, tokens, row, completes in entries:
                s.held += tokens
                if s in continuing:
                    s.next_token, s.taken = None, False
                else:
                    work = s.pending[0]
                    del work.tokens[:len(tokens)]
                    if not work.tokens:
                        s.pending.popleft()
                if s in continuing or completes:
                    self._keep_logits(s, row)
                    if completes:
                        done.append(s.seq)
                    if s.want_sample:
                        sampled.append(self._sample(s, row))
        return StepResult(tuple(e[0].seq for e in entries), decoded, tuple(done), tuple(sampled))

    # ------------------------------------------------------------------ decoding
    def _decode(self, batch: Batch, entries: list) -> None:
        try:
            self.ctx.decode(batch)
        except DecodeError as e:
            prompt = any(s.pending for s, *_ in entries)
            for s, *_ in entries:  # what this decode may have written is forgotten
                self.ctx.seq_rm(s.seq, len(s.held), -1)
                s.pending.clear()
                self.finish(s)
            raise LlavaGgufError(f"llama.cpp failed to decode{' the prompt' if prompt else ''}: {e}") from None
        finally:
            self.serial += 1
            self.stats.decode_calls += 1
        self.stats.decoded += len(batch)

    def _decode_rows(self, s: Slot) -> int:
        """The image rows at the head of the sequence's work, in batches of n_batch rows."""
        work, batch, n = s.pending[0], self.rows_batch, 0
        while work.done < len(work.rows):
            part = work.rows[work.done:work.done + batch.capacity]
            final = work.done + len(part) == len(work.rows) and len(s.pending) == 1
            batch.set_rows(part, len(s.held), s.seq, logits_last=final)
            try:
                self.ctx.decode(batch)
            except DecodeError:
                self.ctx.seq_rm(s.seq, len(s.held), -1)
                s.pending.clear()
                self.finish(s)
                raise LlavaGgufError("llama.cpp failed to decode the image embeddings") from None
            finally:
                self.serial += 1
                self.stats.decode_calls += 1
            s.held += [(work.tag, work.done + j) for j in range(len(part))]
            work.done += len(part)
            n += len(part)
            if final:
                self._keep_logits(s, len(part) - 1)
        s.pending.popleft()
        self.stats.decoded += n
        return n

    def _keep_logits(self, s: Slot, row: int) -> None:
        s.logits, s.logits_row, s.logits_serial = self.ctx.logits(row), row, self.serial

    def _sample(self, s: Slot, row: int) -> Sampled:
        token = s.sampler.sample(self.ctx, row)
        s.next_token, s.taken = token, False
        s.generated += 1
        return Sampled(s.seq, token, self.model.is_eog(token))
