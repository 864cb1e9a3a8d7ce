"""Progress bars (rich) for long work; nothing at all when output is not a terminal."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Group
from rich.live import Live
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

from llava_gguf.convert import Progress


@contextlib.contextmanager
def convert_progress(enabled: bool) -> Iterator[Progress]:
    if not enabled:
        yield Progress()
        return
    bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
              TimeRemainingColumn(), transient=False)
    tensors = Bar(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[current]}"),
                  transient=False)
    ids: dict[str, int] = {}

    def start(total_bytes: int, total_tensors: int) -> None:
        ids["b"] = bar.add_task("converting", total=total_bytes)
        ids["t"] = tensors.add_task("tensors", total=total_tensors, current="")

    with contextlib.ExitStack() as stack:
        stack.enter_context(Live(Group(bar, tensors), refresh_per_second=8))
        def quantize(done: int, total: int, name: str) -> None:
            if "q" not in ids:
                ids["q"] = tensors.add_task("quantizing", total=total, current="")
            tensors.update(ids["q"], completed=done, current=name)

        yield Progress(start=start,
                       advance_bytes=lambda n: bar.advance(ids["b"], n),
                       advance_tensor=lambda name: tensors.update(ids["t"], advance=1, current=name),
                       quantize=quantize)


@contextlib.contextmanager
def tensor_progress(enabled: bool, description: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A (done, total, name) callback drawing a tensor-count bar, or None when not on a terminal."""
    if not enabled:
        yield None
        return
    bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              TextColumn("{task.fields[current]}"), transient=False)
    tasks: dict[str, int] = {}

    def update(done: int, total: int, name: str) -> None:
        key = f"{description}:{total}"
        if key not in tasks or bar.tasks[tasks[key]].completed > done:
            tasks[key] = bar.add_task(description, total=total, current="")
        bar.update(tasks[key], completed=done, current=name)

    with bar:
        yield update


@contextlib.contextmanager
def copy_progress(enabled: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A (bytes done, bytes in all, file name) callback drawing a byte bar per file, or None off a terminal."""
    if not enabled:
        yield None
        return
    bar = Bar(TextColumn("[bold]copying {task.fields[current]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
              TimeRemainingColumn(), transient=False)
    tasks: dict[str, int] = {}

    def update(done: int, total: int, name: str) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total, current=name)
        bar.update(tasks[name], completed=done)

    with bar:
        yield update


@contextlib.contextmanager
def imatrix_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A (done, total) callback drawing `imatrix`'s bar (chunks, then calibration images) with elapsed and
    remaining time, or None when not on a terminal (compute_imatrix then asks the tool for no progress)."""
    if not enabled:
        yield None
        return
    bar = Bar(TextColumn("[bold]calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              TimeRemainingColumn(), transient=False)
    task = bar.add_task("calibrating", total=None)  # the total is known once the tool starts

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


@contextlib.contextmanager
def record_progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[bool], None]]:
    """A (failed) callback advancing a records bar with records/s and ETA (nothing off a terminal)."""
    if not enabled:
        yield lambda failed: None
        return
    bar = Bar(TextColumn("[bold]answering"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
              TimeRemainingColumn(), TextColumn("{task.fields[failed]}"), transient=False)
    task = bar.add_task("answering", total=total, completed=done, rate="", failed="")
    failures = [0]

    def advance(failed: bool) -> None:
        failures[0] += failed
        speed = bar.tasks[task].speed
        bar.update(task, advance=1, rate=f"{speed:.2f} records/s" if speed else "",
                   failed=f"{failures[0]} failed" if failures[0] else "")

    with bar:
        yield advance
