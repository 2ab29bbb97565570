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

``deliver`` is also the one delivery choke point of the failure rule
(docs/architecture.md, "Failure rule"): an order whose actor crashed is
taken out of the live set by ``crashed`` before its actor stops; messages
for it wait in ``_reviving`` until its last durable snapshot is reloaded
(after the writer has committed everything queued before), then go to the
new actor. An actor stopped by pykka's own ``stop`` hands its unsaved
slice and queued tells over the same way (``stopped``), and a dead actor
found in the live set anyway is reloaded too, so no thread ever meets
``ActorDeadError`` here.

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

import pykka

from actors import supervision
from actors.effects import Revive
from actors.eventloop import EventLoop
from actors.metrics import Metrics
from actors.order import Flushed, HoldInternalError, Inbound, OrderActor, Rest
from actors.pool import Dispatcher
from actors.store_writer import Barrier
from oms import errors
from oms.engine import INTERNAL_ERROR, Engine
from oms.messages import DomainEvent
from oms.model import Order
from oms.states import OrderState
from storage.records import CorruptRecord
from storage.store import Store

if TYPE_CHECKING:
    from pykka import ActorRef

logger = logging.getLogger(__name__)
_TERMINAL = frozenset(str(s) for s in OrderState if s.terminal)


@dataclass
class OrderContext:
    """What an order actor talks to. Filled in by ``app.service``."""

    dispatcher: Dispatcher | EventLoop  # what runs the order actors (the loop in a service)
    store: Store
    metrics: Metrics
    engines: dict[str, Engine]
    writer: Any = None
    publisher: Any = None
    timers: Any = None
    sequencer: Any = None
    gateways: Any = None
    router: OrderRouter = None  # type: ignore[assignment]  # set by the service before any order runs (issue 14 item 4 removes this)


