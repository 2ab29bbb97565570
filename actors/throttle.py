"""Warnings about input from outside, at most one per interval per kind.

A hostile or broken peer can send thousands of bad messages a second; each
is counted in a metric, but logging each would flood the log. ``LogThrottle``
logs the first of a kind, then at most one per ``every_s``, saying how many
were not logged in between.
"""

from __future__ import annotations

import logging
import time
from typing import Any


class LogThrottle:
    def __init__(self, logger: logging.Logger, every_s: float = 1.0) -> None:
        self.logger, self.every_s = logger, every_s
        self._state: dict[str, tuple[float, int]] = {}  # kind -> (last logged, not logged)

    def report(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log ``msg % args`` as a warning unless ``kind`` was logged recently."""
        now = time.monotonic()
        last, quiet = self._state.get(kind, (-self.every_s, 0))
        if now - last < self.every_s:
            self._state[kind] = (last, quiet + 1)
            return
        self._state[kind] = (now, 0)
        if quiet:
            msg += f" ({quiet} more since the last report)"
        self.logger.warning(msg, *args, **kwargs)
