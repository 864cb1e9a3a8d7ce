"""Atomic outputs: write `<name>.partial`, fsync, rename into place; refuse to overwrite without force.

A run that fails or is interrupted removes its partial files (and an output directory it created
that is still empty), so nothing that looks complete is ever left behind.
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from .errors import LlavaGgufError

PARTIAL_SUFFIX = ".partial"


class OutputSet:
    """A set of output files that appear together, or not at all."""

    def __init__(self, outdir: Path, names: list[str], *, force: bool) -> None:
        self.outdir = outdir
        self.finals = [outdir / n for n in names]
        self.partials = [p.with_name(p.name + PARTIAL_SUFFIX) for p in self.finals]
        self.force = force
        self._created_dir = False

    def prepare(self) -> None:
        for final in self.finals:
            if final.exists() and not self.force:
                raise LlavaGgufError(f"{final} already exists", "pass --force to replace it")
        if self.outdir.exists() and not self.outdir.is_dir():
            raise LlavaGgufError(f"output path {self.outdir} exists and is not a directory")
        if not self.outdir.exists():
            try:
                self.outdir.mkdir(parents=True)
            except OSError as e:
                raise LlavaGgufError(f"cannot create output directory {self.outdir}: {e.strerror}") from None
            self._created_dir = True
        for partial in self.partials:
            try:
                partial.open("wb").close()
            except OSError as e:
                self.discard()
                raise LlavaGgufError(f"cannot write to {self.outdir}: {e.strerror}",
                                     "choose a writable output directory with -o") from None

    def commit(self) -> list[Path]:
        for partial in self.partials:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for partial, final in zip(self.partials, self.finals):
            os.replace(partial, final)
        with contextlib.suppress(OSError):  # make the renames durable too
            fd = os.open(self.outdir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return list(self.finals)

    def discard(self) -> None:
        for partial in self.partials:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.outdir.rmdir()  # only succeeds when empty


@contextlib.contextmanager
def atomic_outputs(outdir: Path, names: list[str], *, force: bool) -> Iterator[OutputSet]:
    """Yield an OutputSet whose `.partials` are to be written; commit on success, discard on any failure."""
    outputs = OutputSet(outdir, names, force=force)
    outputs.prepare()
    try:
        with _sigterm_as_interrupt():
            yield outputs
            outputs.commit()
    except BaseException:
        outputs.discard()
        raise


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
