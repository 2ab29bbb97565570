"""A circuit breaker for one domain system.

Closed: commands flow. After ``threshold`` consecutive failures (timeouts,
``unavailable``, full send queue) it opens: commands are answered at once
with the retryable error ``circuit_open`` and a ``retry_after``, and orders
wait without spending their retry attempts. After ``cooldown_s`` it lets one
probe command through (half-open): a reply closes it, a failure opens it
again. A business refusal (a non-retryable error) is an answer, so it counts
as the system being up.
"""

from __future__ import annotations

from oms.config import ConfigError
from oms.edge import check_number

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
LEVEL = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Breaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 5.0) -> None:
        problem = (check_number(threshold, "breaker_failures", 1, 1_000_000)
                   or check_number(cooldown_s, "breaker_cooldown_s", 0.01, 3600))
        if problem is not None:  # a NaN cooldown would never let a probe through
            raise ConfigError(problem)
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0

    def allow(self, now: float) -> bool:
        """May a command be sent now? (In half-open, only the probe may.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state = HALF_OPEN
            return True
        return False

    def retry_after(self, now: float) -> float:
        return max(0.05, self.cooldown_s - (now - self.opened_at))

    def record(self, ok: bool, now: float) -> str | None:
        """Note an outcome; returns the new state when it changed."""
        before = self.state
        if ok:
            self.state, self.failures = CLOSED, 0
        else:
            self.failures += 1
            if self.state == HALF_OPEN or self.failures >= self.threshold:
                self.state, self.opened_at = OPEN, now
        return self.state if self.state != before else None
