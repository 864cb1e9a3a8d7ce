"""Atomic, exclusive outputs: the one way anything in llava-gguf writes a file.

Every output is first written to a temporary `.<name>.<random>.partial` in the target directory,
created by `tempfile.mkstemp` (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, an unpredictable name): a file or
symlink planted in advance can never be opened, let alone followed. Writers are handed
`/proc/self/fd/N` (the inode we created, whatever happens to its name) rather than the name itself
where /proc exists; see `OutputSet.paths`. On success the temporaries are fsynced and renamed into
place; without `force` the rename cannot replace anything (a hard link that fails on EEXIST), with
`force` it replaces the final name itself, never what a symlink there points to.

Concurrency. Each temporary is held under `flock` for the whole run, and a run claims its output names
(checks for a live temporary of another run, removes stale ones, creates its own) while holding `flock`
on the output directory, which it also holds while it renames. So a second run for the same output
fails at once with one line naming the first run's process, and a committed LLM + mmproj pair always
comes from one run. No lock file exists: the locks live on the directory and on our own temporaries.

A run that fails or is interrupted (Ctrl-C, SIGTERM) removes its temporaries (and an output directory
it created that is still empty). A SIGKILLed run leaves only hidden `.partial` files, which never pass
as complete; the next run writing the same output removes them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.gguf.output_errors import lock_holder, write_error

PARTIAL_SUFFIX = ".partial"
_PROC_FD = Path("/proc/self/fd")
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's name sequence


def temp_pattern(final_name: str) -> re.Pattern[str]:
    """Names of our temporaries for `final_name` (a scratch file carries a tag before `.partial`)."""
    return re.compile(re.escape(f".{final_name}.") + _RANDOM + r"(?:\.[a-z0-9]+)?" + re.escape(PARTIAL_SUFFIX))


@dataclass
class _Temp:
    final: Path | None  # None: a scratch file, removed at the end
    name: Path  # its name in the output directory
    fd: int  # O_RDWR, flock'd for the life of the run
    ino: tuple[int, int]  # (st_dev, st_ino)
    mode: int | None = None  # set explicitly (repair keeps the source's permissions)


class OutputSet:
    """A set of output files that appear together, or not at all."""

    def __init__(self, outdir: Path, names: list[str], *, force: bool) -> None:
        for n in names:
            if not n or "/" in n or "\0" in n or n in (".", ".."):
                raise LlavaGgufError(f"{n!r} is not usable as a file name")
        self.outdir = Path(outdir)
        self.finals = [self.outdir / n for n in names]
        self.force = force
        self._temps: list[_Temp] = []
        self._created_dirs: list[Path] = []
        self._dir_fd: int | None = None
        self._parked = False

    # ------------------------------------------------------------------ where to write
    @property
    def paths(self) -> list[Path]:
        """One path per final output for the writers (gguf-py, our streaming writer, llama.cpp's
        quantizer, the llama-imatrix child), which all open a path by name.

        `/proc/self/fd/N` reopens the very inode mkstemp created, so no later change to the directory
        (our temporary renamed away and a symlink put in its place by someone who can write there) can
        redirect a writer. Without /proc (not Linux) the unique, unpredictable temporary name is what
        protects: it did not exist before mkstemp created it exclusively, so nothing could be planted
        under it in advance, and in a sticky directory (/tmp) no other user can rename or remove it."""
        return [self._writer_path(t) for t in self._temps if t.final is not None]

    @property
    def temp_names(self) -> list[Path]:
        return [t.name for t in self._temps if t.final is not None]

    @property
    def fds(self) -> list[int]:
        """Descriptors of the temporaries (a child process given `paths` needs them: pass_fds)."""
        return [t.fd for t in self._temps if t.final is not None]

    def scratch(self, tag: str) -> Path:
        """An intermediate file (convert's F16 stage before quantizing), created like the outputs and
        removed at the end; named after the first output."""
        if not re.fullmatch(r"[a-z0-9]+", tag):
            raise ValueError(tag)
        t = self._create(self.finals[0].name, f".{tag}", final=None)
        return self._writer_path(t)

    def set_mode(self, index: int, mode: int) -> None:
        self._committed(index).mode = mode & 0o7777

    def open_write(self, index: int) -> BinaryIO:
        """A binary file object on the temporary (a descriptor of its own: closing it keeps ours)."""
        fd = os.dup(self._committed(index).fd)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")

    def _committed(self, index: int) -> _Temp:
        return [t for t in self._temps if t.final is not None][index]

    @staticmethod
    def _writer_path(t: _Temp) -> Path:
        return _PROC_FD / str(t.fd) if _PROC_FD.is_dir() else t.name

    # ------------------------------------------------------------------ life cycle
    def prepare(self) -> None:
        if self.outdir.exists() and not self.outdir.is_dir():
            raise LlavaGgufError(f"output path {self.outdir} exists and is not a directory")
        self._make_dir()
        try:
            self._dir_fd = os.open(self.outdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self.discard()
            raise LlavaGgufError(f"cannot open output directory {self.outdir}: {e.strerror}") from None
        try:
            with self._dir_locked():
                for final in self.finals:
                    self._claim(final)
                for final in self.finals:
                    if os.path.lexists(final) and not self.force:
                        raise LlavaGgufError(f"{final} already exists", "pass --force to replace it")
                    if final.is_dir() and not final.is_symlink():
                        raise LlavaGgufError(f"{final} is a directory", "choose another output name")
                for final in self.finals:
                    self._create(final.name, "", final=final)
        except BaseException:
            self.discard()
            raise

    def _make_dir(self) -> None:
        missing = []
        p = self.outdir
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LlavaGgufError(f"cannot create output directory {self.outdir}: {e.strerror}") from None
        self._created_dirs = missing  # deepest first: the order to remove them in

    def _claim(self, final: Path) -> None:
        """Refuse when a live run writes `final`; remove temporaries of runs that died (SIGKILL)."""
        pattern = temp_pattern(final.name)
        try:
            names = [n for n in os.listdir(self._dir_fd) if pattern.fullmatch(n)]
        except OSError:
            return
        for n in names:
            path = self.outdir / n
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # a symlink, FIFO or device under our name pattern: never one of ours
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # gone meanwhile, or not ours to read
            try:
                st = os.fstat(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LlavaGgufError(f"{final} is being written by another run ({lock_holder(st)})",
                                         "wait for it to finish, or choose another output") from None
                except OSError:
                    continue  # no flock on this file system: leave it, we cannot tell whether it is live
                if st.st_uid == os.geteuid() and _same_file(path, st):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # a dead run's leftover: never complete, and in our way
            finally:
                os.close(fd)

    def _create(self, final_name: str, tag: str, *, final: Path | None) -> _Temp:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=tag + PARTIAL_SUFFIX, dir=self.outdir)
        except OSError as e:
            raise LlavaGgufError(f"cannot write to {self.outdir}: {e.strerror}",
                                 "choose a writable output directory") from None
        st = os.fstat(fd)
        t = _Temp(final, Path(name), fd, (st.st_dev, st.st_ino))
        self._temps.append(t)
        with contextlib.suppress(OSError):  # a new inode: nobody else holds it (ENOLCK: no flock here)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return t

    def commit(self) -> list[Path]:
        outputs = [t for t in self._temps if t.final is not None]
        mode = 0o666 & ~_umask()
        for t in outputs:
            try:
                os.fchmod(t.fd, t.mode if t.mode is not None else mode)
                os.fsync(t.fd)
            except OSError as e:
                raise write_error(e, t.final) from None
        with self._dir_locked(), _interrupts_deferred():
            for t in outputs:
                if not _same_file(t.name, t.ino):
                    raise LlavaGgufError(f"the temporary file of {t.final} was replaced while it was being written",
                                         "write to a directory that only you can change")
            if self.force:
                for t in outputs:
                    try:
                        os.replace(t.name, t.final)
                    except OSError as e:
                        raise LlavaGgufError(f"cannot replace {t.final}: {e.strerror}") from None
            else:
                self._link_all(outputs)
            for t in self._temps:  # scratch files, and the names the outputs were linked from
                if _same_file(t.name, t.ino):
                    with contextlib.suppress(OSError):
                        os.unlink(t.name)
        with contextlib.suppress(OSError):  # make the renames durable too
            os.fsync(self._dir_fd)
        self._close()
        return list(self.finals)

    def _link_all(self, outputs: list[_Temp]) -> None:
        """Without --force nothing is replaced, even a file another program created meanwhile: link(2)
        fails on an existing name, where rename(2) would replace it."""
        linked: list[_Temp] = []
        for t in outputs:
            try:
                os.link(t.name, t.final, follow_symlinks=False)
            except FileExistsError:
                for done in linked:
                    if _same_file(done.final, done.ino):
                        with contextlib.suppress(OSError):
                            os.unlink(done.final)
                raise LlavaGgufError(f"{t.final} already exists", "pass --force to replace it") from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise LlavaGgufError(f"cannot create {t.final}: {e.strerror}") from None
                # a file system without hard links (vfat, some FUSE): check, then rename
                if os.path.lexists(t.final):
                    raise LlavaGgufError(f"{t.final} already exists", "pass --force to replace it") from None
                os.replace(t.name, t.final)  # the temporary's name is gone: nothing left to unlink
                continue
            linked.append(t)

    def park(self) -> None:
        """A native writer we had to abandon (Ctrl-C during llama.cpp's quantizer) may still open
        `/proc/self/fd/N` later: keep every N pointing at /dev/null for the life of the process instead
        of freeing the number for an unrelated file."""
        null = os.open(os.devnull, os.O_RDWR)
        for t in self._temps:
            os.dup2(null, t.fd)
        os.close(null)
        self._parked = True

    def discard(self) -> None:
        for t in self._temps:
            if _same_file(t.name, t.ino):  # never remove what someone else put under the name
                try:
                    os.unlink(t.name)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    warn(f"could not remove the temporary file {t.name}: {e.strerror}", "remove it by hand")
        self._close()
        for d in self._created_dirs:
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                break

    def _close(self) -> None:
        for t in self._temps:
            if not self._parked:
                with contextlib.suppress(OSError):
                    os.close(t.fd)
        self._temps = []
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # also releases the directory lock
            self._dir_fd = None

    @contextlib.contextmanager
    def _dir_locked(self) -> Iterator[None]:
        # Held only while claiming names and while renaming (milliseconds), so waiting for it is fine;
        # Ctrl-C interrupts the wait.
        assert self._dir_fd is not None
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock: the temporaries' locks still hold
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(self._dir_fd, fcntl.LOCK_UN)


def _same_file(path: Path, ino: tuple[int, int] | os.stat_result) -> bool:
    if isinstance(ino, os.stat_result):
        ino = (ino.st_dev, ino.st_ino)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ino


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_outputs(outdir: Path, names: list[str], *, force: bool) -> Iterator[OutputSet]:
    """Yield an OutputSet whose `.paths` are to be written; commit on success, discard on any failure."""
    outputs = OutputSet(Path(outdir), names, force=force)
    with _sigterm_as_interrupt():
        outputs.prepare()
        try:
            yield outputs
            outputs.commit()
        except BaseException:
            outputs.discard()
            raise


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM between the renames of a pair would leave one new file beside an old one: the
    signal is noted and acted on once both are in place (or neither)."""
    caught: list[int] = []

    def note(signum: int, frame: object) -> None:
        caught.append(signum)

    try:
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if any(previous[s] not in (signal.SIG_IGN, None) for s in caught):
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a killed job, a closed terminal) cleans up like Ctrl-C does."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
