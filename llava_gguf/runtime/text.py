"""An answer's text as it streams: token bytes joined into whole UTF-8 characters, the leading space a
SentencePiece answer starts with dropped, and stop strings cut (text that could be the start of a stop
string is held back until it cannot). Pure: it sees bytes, not tokens."""
from __future__ import annotations


def complete_utf8(buf: bytes | bytearray) -> bool:
    """False while the buffer ends inside a multi-byte UTF-8 sequence."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back >= need
    return True


class AnswerText:
    """Feed each generated token's bytes to add(); it returns the text pieces ready to show, and whether a
    stop string ended the answer (the text before it was the last piece). flush() gives what was held
    back when the answer ends otherwise."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.keep = max((len(st) - 1 for st in stop), default=0)  # the longest stop string's start, held back
        self.raw = bytearray()
        self.emitted = 0  # characters of the decoded text already passed on (to `held` or out)
        self.held = ""
        self.started = False
        self.stopped = False

    def add(self, data: bytes) -> list[str]:
        """The pieces `data` completes (none while it ends inside a character)."""
        if self.stopped:
            return []
        self.raw += data
        if not complete_utf8(self.raw):
            return []
        text = self.raw.decode("utf-8", errors="ignore")
        piece = text[self.emitted:]
        self.emitted = len(text)
        if not self.held and not self.started:
            piece = piece.lstrip()  # the space SentencePiece puts before the answer's first word
            self.started = bool(piece)
        self.held += piece
        hit = next((st for st in self.stop if st in self.held), None)
        if hit is not None:
            self.stopped = True
            out = self.held[: self.held.index(hit)]
            self.held = ""
            return [out]
        if self.keep and len(self.held) > self.keep:
            out, self.held = self.held[:-self.keep], self.held[-self.keep:]
            return [out]
        if not self.keep:
            out, self.held = self.held, ""
            return [out]
        return []

    def flush(self) -> str:
        """What is still held back (the answer ended without a stop string)."""
        out, self.held = self.held, ""
        return out
