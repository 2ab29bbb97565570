"""Log lines that can come in floods, bounded per kind, nothing lost.

A hostile or broken peer can send thousands of bad messages a second; a
domain system that stops answering times out every command in flight at
once. Each is counted in a metric, but a log line each would flood the log
(and cost most of the CPU of handling it). ``LogThrottle`` logs the first
``burst`` lines of a kind in each window of ``every_s`` one by one, with
their context (``extra``: the order_id, the command_id), so one in quiet
times is fully traceable; it counts the rest, and says how many in one
summary line per kind and window ("240 more timeouts from billing to
capture_payment in the last 1.0 s"). The summary leaves when the kind's
next line comes after the window, or at the owner's next tick after the
window's end (``flush``; ``due`` says when that is: an owner's
``poll_timeout`` includes it), so a count is not lost when the flood stops.

The clock is injectable (``clock``): the tests drive it by hand. One
throttle belongs to one thread (its owner's loop), as its owner's state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any


class _Window:
    """One kind's current window: when it began, lines logged and held back."""

    __slots__ = ("held", "level", "logged", "start", "summary")

    def __init__(self, start: float, level: int, summary: str) -> None:
        self.start, self.level, self.summary = start, level, summary
        self.logged = self.held = 0


class LogThrottle:
    """At most ``burst`` lines of a kind per ``every_s``, then a count.

    logger: where the lines go.
    every_s: the window, per kind (from its first line).
    burst: lines of a kind logged one by one in a window.
    extra: the context of the summary lines (the owner's: its ``system``).
    clock: monotonic seconds.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 1.0, burst: int = 1, *,
                 extra: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every_s, self.burst = logger, every_s, burst
        self.extra, self.clock = extra, clock
        self._windows: dict[Hashable, _Window] = {}  # kinds: a bounded set (the caller's)
        self.due: float | None = None  # the earliest end of a window with lines held back

    def report(self, kind: Hashable, msg: str, *args: Any, summary: str,
               level: int = logging.WARNING, extra: Mapping[str, Any] | None = None) -> None:
        """Log ``msg % args`` at ``level`` with ``extra``, unless ``burst``
        lines of ``kind`` were logged in its window: then count it, for the
        window's summary, "N more ``summary`` in the last ``every_s`` s".
        ``kind`` comes from a bounded set (never an order id)."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.every_s:
            if window is not None and window.held:
                self._summarise(window, now)
            window = self._windows[kind] = _Window(now, level, summary)
        if window.logged < self.burst:
            window.logged += 1
            logger.log(level, msg, *args, extra=extra, stacklevel=2)
            return
        window.held += 1
        if window.held == 1:
            end = window.start + self.every_s
            if self.due is None or end < self.due:
                self.due = end

    def flush(self, *, ending: bool = False) -> None:
        """The summaries of the windows that ended (a no-op before ``due``):
        the owner calls it on its ticks; with ``ending`` (as it stops) every
        window's, ended or not."""
        due = self.due
        if due is None:
            return
        now = self.clock()
        if now < due and not ending:
            return
        self.due = None
        every_s, windows = self.every_s, self._windows
        for kind, window in list(windows.items()):
            end = window.start + every_s
            if now >= end or ending:
                del windows[kind]
                if window.held:
                    self._summarise(window, now)
            elif window.held and (self.due is None or end < self.due):
                self.due = end

    def _summarise(self, window: _Window, now: float) -> None:
        late = now - window.start - 2 * self.every_s  # past the window after it
        if late <= 0:
            self.logger.log(window.level, "%d more %s in the last %.1f s", window.held,
                            window.summary, self.every_s, extra=self.extra)
        else:
            self.logger.log(window.level, "%d more %s in %.1f s, ending %.1f s ago", window.held,
                            window.summary, self.every_s, now - window.start - self.every_s,
                            extra=self.extra)
