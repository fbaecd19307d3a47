"""Progress for long commands (migrate, audit export and verify): rich's live display on a terminal,
nothing at all otherwise, so scripts and logs get only the result lines."""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from contextlib import contextmanager


def _interactive() -> bool:
    return sys.stderr.isatty()


@contextmanager
def spinner(what: str) -> Generator[None]:
    """A spinner with elapsed time while ``what`` runs (stderr, so stdout stays the command's output)."""
    if not _interactive():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        progress.add_task(what, total=None)
        yield


@contextmanager
def counter(what: str, unit: str, *, enabled: bool = True) -> Generator[Callable[[int], None]]:
    """A running count (lines written so far); yields ``advance(n)``."""
    if not (enabled and _interactive()):
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}: {task.completed:,.0f} " + unit),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=None)
        yield lambda n: progress.advance(task, n)
