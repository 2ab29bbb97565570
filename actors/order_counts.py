"""The order counts: unfinished orders per state, in flight (admission),
held since when, and those parked in the ``internal_error`` hold.

One lock guards them, so any thread may read or update them: the order
actors and the intake on the loop, recovery on the main thread, the
metrics thread at scrape time (``snapshot``, ``oldest_held_age``). This is
the seam through which other threads see how many orders there are; none
of them touches an actor.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from typing import Any

from oms.engine import INTERNAL_ERROR
from oms.model import Order
from oms.states import OrderState

_TERMINAL = frozenset(str(s) for s in OrderState if s.terminal)


class OrderCounts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0  # unfinished orders that hold an admission slot
        self.states: Counter[str] = Counter()
        self.held_since: dict[str, float] = {}  # held orders: when they became held (wall)
        # (time, order id) of held orders, oldest first: the oldest without a pass
        # over them all; an entry whose order was let go (or held again) since is
        # dropped when it reaches the top, and all are rebuilt once they are
        # more than twice the held orders (``_held``)
        self._oldest: list[tuple[float, str]] = []
        self.parked: set[str] = set()  # held as internal_error: no admission slot

    def counted(self, order: Order) -> None:
        """Count an unfinished order just created."""
        self.counted_raw(str(order.state), order.order_id, order.updated_ts)

    def counted_raw(self, state: str, order_id: str | None = None,
                    held_since: float | None = None, reason: str | None = None) -> None:
        """Count an unfinished order from its raw snapshot (recovery)."""
        with self._lock:
            if state not in _TERMINAL:  # only its CRM notice is out: in flight, as live,
                self.states[state] += 1  # but no state count (state_changed drops it too)
            if state == OrderState.HELD and order_id is not None:
                self._held(order_id, held_since or time.time())
            if order_id is not None and state == "held" and reason == INTERNAL_ERROR:
                self.parked.add(order_id)  # held for an internal error: no admission slot
            else:
                self.in_flight += 1

    def park(self, order_id: str, parked: bool) -> None:
        """An order entered (or left) the internal_error hold: it gives back
        (or takes again) its admission slot."""
        with self._lock:
            if parked and order_id not in self.parked:
                self.parked.add(order_id)
                self.in_flight -= 1
            elif not parked and order_id in self.parked:
                self.parked.discard(order_id)
                self.in_flight += 1

    def state_changed(self, old: OrderState, new: OrderState,
                      order_id: str | None = None) -> None:
        with self._lock:
            self.states[str(old)] -= 1
            if not new.terminal:
                self.states[str(new)] += 1
            if order_id is not None:
                if new == OrderState.HELD:
                    self._held(order_id, time.time())
                elif old == OrderState.HELD:
                    self.held_since.pop(order_id, None)

    def recount(self, old: OrderState, new: OrderState, order_id: str | None = None) -> None:
        """Counts back in line after a reload: the lost actor had counted
        ``old`` (perhaps a state it reached only in memory), and so had the
        held orders' ages (else ``oldest_held_s`` would age for ever)."""
        if old == new:
            return
        with self._lock:
            if not old.terminal:
                self.states[str(old)] -= 1
            if not new.terminal:
                self.states[str(new)] += 1
            if order_id is not None:
                if new == OrderState.HELD and order_id not in self.held_since:
                    self._held(order_id, time.time())
                elif old == OrderState.HELD:
                    self.held_since.pop(order_id, None)

    def retired(self) -> None:
        """A finished order left memory for good: its admission slot is free."""
        with self._lock:
            self.in_flight -= 1

    def oldest_held_age(self) -> float:
        """Seconds since the longest-held unfinished order became held; 0 if none.
        Read at scrape time: the top of ``_oldest``, no pass over the held orders."""
        with self._lock:
            return _age(self._oldest_since())

    def snapshot(self, live: int) -> dict[str, Any]:
        """The counts, with ``live`` order actors (the router's live set)."""
        with self._lock:
            return {
                "live": live,
                "passivated": max(0, self.in_flight - live),
                "in_flight": self.in_flight,
                "states": {k: v for k, v in self.states.items() if v > 0},
                "oldest_held_s": _age(self._oldest_since()),
            }

    def _held(self, order_id: str, since: float) -> None:
        """(Lock held.) The order is held since ``since``."""
        self.held_since[order_id] = since
        heapq.heappush(self._oldest, (since, order_id))
        if len(self._oldest) > 2 * len(self.held_since) + 1024:  # let-go ones piled up
            self._oldest = [(t, o) for o, t in self.held_since.items()]
            heapq.heapify(self._oldest)

    def _oldest_since(self) -> float | None:
        """(Lock held.) When the longest-held order became held; None if none
        is: the top of ``_oldest``, once the entries of orders let go are off it."""
        oldest, held = self._oldest, self.held_since
        while oldest:
            since, order_id = oldest[0]
            if held.get(order_id) == since:
                return since
            heapq.heappop(oldest)
        return None


def _age(since: float | None) -> float:
    return 0.0 if since is None else max(0.0, time.time() - since)
