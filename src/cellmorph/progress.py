"""Progress, shared by every long job: rich bars on a terminal; plain periodic lines where the console is not a
terminal (a log file, a batch job, `cellmorph run ... 2>&1 | tee log`), so a log shows how far a run got while it
runs, not only at its end; nothing inside `progress_shown(False)` (the API's `fit(..., progress=False)`)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)

PROGRESS_SECONDS_ENV = "CELLMORPH_PROGRESS_SECONDS"  # plain lines: at most one per task every N seconds (default 30)
_SHOWN: ContextVar[bool] = ContextVar("cellmorph_progress_shown", default=True)


@contextmanager
def progress_shown(shown: bool):
    """Show (True) or hide (False) every progress bar and line made inside the block (this thread/context)."""
    token = _SHOWN.set(shown)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def make_progress(**kwargs) -> Progress | PlainProgress:
    """A progress display for the console: a rich bar on a terminal (and in Jupyter), plain lines otherwise, nothing
    when hidden."""
    if not _SHOWN.get():
        kwargs["disable"] = True
    elif not console.is_jupyter and (not console.is_terminal or console.is_dumb_terminal):  # a log file, or TERM=dumb
        return PlainProgress(console, every=plain_interval())
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        **kwargs,
    )


def plain_interval() -> float:
    """Seconds between two plain progress lines of one task ($CELLMORPH_PROGRESS_SECONDS, default 30)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_SECONDS_ENV, "30")))
    except ValueError:
        return 30.0


class PlainProgress:
    """rich.progress.Progress's task interface (add_task, advance, update, remove_task) printing plain lines: a task's
    first line when it starts, then at most one every `every` seconds, and one when it completes, e.g.

        progress: fold 12/60: Metadata_Patient=17  11/60 (18%), 0:01:05 elapsed, about 0:04:50 left
    """

    def __init__(self, out: Console, every: float = 30.0):
        self.out, self.every = out, every
        self.tasks: dict[int, dict] = {}
        self._next = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        task = self._next
        self._next += 1
        now = time.monotonic()
        self.tasks[task] = {"description": description, "total": total, "completed": completed, "start": now, "printed": None, "done": False}
        self._report(task, force=True)
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, description: str | None = None, completed: float | None = None, total: float | None = None,
               advance: float | None = None, **_) -> None:
        t = self.tasks.get(task)
        if t is None:
            return
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        self._report(task)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def _report(self, task: int, force: bool = False) -> None:
        t = self.tasks[task]
        now = time.monotonic()
        total, completed = t["total"], t["completed"]
        finished = total is not None and completed >= total
        if t["done"] or not (force or finished or t["printed"] is None or now - t["printed"] >= self.every):
            return
        t["printed"], t["done"] = now, finished
        elapsed = now - t["start"]
        count = f"{completed:g}/{total:g} ({100 * completed / total:.0f}%)" if total else f"{completed:g}"
        line = f"progress: {t['description']}  {count}, {timedelta(seconds=round(elapsed))} elapsed"
        if total and 0 < completed < total and elapsed > 0:
            line += f", about {timedelta(seconds=round(elapsed * (total - completed) / completed))} left"
        self.out.print(line, highlight=False, markup=False, soft_wrap=True)
