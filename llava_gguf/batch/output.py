"""The batch's output: a JSONL file that survives SIGKILL at any moment and is never clobbered.

OUT is created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW: a symlink at the path is refused, never followed),
locked with flock for the whole run (a second run on the same OUT fails at once, naming the first), and each
record is appended in one write() and fsynced before the next, so a record the runner reported is on disk.
Every record starts with its resume `key`; `--resume` reads the keys back, cuts a torn last line (a write
cut short by SIGKILL) back to the last complete record, and refuses a file that is not ours. Without
`--resume` an existing OUT is kept unless `--force`, which puts a new empty file in its place at once (not at
the end: records must be durable as they finish) by renaming an exclusive temporary over the name."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import threading
from pathlib import Path
from types import TracebackType

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.output_errors import lock_holder, write_error

# How every record line starts (json.dumps with the key first): a torn tail must be a prefix of a record.
RECORD_START = b'{"key": '
NOT_OURS_HINT = "it is not a llava-gguf batch output: choose another -o, or --force to replace it"


class Output:
    """An open, locked batch output. Use `Output.open(...)` as a context manager."""

    def __init__(self, path: Path, fd: int, done: set[str], errors: int) -> None:
        self.path = path
        self.done = done  # keys of the records in the file (found at open, and written since)
        self.resumed = len(done)  # records that were already there
        self.count = 0  # records written by this run
        self.errors = errors  # records in the file with an `error`, old and new
        self._fd: int | None = fd
        self._size = os.fstat(fd).st_size
        self._lock = threading.Lock()  # write() may be called from the runner's threads

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: Path | str, *, resume: bool = False, force: bool = False) -> Output:
        """Open OUT for appending. `resume`: continue an existing OUT (or start one); otherwise OUT must not
        exist unless `force`, which starts it afresh."""
        path = Path(path)
        if path.name in ("", ".", ".."):
            raise LlavaGgufError(f"{path} is not usable as an output file name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LlavaGgufError(f"cannot create the directory {path.parent}: {e.strerror}") from None
        if path.is_symlink():
            raise symlink_error(path)
        if path.is_dir():
            raise LlavaGgufError(f"{path} is a directory", "-o names a .jsonl file")
        if resume:
            fd = _open_existing(path)
            if fd is None:
                return cls(path, _create(path), set(), 0)
            try:
                done, errors = _recover(fd, path)
            except BaseException:
                os.close(fd)
                raise
            return cls(path, fd, done, errors)
        return cls(path, _replace(path) if force else _create(path), set(), 0)

    # ------------------------------------------------------------------ writing
    def write(self, record: dict) -> bool:
        """Append `record` (a dict with a str `key`; JSON values only) as one line, durable on return.
        False, and nothing written, when its key is already in the file."""
        key = record.get("key")
        if not isinstance(key, str):
            raise TypeError("a batch record needs a str 'key'")
        body = {"key": key, **{k: v for k, v in record.items() if k != "key"}}
        try:
            data = (json.dumps(body, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in a text: escaped, still valid JSON
            data = (json.dumps(body, allow_nan=False) + "\n").encode("ascii")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path} is closed")
            if key in self.done:
                return False
            try:
                written = os.write(self._fd, data)
                while written < len(data):  # a short write (a signal): the rest of the same line
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError as e:
                # never leave half a line for the next record to be appended to
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                raise write_error(e, self.path) from None
            self._size += len(data)
            self.done.add(key)
            self.count += 1
            self.errors += record.get("error") is not None
        return True

    # ------------------------------------------------------------------ closing
    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        """Release the file and its lock (every record is already durable)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def symlink_error(path: Path | str) -> LlavaGgufError:
    """A symlink at OUT: checked before opening, and again when the open itself finds one (a race)."""
    return LlavaGgufError(f"{path} is a symbolic link, which llava-gguf never writes through",
                          "give the real file's path")


def exists_error(path: Path | str) -> LlavaGgufError:
    """What an OUT that already exists, without --resume or --force, is told (also before the model loads)."""
    return LlavaGgufError(f"{path} already exists", "pass --resume to continue it, or --force to replace it")


# ---------------------------------------------------------------------- helpers
_APPEND = os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW


def _create(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _APPEND, 0o666)
    except FileExistsError:
        if path.is_symlink():
            raise symlink_error(path) from None
        raise exists_error(path) from None
    except OSError as e:
        raise write_error(e, path) from None
    try:
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    _sync_dir(path.parent)
    return fd


def _open_existing(path: Path) -> int | None:
    """OUT opened for appending and locked; None when there is none. A symlink or a non-regular file
    (a FIFO would block, a device is not ours) is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | _APPEND)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise LlavaGgufError(f"cannot open {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LlavaGgufError(f"{path} is not a regular file", "-o names a .jsonl file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _replace(path: Path) -> int:
    """--force: a new empty OUT in place now. The old file is locked first (a live run writing it refuses
    us); the new one is an exclusive temporary (umask applies), locked, then renamed over the name."""
    old = _open_existing(path)
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    try:
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _APPEND, 0o666)
        except OSError as e:
            raise write_error(e, path) from None
        try:
            _lock(fd, path)
            os.replace(temp, path)  # replaces the name itself: nothing a link there points to
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    finally:
        if old is not None:
            os.close(old)
    _sync_dir(path.parent)
    return fd


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LlavaGgufError(f"{path} is being written by another run ({lock_holder(os.fstat(fd))})",
                             "wait for it to finish, or choose another output") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise LlavaGgufError(f"cannot lock {path}: {e.strerror}") from None
        # a file system without flock (some network mounts): nothing to lock with


def _recover(fd: int, path: Path) -> tuple[set[str], int]:
    """The keys of the complete records in OUT and how many are errors; a torn last line is cut off (and
    the cut fsynced). A file that is not ours is refused before anything is changed."""
    head = os.pread(fd, len(RECORD_START), 0)
    if head and not _could_be_ours(head):
        raise LlavaGgufError(f"{path} does not hold llava-gguf batch records", NOT_OURS_HINT)
    done: set[str] = set()
    errors = 0
    end = 0  # where the last complete record ends
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                if not _could_be_ours(raw):
                    raise LlavaGgufError(f"{path}:{n}: not a llava-gguf batch record", NOT_OURS_HINT)
                try:
                    os.ftruncate(fd, end)  # SIGKILL cut this record's write short: it is answered again
                    os.fsync(fd)
                except OSError as e:
                    raise write_error(e, path) from None
                break
            record = _parse(raw)
            if record is None:
                raise LlavaGgufError(f"{path}:{n}: not a llava-gguf batch record", NOT_OURS_HINT)
            done.add(record["key"])
            errors += record.get("error") is not None
            end += len(raw)
    return done, errors


def _could_be_ours(tail: bytes) -> bool:
    """A record's beginning (cut anywhere), or the zeros a crashed file system may leave at the end."""
    return tail.startswith(RECORD_START) or RECORD_START.startswith(tail) or not tail.strip(b"\0")


def _parse(raw: bytes) -> dict | None:
    if not raw.startswith(RECORD_START):
        return None
    try:
        record = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None


def _sync_dir(directory: Path) -> None:
    """Make a new name durable: fsync the directory that holds it."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
