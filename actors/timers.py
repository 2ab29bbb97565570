"""Timers: one thread that delivers ``TimerFired`` to orders when due.

Timers are not persisted here: an order's snapshot holds when each retry is
due (``retry_at``, a wall-clock time), and recovery re-arms them. A timer for
a passivated order simply reactivates it through the router.

Deadlines come in as wall-clock times but are waited for on the monotonic
clock: each is converted once, when it is armed (``monotonic now + (at -
wall now)``), so a step of the wall clock after that (NTP, an operator)
neither delays nor hastens an armed timer.

A deadline that is not a finite, positive number (NaN, inf, a string, a
negative time) or lies more than a year ahead is refused when armed: logged, counted
(``oms_timer_bad_deadlines_total``) and armed ``BAD_DEADLINE_DELAY_S`` from now
instead, so the order is still woken (its engine re-checks what is due) and
the heap never holds a value that compares wrongly. A failure to deliver one
timer is logged and counted; the thread goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from actors import supervision
from oms.messages import TimerFired

logger = logging.getLogger(__name__)

BAD_DEADLINE_DELAY_S = 1.0
MAX_DELAY_S = 366 * 86400.0  # further out than this is a bad deadline too


class TimerService:
    def __init__(self, deliver: Any, metrics: Any = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._deliver = deliver
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._supervisor = supervision.current()
        self._thread = threading.Thread(target=supervision.guarded("timers", self._run),
                                        name="timers", daemon=True)
        self._thread.start()

    def schedule(self, at: float, order_id: str, token: tuple[Any, ...]) -> None:
        """Arm a timer for wall-clock time ``at``."""
        due = self._monotonic() + self._delay(at, order_id, token)
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), order_id, token))
            if self._heap[0][2] == order_id and self._heap[0][3] == token:
                self._cond.notify()

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
        return len(self._heap)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = self._monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    wait = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                due = []
                now = self._monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
            for _at, _seq, order_id, token in due:
                self._fire(order_id, token)

    def _fire(self, order_id: str, token: tuple[Any, ...]) -> None:
        try:
            self._deliver(order_id, TimerFired(token))
        except Exception:  # one timer must not end the thread (failure rule)
            if self._supervisor is not None:
                self._supervisor.survived("timers")
            else:
                logger.exception("timer %r for order %s could not be delivered", token,
                                 order_id, extra={"order_id": order_id})
                if self._metrics is not None:
                    self._metrics.internal_errors.labels("timers").inc()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)
