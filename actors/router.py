"""Where order actors live: live ones by id, passivated ones in the store.

``deliver(order_id, message)`` is how anything reaches an order: the gateway
with a reply, the domain-events endpoint with an event, the timer service,
the intake with a cancel. A live actor gets the message at once; a
passivated order is loaded from its snapshot and a new actor started. A
finished order (not in the ``active`` index) takes no more messages.

Locks are striped by order id: delivering to, activating or passivating one
order holds only its stripe, so an activation (a store read) does not stall
the others, and an actor cannot passivate while a message is being put into
its inbox.

Passivation waits for an idle period (``passivate_after_s``, as Akka's
passivation timeout): an actor that has nothing to do registers as idle, a
sweep nudges idle ones with ``Rest``, and the actor itself decides, in its
own slice, whether it may leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.order import Inbound, OrderActor, Rest
from actors.pool import Dispatcher
from oms.engine import Engine
from oms.messages import DomainEvent
from oms.metrics import Metrics
from oms.model import Order
from oms.states import OrderState
from oms.store import CorruptRecord, Store

if TYPE_CHECKING:
    from pykka import ActorRef

logger = logging.getLogger(__name__)


@dataclass
class OrderContext:
    """What an order actor talks to. Filled in by ``actors.service``."""

    dispatcher: Dispatcher
    store: Store
    metrics: Metrics
    engines: dict[str, Engine]
    writer: Any = None
    publisher: Any = None
    timers: Any = None
    sequencer: Any = None
    gateways: Any = None
    router: OrderRouter | None = None  # type: ignore[assignment]


class OrderRouter:
    STRIPES = 64

    def __init__(self, ctx: OrderContext, passivate_after_s: float = 1.0) -> None:
        self.ctx = ctx
        ctx.router = self
        self._live: dict[str, ActorRef[OrderActor]] = {}
        self._stripes = [threading.Lock() for _ in range(self.STRIPES)]
        self._lock = threading.Lock()  # the counts below
        self.in_flight = 0
        self.states: Counter[str] = Counter()
        self.held_since: dict[str, float] = {}  # held orders: when they became held (wall)
        self.passivate_after_s = passivate_after_s
        self.idle: dict[str, OrderActor] = {}  # single dict ops are atomic under the GIL
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="passivator", daemon=True)
        self._sweeper.start()

    def _stripe(self, order_id: str) -> threading.Lock:
        return self._stripes[hash(order_id) % self.STRIPES]

    # -- counts ------------------------------------------------------------

    def counted(self, order: Order) -> None:
        """Count an unfinished order just created."""
        self.counted_raw(str(order.state), order.order_id, order.updated_ts)

    def counted_raw(self, state: str, order_id: str | None = None,
                    held_since: float | None = None) -> None:
        """Count an unfinished order from its raw snapshot (recovery)."""
        with self._lock:
            self.in_flight += 1
            self.states[state] += 1
            if state == OrderState.HELD and order_id is not None:
                self.held_since[order_id] = held_since or time.time()

    def state_changed(self, old: OrderState, new: OrderState,
                      order_id: str | None = None) -> None:
        with self._lock:
            self.states[str(old)] -= 1
            if not new.terminal:
                self.states[str(new)] += 1
            if order_id is not None:
                if new == OrderState.HELD:
                    self.held_since[order_id] = time.time()
                elif old == OrderState.HELD:
                    self.held_since.pop(order_id, None)

    def oldest_held_age(self) -> float:
        """Seconds since the longest-held unfinished order became held; 0 if none.
        Read at scrape time: one pass over the held orders only."""
        with self._lock:
            return _age(min(self.held_since.values(), default=None))

    def snapshot(self) -> dict[str, Any]:
        live = len(self._live)
        with self._lock:
            return {
                "live": live,
                "passivated": max(0, self.in_flight - live),
                "in_flight": self.in_flight,
                "states": {k: v for k, v in self.states.items() if v > 0},
                "oldest_held_s": _age(min(self.held_since.values(), default=None)),
            }

    # -- lifecycle ---------------------------------------------------------

    def start(self, order: Order, first: Any, reason: str = "new") -> None:
        """Start an actor for an order in hand (just created or recovered)."""
        with self._stripe(order.order_id):
            ref = self._live.get(order.order_id)
            if ref is None:
                ref = self._spawn(order, reason)
            ref.tell(first)

    def deliver(self, order_id: str, message: Any) -> bool:
        """Hand a message to an order, reactivating it if passivated."""
        with self._stripe(order_id):
            ref = self._live.get(order_id)
            if ref is None:
                order = self._load(order_id)
                if order is None:
                    self.ctx.metrics.stale_messages.labels("finished_order").inc()
                    return False
                ref = self._spawn(order, "message")
            ref.tell(message)
            return True

    def deliver_event(self, key: bytes, order_id: str, event: DomainEvent) -> bool:
        return self.deliver(order_id, Inbound(key, event))

    def _spawn(self, order: Order, reason: str) -> ActorRef[OrderActor]:
        engine = self.ctx.engines[order.order_type]
        ref = OrderActor.spawn(self.ctx, order, engine)
        self._live[order.order_id] = ref
        self.ctx.metrics.activations.labels(reason).inc()
        return ref

    def _load(self, order_id: str) -> Order | None:
        store = self.ctx.store
        try:
            with store.read() as txn:
                if not store.is_active(txn, order_id):
                    return None
                order = store.load(txn, order_id)
        except CorruptRecord as exc:
            logger.error("%s", exc, extra={"order_id": order_id})
            self.ctx.metrics.corrupt_records.inc()
            return None
        if order is not None and order.order_type not in self.ctx.engines:
            logger.error("order %s has unknown order type %r", order_id, order.order_type)
            return None
        return order

    def passivate(self, actor: OrderActor) -> bool:
        """Drop a waiting actor whose state is durable; False if mail came in."""
        order_id = actor.order.order_id
        with self._stripe(order_id):
            if actor.actor_inbox.queue:
                return False
            self._live.pop(order_id, None)
            self.idle.pop(order_id, None)
            actor.stop_now()
        self.ctx.metrics.passivations.inc()
        return True

    def retire(self, actor: OrderActor) -> None:
        """A finished order: drop its actor for good."""
        order_id = actor.order.order_id
        with self._stripe(order_id):
            if actor.actor_inbox.queue:
                return
            self.idle.pop(order_id, None)
            retired = self._live.pop(order_id, None) is not None
            actor.stop_now()
        if retired:
            with self._lock:
                self.in_flight -= 1

    def _sweep(self) -> None:
        """Nudge actors idle for longer than ``passivate_after_s``."""
        while not self._stopped.wait(max(0.05, self.passivate_after_s / 2)):
            now = time.monotonic()
            for actor in list(self.idle.copy().values()):
                since = actor.idle_since
                if since is not None and now - since >= self.passivate_after_s:
                    try:
                        actor.actor_ref.tell(Rest())
                    except Exception:  # stopped meanwhile
                        self.idle.pop(actor.order.order_id, None)

    def stop(self) -> None:
        self._stopped.set()
        self._sweeper.join(5)

    def live_ids(self) -> list[str]:
        return list(self._live)


def _age(since: float | None) -> float:
    return 0.0 if since is None else max(0.0, time.time() - since)
