"""Progress bars (rich) for long work; nothing at all when output is not a terminal."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .convert import Progress


@contextlib.contextmanager
def convert_progress(enabled: bool) -> Iterator[Progress]:
    if not enabled:
        yield Progress()
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
              TimeRemainingColumn(), transient=False)
    tensors = Bar(TextColumn("  tensors"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[current]}"),
                  transient=False)
    ids: dict[str, int] = {}

    def start(total_bytes: int, total_tensors: int) -> None:
        ids["b"] = bar.add_task("converting", total=total_bytes)
        ids["t"] = tensors.add_task("", total=total_tensors, current="")

    with contextlib.ExitStack() as stack:
        from rich.console import Group
        from rich.live import Live

        stack.enter_context(Live(Group(bar, tensors), refresh_per_second=8))
        yield Progress(start=start,
                       advance_bytes=lambda n: bar.advance(ids["b"], n),
                       advance_tensor=lambda name: tensors.update(ids["t"], advance=1, current=name))
