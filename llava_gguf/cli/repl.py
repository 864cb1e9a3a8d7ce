"""`llava-gguf chat` without --prompt: an interactive conversation (readline history where available).

Answers stream to stdout; everything else (banner, command output, errors, timings) goes to stderr.
Ctrl-C stops the current answer (the part already written stays in the conversation), not the session;
Ctrl-D (EOF) or /quit ends it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from llava_gguf.cli.render import timings
from llava_gguf.errors import LlavaGgufError
from llava_gguf.runtime.images import load_image

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        start the conversation again
  /save [--force] FILE
                write the transcript as JSON (--force: replace an existing FILE)
  /stats        prompt and generation timings of the last answer
  /help         this text
  /quit         leave (Ctrl-D too)"""


def _history_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-gguf"
    return base / "chat_history"


def _readline():
    try:
        import readline  # optional (not on Windows), and only the interactive session needs it
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return None
    hist = _history_file()
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.is_file():
            readline.read_history_file(hist)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline


def run_repl(session, images: list, sampling: dict, *, verbose: bool = False) -> None:
    err = sys.stderr
    rl = _readline()
    pending = list(images)
    err.write("llava-gguf chat — /help for commands, Ctrl-D to leave\n")
    if pending:
        err.write(f"({len(pending)} image(s) attached to your first message)\n")
    err.flush()
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                err.write("\n")
                break
            except KeyboardInterrupt:
                err.write("\n")
                continue
            except UnicodeDecodeError:
                err.write("error: that line is not valid text in this terminal's encoding\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if _command(line, session, pending):
                        break
                except KeyboardInterrupt:
                    err.write("\n(interrupted)\n")
                err.flush()
                continue
            pieces = None
            before = len(session.turns)
            try:
                pieces = session.ask(line, list(pending), stream=True, **sampling)
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            except KeyboardInterrupt:
                if pieces is not None:
                    pieces.close()
                sys.stdout.write("\n")
                err.write("(stopped)\n")
            except LlavaGgufError as e:
                err.write(f"error: {e.one_line()}\n")
                if pending and len(session.turns) == before:
                    err.write("(the attached images were dropped; /image attaches again)\n")
                    pending.clear()
            if len(session.turns) != before:
                pending.clear()  # they went with the message
            sys.stdout.flush()
            if verbose:
                err.write(timings(session.model.last) + "\n")
            err.flush()
    finally:
        if rl is not None:
            try:
                rl.write_history_file(_history_file())
            except OSError:
                pass


def _command(line: str, session, pending: list) -> bool:
    """Run a /command; True means leave."""
    err = sys.stderr
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/help":
        err.write(HELP + "\n")
    elif cmd == "/reset":
        session.reset()
        pending.clear()
        err.write("(conversation reset)\n")
    elif cmd == "/image":
        if not arg:
            err.write("usage: /image PATH\n")
        else:
            path = Path(arg).expanduser()
            try:
                load_image(path)
                pending.append(str(path))
                err.write(f"(image attached: {arg})\n")
            except LlavaGgufError as e:
                err.write(f"error: {e.one_line()}\n")
    elif cmd == "/save":
        force = arg == "--force" or arg.startswith("--force ")
        if force:
            arg = arg[len("--force"):].strip()
        if not arg:
            err.write("usage: /save [--force] FILE\n")
        else:
            try:
                session.save(Path(arg).expanduser(), force=force)
                err.write(f"(saved {arg})\n")
            except LlavaGgufError as e:  # e.g. FILE exists (--force replaces it)
                err.write(f"error: {e.one_line()}\n")
            except (OSError, UnicodeError) as e:
                err.write(f"error: cannot write {arg}: {getattr(e, 'strerror', None) or e}\n")
    elif cmd == "/stats":
        err.write(timings(session.model.last) + "\n")
    else:
        err.write(f"unknown command {cmd} (/help lists them)\n")
    return False
