"""Sequencing: orders with the same sequencing key run one at a time, in
acceptance order (contract §4, telecom: same ``customer.id``).

An order enters its queue from the store writer's commit callback, so
queues follow commit (acceptance) order. The queues live in memory and are
rebuilt at start from the unfinished orders in the store, sorted by order id
(which is acceptance order), before any order resumes.

An order leaves its queue when it becomes terminal, whether or not it had
its turn (a cancelled or aborted ``pending`` order leaves at once). A turn
that cannot be delivered (the order is finished or gone: ``deliver``
returns False) passes to the next order, so a leave that was lost or an
enter that came after the leave never blocks a customer's queue.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, defaultdict
from typing import Any, NamedTuple

from actors.loop import LoopActor
from actors.ports import Deliver
from oms.messages import Turn

logger = logging.getLogger(__name__)


class SeqRequest(NamedTuple):
    key: str
    order_id: str
    enter: bool


class SeqPreload(NamedTuple):
    entries: list[tuple[str, str, bool]]


class SeqTurns(NamedTuple):
    """The rest of a preload's turns, handed out ``PRELOAD_CHUNK`` at a time."""

    entries: list[tuple[str, str, bool]]


PRELOAD_CHUNK = 256  # turns handed out per message: each may load an order (a bounded turn)


class Sequencer(LoopActor):
    thread_name = "sequencer"

    def __init__(self, deliver: Deliver) -> None:
        super().__init__()
        self._deliver = deliver
        # a queue per key, in acceptance order: an OrderedDict, so that entering,
        # leaving and finding the head cost the same however long one customer's
        # queue is (a list made each of them a scan of the whole queue)
        self.queues: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)

    def on_receive(self, message: Any) -> None:
        if isinstance(message, SeqPreload):
            self._preload(message.entries)
            return
        if isinstance(message, SeqTurns):
            self._turns(message.entries)
            return
        if not isinstance(message, SeqRequest):
            return
        queue = self.queues[message.key]
        if message.enter:
            if message.order_id not in queue:
                queue[message.order_id] = None
            if next(iter(queue)) != message.order_id:
                self._deliver(message.order_id, Turn(go=False))
            else:
                self._give(message.key)
        elif message.order_id in queue:
            was_first = next(iter(queue)) == message.order_id
            del queue[message.order_id]
            if was_first:
                self._give(message.key)
        if not queue:
            self.queues.pop(message.key, None)

    def _give(self, key: str) -> None:
        """Give the turn to the head of ``key``'s queue; a head that cannot
        take it (finished or unknown) is dropped and the next one asked."""
        queue = self.queues[key]
        while queue:
            head = next(iter(queue))
            if self._deliver(head, Turn(go=True)) is not False:
                return
            logger.warning("sequencer %s: order %s is finished or gone; the turn passes on",
                           key, head)
            queue.popitem(last=False)

    def _preload(self, entries: list[tuple[str, str, bool]]) -> None:
        """Recovered orders (key, id, has_turn) in acceptance order: the queues
        at once; then every queue head gets its turn and the others learn they
        wait, ``PRELOAD_CHUNK`` orders a message (each may load an order from
        the store), so no loop turn takes them all. A request handled between
        two chunks finds its queue complete; a head that got its turn from it
        and again from the preload ignores the second (``on_turn``: stale)."""
        for key, order_id, _turn in entries:
            self.queues[key].setdefault(order_id, None)
        self._turns(entries)

    def _turns(self, entries: list[tuple[str, str, bool]]) -> None:
        rest = entries[PRELOAD_CHUNK:]
        if rest:  # first: an order whose delivery fails below costs no other its turn
            self.actor_ref.tell(SeqTurns(rest))
        for key, order_id, turn in entries[:PRELOAD_CHUNK]:
            queue = self.queues.get(key)
            if not queue or order_id not in queue:
                continue  # dropped: finished or gone
            try:
                if next(iter(queue)) == order_id:
                    self._give(key)
                elif not turn:
                    self._deliver(order_id, Turn(go=False))
            except Exception:  # noqa: BLE001 - the failure rule: one order's, counted and logged
                self._loop.survived(self.component, sys.exc_info())
        if not rest:
            for key in [k for k, q in self.queues.items() if not q]:
                del self.queues[key]

    def preload(self, entries: list[tuple[str, str, bool]]) -> None:
        """Thread-safe: rebuild the queues from recovered orders."""
        self.actor_ref.tell(SeqPreload(entries))

    def request(self, key: str, order_id: str, enter: bool) -> None:
        """Thread-safe: ask for the turn of ``key`` or give it back."""
        self.tell(SeqRequest(key, order_id, enter))
