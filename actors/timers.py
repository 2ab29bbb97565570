"""Timers: ``TimerFired`` delivered to orders when due, on the event loop.

Timers are not persisted here: an order's snapshot holds when each retry is
due (``retry_at``, a wall-clock time), and recovery re-arms them. A timer for
a passivated order simply reactivates it through the router. The timers are
the service's event loop's (``actors.eventloop``): no thread of their own.

Deadlines come in as wall-clock times but are waited for on the monotonic
clock: each is converted once, when it is armed (``monotonic now + (at -
wall now)``), so a step of the wall clock after that (NTP, an operator)
neither delays nor hastens an armed timer.

A deadline that is not a finite, positive number (NaN, inf, a string, a
negative time) or lies more than a year ahead is refused when armed: logged, counted
(``oms_timer_bad_deadlines_total``) and armed ``BAD_DEADLINE_DELAY_S`` from now
instead, so the order is still woken (its engine re-checks what is due) and
the heap never holds a value that compares wrongly. A failure to deliver one
timer is logged and counted; the other timers fire.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from actors import supervision
from actors.eventloop import EventLoop
from actors.metrics import Metrics
from actors.ports import Deliver
from oms.messages import TimerFired
from oms.process_check import MAX_DURATION_S

logger = logging.getLogger(__name__)

BAD_DEADLINE_DELAY_S = 1.0
# further out than this is a bad deadline too: a definition's durations are at most
# MAX_DURATION_S (``oms.process_check``); the day more is for rounding and clock steps
MAX_DELAY_S = MAX_DURATION_S + 86400.0


class TimerService:
    """Order timers on an ``EventLoop`` (a private one, one thread, if none
    is given: as a stand-alone test uses it). ``schedule`` may be called
    from any thread (recovery arms jeopardy deadlines from the main thread)."""

    def __init__(self, deliver: Deliver, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 loop: EventLoop | None = None) -> None:
        self._deliver = deliver
        self._metrics = metrics
        self._clock = clock
        self._supervisor = supervision.current()
        self._own_loop = loop is None
        if loop is None:
            loop = EventLoop("timers", supervisor=self._supervisor, clock=monotonic).start()
        self._loop = loop
        self._armed = 0

    def schedule(self, at: float, order_id: str, token: tuple[Any, ...]) -> None:
        """Arm a timer for wall-clock time ``at``."""
        # converted now, once: a later step of the wall clock changes nothing
        due = self._loop.time() + self._delay(at, order_id, token)
        if self._loop.in_loop():
            self._arm(due, order_id, token)
        else:
            self._loop.call_soon(lambda: self._arm(due, order_id, token))

    def _arm(self, due: float, order_id: str, token: tuple[Any, ...]) -> None:
        self._armed += 1
        self._loop.call_at(due, lambda: self._fire(order_id, token))

    def _delay(self, at: Any, order_id: str, token: tuple[Any, ...]) -> float:
        """Seconds from now until ``at``; a bad deadline is refused (see above)."""
        now = self._clock()
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) \
                or at <= 0 or at - now > MAX_DELAY_S:
            logger.error("order %s: timer %r has a bad deadline %r; armed %g s from now "
                         "instead", order_id, token, at, BAD_DEADLINE_DELAY_S,
                         extra={"order_id": order_id})
            if self._metrics is not None:
                self._metrics.bad_deadlines.inc()
            return BAD_DEADLINE_DELAY_S
        return max(0.0, at - now)

    def __len__(self) -> int:
        return self._armed

    def alive(self) -> bool:
        return self._loop.alive()

    def _fire(self, order_id: str, token: tuple[Any, ...]) -> None:
        self._armed -= 1
        try:
            self._deliver(order_id, TimerFired(token))
        except Exception:  # one timer must not stop the others (failure rule)
            if self._supervisor is not None:
                self._supervisor.survived("timers")
            else:
                logger.exception("timer %r for order %s could not be delivered", token,
                                 order_id, extra={"order_id": order_id})
                if self._metrics is not None:
                    self._metrics.internal_errors.labels("timers").inc()

    def stop(self) -> None:
        """A private loop ends; on the service's loop the timers end with it."""
        if self._own_loop:
            self._loop.stop(5)
