"""Multi-turn conversations: each turn renders the whole conversation from the chat template and the
model decodes only what its KV cache does not already hold (LLaVA.eval_messages), so a follow-up
question costs its own tokens, not the image and the earlier turns again."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.outputs import atomic_outputs, write_error
from llava_gguf.runtime.images import ImageInput, content_hash, load_image
from llava_gguf.runtime.prompt import Message


@dataclass
class ImageRef:
    """An image of the conversation: its pixels (normalised), where it came from, its content hash."""

    image: object  # PIL RGB image
    sha256: str
    path: str | None = None

    @classmethod
    def of(cls, image: ImageInput) -> ImageRef:
        pil = load_image(image)
        path = None
        if isinstance(image, (str, Path)) and not str(image).startswith("data:"):
            s = str(image)
            path = s[len("file://"):] if s.startswith("file://") else str(Path(s).expanduser().resolve())
        return cls(pil, content_hash(pil), path)


@dataclass
class Turn:
    role: str  # user | assistant
    text: str
    images: list[ImageRef] = field(default_factory=list)
    tokens: tuple[int, ...] | None = None  # an answer's token ids as generated (fed back unchanged)


class ChatSession:
    """`model.chat(system=None)`: ask() questions, with images, about one conversation. `model` is the LLaVA
    (model.py imports this module, so the type is not imported here: that would be a cycle)."""

    def __init__(self, model: Any, system: str | None = None, *, on_overflow: str = "error") -> None:
        if on_overflow not in ("error", "drop_oldest"):
            raise LlavaGgufError(f"on_overflow={on_overflow!r} is not 'error' or 'drop_oldest'")
        self.model = model
        self.system = system
        self.on_overflow = on_overflow
        self.turns: list[Turn] = []
        self.dropped_turns = 0

    # ------------------------------------------------------------------ state
    @property
    def history(self) -> list[dict]:
        """The conversation so far: role, text, and the images' paths and content hashes."""
        out = [{"role": "system", "text": self.system, "images": []}] if self.system else []
        for t in self.turns:
            out.append({"role": t.role, "text": t.text,
                        "images": [{"path": r.path, "sha256": r.sha256} for r in t.images]})
        return out

    def reset(self, system: str | None = ...) -> None:  # type: ignore[assignment]
        """Start the conversation again (the model's caches stay: a repeated prefix is still reused)."""
        self.turns = []
        self.dropped_turns = 0
        if system is not ...:
            self.system = system

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """A JSON transcript; images by path and content hash (images given as pixels have no path).
        Written atomically; an existing file is replaced only with `force`."""
        turns = self.history[1 if self.system else 0:]
        for t, raw in zip(turns, self.turns):
            if raw.tokens:
                t["tokens"] = list(raw.tokens)  # the answer as generated: a loaded transcript reuses the cache
        data = {"format": "llava-gguf-chat/1", "system": self.system, "turns": turns}
        try:
            payload = (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): \u-escaped, it round-trips
            payload = (json.dumps(data, indent=1) + "\n").encode("ascii")
        path = Path(path).expanduser()
        if not path.name or path.is_dir():
            raise LlavaGgufError(f"{path} is a directory", "give a file name for the transcript")
        with atomic_outputs(path.parent, [path.name], force=force) as out:
            try:
                with out.open_write(0) as f:
                    f.write(payload)
            except OSError as e:
                raise write_error(e, path) from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved transcript; each image is read from its path and must
        still have the recorded content hash."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise LlavaGgufError(f"cannot read the transcript {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise LlavaGgufError(f"{path} is not a llava-gguf chat transcript ({e.__class__.__name__})") from None
        if not isinstance(data, dict) or data.get("format") != "llava-gguf-chat/1":
            raise LlavaGgufError(f"{path} is not a llava-gguf chat transcript")
        turns = []
        raw_turns = data.get("turns", [])
        if not isinstance(raw_turns, list) or not all(isinstance(t, dict) and isinstance(t.get("images", []), list)
                                                       and all(isinstance(i, dict) for i in t.get("images", []))
                                                       for t in raw_turns):
            raise LlavaGgufError(f"{path} is not a llava-gguf chat transcript (malformed turns)")
        for t in raw_turns:
            refs = []
            for im in t.get("images", []):
                if not im.get("path"):
                    raise LlavaGgufError(f"{path}: an image of the transcript was given as pixels and has no path")
                ref = ImageRef.of(im["path"])
                if ref.sha256 != im.get("sha256"):
                    raise LlavaGgufError(f"{im['path']} has changed since the transcript was saved (content hash differs)")
                refs.append(ref)
            if t.get("role") not in ("user", "assistant"):
                raise LlavaGgufError(f"{path}: unknown role {t.get('role')!r}")
            tokens = t.get("tokens")
            ok = isinstance(tokens, list) and tokens and all(isinstance(x, int) and x >= 0 for x in tokens)
            turns.append(Turn(t["role"], str(t.get("text", "")), refs,
                              tuple(tokens) if ok and t["role"] == "assistant" else None))
        self.system = data.get("system")
        self.turns = turns
        self.dropped_turns = 0

    # ------------------------------------------------------------------ asking
    def _messages(self, turns: list[Turn]) -> tuple[list[Message], list]:
        msgs = [Message("system", self.system)] if self.system else []
        images = []
        for t in turns:
            msgs.append(Message(t.role, t.text, n_images=len(t.images), tokens=t.tokens))
            images += [r.image for r in t.images]
        return msgs, images

    def ask(self, text: str, images: Sequence[ImageInput] = (), *, stream: bool = False, **sampling):
        """Add a user turn (images before the text) and answer it: a str, or with stream=True an iterator
        of text pieces (the turn is recorded when it ends, also when it is closed early)."""
        settings = self.model.validate_sampling(**sampling)  # before any image is read (InvalidSetting)
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "size"):
            images = [images]  # one image given bare
        refs = [ImageRef.of(im) for im in images]
        pending = Turn("user", text, refs)
        turns = self._fit(self.turns + [pending], settings.max_tokens)
        msgs, pixels = self._messages(turns)
        pieces = self.model.stream_messages(msgs, pixels, **sampling)
        gen = self._record(turns, pieces)
        return gen if stream else "".join(gen)

    def _record(self, turns: list[Turn], pieces: Iterator[str]) -> Iterator[str]:
        """The turn joins the conversation when the answer ends, or when it is stopped after some of it
        was written; a turn that failed or was stopped before any answer leaves the conversation as it was."""
        answer: list[str] = []
        done = False
        stats = None
        try:
            for piece in pieces:
                if stats is None:
                    stats = self.model.last  # this answer's (another call may run before the stream ends)
                answer.append(piece)
                yield piece
            done = True
        finally:
            pieces.close()  # type: ignore[attr-defined]  # (stopped early) the answer's tokens are final now
            if done or "".join(answer).strip():
                stats = stats or self.model.last
                self.turns = turns + [Turn("assistant", "".join(answer).strip(), tokens=stats.answer_tokens or None)]

    def _fit(self, turns: list[Turn], max_tokens: int) -> list[Turn]:
        """The turns that fit the context with room for a short answer, dropping the oldest ones when
        allowed; an error (with the numbers) otherwise."""
        n_ctx = self.model.n_ctx
        dropped = 0
        while True:
            msgs, pixels = self._messages(turns)
            need = self.model.count_prompt(msgs, pixels)
            if need + min(max_tokens, 16) <= n_ctx:
                self.dropped_turns += dropped
                return turns
            if self.on_overflow == "drop_oldest" and len(turns) > 1:
                cut = 2 if len(turns) > 2 and turns[1].role == "assistant" else 1
                turns = turns[cut:]
                dropped += cut
                continue
            raise LlavaGgufError(f"the conversation needs {need} tokens (and room to answer) but the context "
                                 f"holds {n_ctx}", "reset it, start the model with a larger n_ctx, or use "
                                 "on_overflow='drop_oldest'")
