"""Progress bars and result tables, in one place so every command looks the same."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, unit: str = "steps", start: int = 0
) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields `advance(n=1, **fields)` where fields fill `{task.fields[...]}`."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=start, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            if status is None:
                progress.advance(task, n)
            else:
                progress.update(task, advance=n, status=status)

        yield advance


def announce_output(what: str, path: object) -> None:
    """Say where an artefact went, on its own line of stdout, so a user can find every output of a command."""
    Console(soft_wrap=True).print(f"wrote {what}: {path}", highlight=False)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a results table to stdout."""
    table = Table(title=title)
    for column in columns:  # a long cell wraps rather than losing its end (a path, a fingerprint)
        table.add_column(column, justify="right" if column != columns[0] else "left", overflow="fold")
    for row in rows:
        table.add_row(*[f"{cell:.4f}" if isinstance(cell, float) else str(cell) for cell in row])
    out = Console()
    if not out.is_terminal:  # a log file or a pipe has no screen to fit: never fold a cell into slivers there
        out = Console(width=max(out.width, out.measure(table, options=out.options.update_width(10_000)).maximum))
    out.print(table)


def print_generation(prompt: str, continuation: str) -> None:
    """A prompt and the model's continuation, each under a label, the continuation highlighted on a terminal."""
    out = Console(soft_wrap=True, highlight=False)
    out.print("[bold]prompt:[/]")
    out.print(prompt, markup=False)
    out.print("[bold]continuation:[/]")
    out.print(continuation, markup=False, style="green")


def print_fields(title: str, fields: Sequence[tuple[str, object]]) -> None:
    """Named values, one per line and never cut (a fingerprint is copied from here), under a title."""
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"[bold]{title}[/]")
    width = max((len(name) for name, _ in fields), default=0)
    for name, value in fields:
        out.print(f"  {name:<{width}}  {value}", markup=False)
