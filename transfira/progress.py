"""Progress output: a tqdm bar on a terminal, plain lines in a log file, nothing on ranks > 0.

Under a batch scheduler stdout/stderr go to a file, where tqdm's carriage-return redraws
turn into thousands of lines. :func:`progress` therefore returns a tqdm bar only when
stderr is a terminal; otherwise a :class:`LineProgress` that prints one plain line every
``LINE_PERCENT`` % of the total (but not within ``MIN_SECONDS`` of the last line) or after
``LINE_SECONDS`` seconds without one, and a last line when it closes; a loop opened with
``leave=False`` (an inner loop, e.g. one epoch) prints that last line only if it printed
before. A short loop thus writes one line (or none), a long one a line every few percent
or seconds. Under ``torchrun`` only rank 0 reports.
``TRANSFIRA_PROGRESS`` = ``bar`` | ``lines`` | ``off`` overrides the choice (default ``auto``).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

LINE_PERCENT = 10  # a line at every this many percent of the total ...
MIN_SECONDS = 10.0  # ... unless the last line is more recent than this ...
LINE_SECONDS = 30.0  # ... or after this many seconds without one
MODES = ("auto", "bar", "lines", "off")


def _rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0") or 0)


def mode() -> str:
    """``bar``, ``lines`` or ``off`` for this process (see the module docstring)."""
    chosen = os.environ.get("TRANSFIRA_PROGRESS", "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"TRANSFIRA_PROGRESS={chosen!r}: expected one of {', '.join(MODES)}")
    if _rank() > 0:
        return "off"
    if chosen == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return chosen


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """The tqdm calls this project uses (iteration, ``update``, ``set_postfix``, ``close``, context
    manager), written as plain lines to stderr."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, **_: Any):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.last_step = self._step(initial)
        self.closed = False
        self.leave, self.printed = leave, False

    def _step(self, n: int) -> int:
        return int(100 * n / self.total) // LINE_PERCENT if self.total else 0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n}"]
        if self.total:
            parts.append(f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)")
        else:
            parts.append(f" {self.unit}")
        parts.append(f", {rate:.3g} {self.unit}/s, {_clock(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f", ~{_clock((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(f", {self.postfix}")
        return "".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now, step = time.monotonic(), self._step(self.n)
        since = now - self.last_time
        if (step > self.last_step and since >= MIN_SECONDS) or since >= LINE_SECONDS:
            self.last_step, self.last_time = step, now
            if not (self.total and self.n >= self.total):  # the last line comes from close()
                self.printed = True
                print(self.line(), file=sys.stderr, flush=True)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if not (self.leave or self.printed):
                return
            print(self.line() + " - done" if not self.total or self.n >= self.total else self.line(),
                  file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:  # type: ignore[union-attr]
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, leave: bool = True, disable: bool = False, **kwargs: Any) -> Any:
    """A progress reporter over ``iterable`` (or driven by ``update``): see the module docstring.

    ``disable`` silences it (e.g. ``disable=not info.is_main``); the iterable is still yielded.
    """
    chosen = "off" if disable else mode()
    if chosen == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    dynamic_ncols=True, **kwargs)
    if chosen == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)


def log(text: str) -> None:
    """Print a message without breaking a bar (rank 0 only)."""
    if _rank() == 0:
        tqdm.write(text)