class OrderRouter:
    STRIPES = 64

    def __init__(self, ctx: OrderContext, loop: EventLoop,
                 passivate_after_s: float = 1.0) -> None:
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
        self._reviving: dict[str, list[Any]] = {}  # messages for orders being reloaded
        self._counted: dict[str, OrderState | None] = {}  # ... the state counts show
        self.parked: set[str] = set()  # held as internal_error: no admission slot
        self._stopped = threading.Event()
        self._loop = loop
        loop.call_soon(self._sweep)  # the passivation sweep is a timer on the loop

    def _stripe(self, order_id: str) -> threading.Lock:
        return self._stripes[hash(order_id) % self.STRIPES]

    # -- counts ------------------------------------------------------------

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
                self.held_since[order_id] = held_since or time.time()
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
                    self.held_since[order_id] = time.time()
                elif old == OrderState.HELD:
                    self.held_since.pop(order_id, None)

    def oldest_held_age(self) -> float:
        """Seconds since the longest-held unfinished order became held; 0 if none.
        Read at scrape time: one pass over the held orders only."""
        with self._lock:
            return _age(min(self.held_since.values(), default=None))

    def recount(self, old: OrderState, new: OrderState) -> None:
        """Counts back in line after a reload: the lost actor had counted
        ``old`` (perhaps a state it reached only in memory)."""
        if old == new:
            return
        with self._lock:
            if not old.terminal:
                self.states[str(old)] -= 1
            if not new.terminal:
                self.states[str(new)] += 1

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
        order_id = order.order_id
        with self._stripe(order_id):
            ref = self._live.get(order_id)
            if ref is None and order_id not in self._reviving:
                ref = self._spawn(order, reason)
            self._tell(order_id, ref, first)

    def deliver(self, order_id: str, message: Any) -> bool:
        """Hand a message to an order, reactivating it if passivated."""
        with self._stripe(order_id):
            ref = self._live.get(order_id)
            if ref is None and order_id not in self._reviving:
                order = self._load(order_id)
                if order is None:
                    self.ctx.metrics.stale_messages.labels("finished_order").inc()
                    return False
                ref = self._spawn(order, "message")
            self._tell(order_id, ref, message)
            return True

    def deliver_event(self, key: bytes, order_id: str, event: DomainEvent) -> bool:
        return self.deliver(order_id, Inbound(key, event))

    def _tell(self, order_id: str, ref: ActorRef[OrderActor] | None, message: Any) -> None:
        """The one place a message enters an order actor (stripe held)."""
        reviving = self._reviving.get(order_id)
        if reviving is not None:
            reviving.append(message)
            return
        assert ref is not None
        try:
            ref.tell(message)
        except pykka.ActorDeadError:  # never expected: crashed() takes it out first
            logger.error("order %s: its actor was dead but still live; reloading the order "
                         "from its last durable snapshot", order_id, extra={"order_id": order_id})
            self.ctx.metrics.internal_errors.labels("router").inc()
            self._live.pop(order_id, None)
            self.idle.pop(order_id, None)
            dead = ref._actor_weakref()  # the counts show its state
            self._revive(order_id, [message], dead.counted_state if dead else None)

    # -- the order failure rule ---------------------------------------------

    def crashed(self, actor: OrderActor, exc_info: Any, message: Any,
                handled: list[Any]) -> None:
        """An order actor's handler raised (``message``; None: its slice end).

        The one place the order failure rule is carried out: the actor leaves
        the live set at once (before it stops, so no tell meets a dead
        actor); the order's last durable snapshot is reloaded once the
        writer has committed what was queued before; the messages of the
        slice handled before the crash are delivered to it again, then it is
        held as ``internal_error`` (``oms.engine.hold_internal_error``), then
        it gets the messages still queued or arriving meanwhile. The message
        that raised (or a failed slice's messages) is dropped, and a request
        among them gets an ``internal`` error reply. No other order waits.
        """
        order_id = actor.order.order_id
        exc = exc_info[1]
        error = f"{type(exc).__name__}: {exc}"
        what = type(message).__name__ if message is not None else "the end of its slice"
        logger.error("order %s: handler raised on %s; reloading its last durable snapshot "
                     "and holding it as internal_error", order_id, what, exc_info=exc_info,
                     extra={"order_id": order_id})
        self.ctx.metrics.order_crashes.inc()
        if isinstance(message, HoldInternalError):  # the hold itself failed: no loop
            logger.critical("order %s could not be held; it stays at its last durable "
                            "snapshot until its next message", order_id,
                            extra={"order_id": order_id})
            with self._stripe(order_id):
                if self._live.get(order_id) is actor.actor_ref:
                    del self._live[order_id]
                self.idle.pop(order_id, None)
                actor.stop_now()
                self._revive(order_id, [], actor.counted_state, spawn=False)
            return
        dropped = [message] if message is not None else list(handled)
        replay = list(handled) if message is not None else []
        replay.append(HoldInternalError(error, tuple(dropped)))
        with self._stripe(order_id):
            if self._live.get(order_id) is actor.actor_ref:
                del self._live[order_id]
            self.idle.pop(order_id, None)
            queue = actor.actor_inbox.queue
            replay += [envelope.message for envelope in queue]
            queue.clear()
            actor.stop_now()
            self._revive(order_id, replay, actor.counted_state)
        for msg in dropped:
            _refuse(msg, "the order failed handling this request and is held as "
                         "internal_error; see the service log")

    def stopped(self, actor: OrderActor, handled: list[Any]) -> None:
        """An order actor stopped by pykka's ``ActorRef.stop`` (in its own
        slice; nothing of ours does that: passivation, retirement and crashes
        use ``stop_now``). pykka would drop what it had not made durable:
        the messages handled in this slice (their snapshot is never saved)
        and the tells queued behind the stop; a lost command reply or
        ``Start`` leaves the order waiting forever. So, as for a crash but
        without the hold: it leaves the live set now and the order is
        reloaded from its last durable snapshot with those messages.
        Asks stay queued: pykka answers them ``ActorDeadError``."""
        order_id = actor.order.order_id
        logger.error("order %s: its actor was stopped from outside; reloading the order from "
                     "its last durable snapshot", order_id, extra={"order_id": order_id})
        self.ctx.metrics.internal_errors.labels("router").inc()
        with self._stripe(order_id):
            if self._live.get(order_id) is not actor.actor_ref:
                return
            del self._live[order_id]
            self.idle.pop(order_id, None)
            queue = actor.actor_inbox.queue
            told = [e.message for e in queue if e.reply_to is None]
            asked = [e for e in queue if e.reply_to is not None]
            queue.clear()
            queue.extend(asked)
            told = [m for m in told if not isinstance(m, (Flushed, Rest))]  # for this instance
            self._revive(order_id, list(handled) + told, actor.counted_state)

    def _revive(self, order_id: str, messages: list[Any], counted: OrderState | None,
                spawn: bool = True) -> None:
        """Queue the reload behind every write already handed to the writer
        (``spawn`` False: only put the counts back in line, then leave it
        passivated)."""
        pending = self._reviving.get(order_id)
        if pending is not None:  # already on its way: add to it
            pending += messages
            return
        self._reviving[order_id] = messages
        self._counted[order_id] = counted
        revive = Revive(self, order_id, spawn, supervision.current())
        self.ctx.writer.tell(Barrier((revive,)))

    def revived(self, order_id: str, spawn: bool) -> None:
        """In the writer, after the barrier (``actors.effects.Revive``): start
        the order again from the store."""
        with self._stripe(order_id):
            messages = self._reviving.pop(order_id)
            counted = self._counted.pop(order_id)
            order = self._load(order_id)
            if order is not None:
                if counted is not None:
                    self.recount(counted, order.state)
                self.park(order_id, order.state is OrderState.HELD
                          and order.state_reason == INTERNAL_ERROR)
            if order is not None and not spawn and not messages:
                return
            if order is None:
                logger.warning("order %s finished or unreadable; %d messages for it dropped",
                               order_id, len(messages), extra={"order_id": order_id})
                for msg in messages:
                    _refuse(msg, "the order could not be reloaded; see the service log")
                return
            crash = any(isinstance(m, HoldInternalError) for m in messages)
            ref = self._spawn(order, "crash" if crash else "reload")
            for msg in messages:
                ref.tell(msg)

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
        """Nudge actors idle over ``passivate_after_s``; a loop timer, every half of it."""
        if self._stopped.is_set():
            return
        try:
            self._sweep_once()
        finally:
            self._loop.call_later(max(0.05, self.passivate_after_s / 2), self._sweep)

    def _sweep_once(self) -> None:
        now = time.monotonic()
        for actor in list(self.idle.copy().values()):
            since = actor.idle_since
            if since is not None and now - since >= self.passivate_after_s:
                try:
                    actor.actor_ref.tell(Rest())
                except Exception:  # noqa: BLE001 - stopped meanwhile
                    self.idle.pop(actor.order.order_id, None)

    def alive(self) -> bool:
        return self._loop.alive()  # the sweep runs on the loop

    def stop(self) -> None:
        self._stopped.set()

    def live_ids(self) -> list[str]:
        return list(self._live)


def _age(since: float | None) -> float:
    return 0.0 if since is None else max(0.0, time.time() - since)


def _refuse(message: Any, why: str) -> None:
    """Answer a request (cancel, operator action) that will not be handled."""
    reply_to = getattr(message, "reply_to", None)
    if callable(reply_to):
        try:
            reply_to(errors.error_reply(errors.INTERNAL, why))
        except Exception:
            logger.exception("could not answer a %s", type(message).__name__)
