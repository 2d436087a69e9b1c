"""Progress reporting. Library code never prints: long loops call a `Progress` callback,
which the command line renders as a progress bar (tqdm)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

# progress(task, done, total): `task` names the loop, `done` of `total` steps are finished.
Progress = Callable[[str, int, int], None]

T = TypeVar("T")


def no_progress(task: str, done: int, total: int) -> None:
    """The default callback: report nothing."""


def track(items: Iterable[T], task: str, total: int, progress: Progress | None) -> Iterator[T]:
    """Yield `items`, calling `progress(task, i, total)` before the first and after each."""
    cb = progress or no_progress
    cb(task, 0, total)
    for i, item in enumerate(items):
        yield item
        cb(task, i + 1, total)


class TqdmProgress:
    """A `Progress` callback that draws one tqdm bar per task name (used by the CLI)."""

    def __init__(self, disable: bool = False) -> None:
        self._bars: dict[str, object] = {}
        self._disable = disable

    def __call__(self, task: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(task)
        if bar is None or done == 0:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=task, leave=False, disable=self._disable, dynamic_ncols=True)
            self._bars[task] = bar
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            self._bars.pop(task, None)


class LineProgress:
    """A `Progress` callback for output that is not a terminal (a log file, a pipe): no bars,
    one line per finished task that took at least `min_seconds`."""

    def __init__(self, stream, min_seconds: float = 1.0) -> None:
        self._stream = stream
        self._min_seconds = min_seconds
        self._started: dict[str, float] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        if done == 0 or task not in self._started:
            self._started[task] = now
        if done >= total:
            elapsed = now - self._started.pop(task, now)
            if elapsed >= self._min_seconds:
                print(f"{task}: {total}/{total} in {elapsed:.1f} s", file=self._stream, flush=True)
