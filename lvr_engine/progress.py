"""Progress output that reads well both on a terminal and in a log file.

:func:`progress_bar` is the one place the project makes a progress display. On a terminal (or in a Jupyter
notebook) it is an ordinary redrawing ``tqdm`` bar. When the stream is a file or a pipe (CI, ``lvr demo > log``)
it is a :class:`LineProgress`: the same tqdm object and numbers (count, percentage, elapsed / remaining time, rate,
postfix such as the loss), written as one plain line each time another tenth of the work is done, and never a
carriage return::

    stage 0:  10% 60/600 [00:12<01:48, 4.95it/s, loss=1.2345]
    stage 0:  20% 120/600 [00:24<01:36, 4.97it/s, loss=0.8765]
    ...

Callers use the tqdm API unchanged (``update``, ``set_postfix``, ``write``, ``close``, iteration).
"""
from __future__ import annotations

import sys
from typing import IO, Iterable

from tqdm import tqdm
from tqdm.autonotebook import tqdm as _notebook_or_std_tqdm

__all__ = ["LineProgress", "progress_bar", "is_terminal"]

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
"""A line of :class:`LineProgress`: tqdm's numbers without the bar (unknown totals use tqdm's own format)."""


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineProgress(tqdm):
    """A tqdm that writes whole lines: one each time ``n`` crosses another ``1 / lines`` of ``total`` (and the
    last numbers at ``close`` when they were not written yet); with an unknown total, one line at ``close``.

    Every update is looked at (``mininterval=0, miniters=1``) so no tenth is skipped; a line is written only when
    a new tenth is reached, so the cost per update is a comparison.
    """

    def __init__(self, *args, lines: int = 10, **kwargs):
        if lines < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        self._lines = lines
        self._written = 0            # tenths (1 / lines of total) already written
        self._written_n = None       # n of the last line written
        kwargs.setdefault("mininterval", 0)
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("bar_format", LINE_FORMAT)
        kwargs.pop("dynamic_ncols", None)  # no bar, no width
        super().__init__(*args, **kwargs)
        if not self.total and self.bar_format == LINE_FORMAT:
            self.bar_format = None  # tqdm's own line for an unknown total: count, elapsed, rate

    def _emit(self) -> None:
        self.fp.write(str(self) + "\n")
        self.fp.flush()
        self._written_n = self.n

    def display(self, msg=None, pos=None):
        """Write a line when a new tenth of the work is done; clearing (``msg=''``) writes nothing."""
        if msg is not None:
            return False
        if self.total:
            part = min(self._lines, int(self.n * self._lines // self.total))
            if part > self._written:
                self._written = part
                self._emit()
        return True

    def clear(self, nolock=False):
        """Lines are never erased (tqdm.write calls this around its message)."""

    def close(self):
        if getattr(self, "disable", True):  # closed, or __init__ failed before tqdm's
            return
        if self._written_n != self.n and (self.n or not self.total):
            self._emit()
        self.leave = False  # tqdm's own close would redraw the bar and end it with a newline
        super().close()


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
                 file: IO[str] | None = None, disable: bool = False, lines: int = 10, **kwargs) -> tqdm:
    """A progress display over ``iterable`` / ``total`` units, written to ``file`` (default: ``sys.stderr``).

    A redrawing tqdm bar on a terminal or in a notebook; otherwise a :class:`LineProgress` writing ``lines`` plain
    lines over the whole run. ``kwargs`` are tqdm's (``unit``, ``postfix``, ``leave``, ...); ``disable=True`` shows
    nothing.
    """
    stream = sys.stderr if file is None else file
    if disable or is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, file=stream, disable=disable, dynamic_ncols=True, **kwargs)
    if _notebook_or_std_tqdm is not tqdm:  # a Jupyter kernel: its widget bar (its streams are not terminals)
        return _notebook_or_std_tqdm(iterable, total=total, desc=desc, file=stream, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, file=stream, lines=lines, **kwargs)
