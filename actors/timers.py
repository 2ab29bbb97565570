"""Timers: one thread that delivers ``TimerFired`` to orders when due.

Timers are not persisted here: an order's snapshot holds when each retry is
due (``retry_at``), and recovery re-arms them. A timer for a passivated order
simply reactivates it through the router.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from actors.eventloop import EventLoop
from oms.messages import TimerFired


class TimerService:
    def __init__(self, deliver: Any) -> None:
        self._deliver = deliver
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._thread.start()

    def schedule(self, at: float, order_id: str, token: tuple[Any, ...]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (at, next(self._seq), order_id, token))
            if self._heap[0][2] == order_id and self._heap[0][3] == token:
                self._cond.notify()

    def __len__(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.time()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    wait = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(wait)
                if self._stopped:
                    return
                due = []
                now = time.time()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
            for _at, _seq, order_id, token in due:
                self._deliver(order_id, TimerFired(token))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)


class LoopTimers:
    """Order timers on the service's event loop (``actors.eventloop``): no
    thread. ``schedule`` may be called from any thread (recovery runs on the
    main thread); the wall-clock deadline is turned into a monotonic one
    when it is armed, so a step of the wall clock later changes nothing."""

    def __init__(self, loop: EventLoop, deliver: Callable[[str, Any], Any],
                 clock: Callable[[], float] = time.time) -> None:
        self._loop = loop
        self._deliver = deliver
        self._clock = clock
        self._armed = 0

    def schedule(self, at: float, order_id: str, token: tuple[Any, ...]) -> None:
        """Arm a timer for wall-clock time ``at``."""
        if self._loop.in_loop():
            self._arm(at, order_id, token)
        else:
            self._loop.call_soon(lambda: self._arm(at, order_id, token))

    def _arm(self, at: float, order_id: str, token: tuple[Any, ...]) -> None:
        delay = max(0.0, at - self._clock())
        self._armed += 1
        self._loop.call_later(delay, lambda: self._fire(order_id, token))

    def _fire(self, order_id: str, token: tuple[Any, ...]) -> None:
        self._armed -= 1
        try:
            self._deliver(order_id, TimerFired(token))
        except Exception:  # one timer must not stop the others (failure rule)
            self._loop.survived("timers")

    def __len__(self) -> int:
        return self._armed

    def alive(self) -> bool:
        return self._loop.alive()

    def stop(self) -> None:
        """Nothing to stop: the timers end with the loop."""
