"""Where order actors live: live ones by id, passivated ones in the store.

``deliver(order_id, message)`` is how anything reaches an order: the gateway
with a reply, the domain-events endpoint with an event, the timer service,
the intake with a cancel. A live actor gets the message at once (an idle
one, on the loop thread, handles it in place: ``actors.pool.PooledActor.hold``);
a passivated order is loaded from its snapshot and a new actor started. A
finished order (not in the ``active`` index) takes no more messages.

Locks are striped by order id: delivering to, activating or passivating one
order holds only its stripe, so an activation (a store read) does not stall
the others, and an actor cannot passivate while a message is being put into
its inbox.

``deliver`` is also the one delivery choke point of the failure rule
(docs/architecture.md, "Failure rule"): a dead actor found in the live set
is reloaded from its snapshot, so no thread ever meets ``ActorDeadError``
here. Crashes and reloads are ``actors.revival.Revival``, a part of the
router; the counts other threads read are ``actors.order_counts``.

Passivation waits for an idle period (``passivate_after_s``, as Akka's
passivation timeout): an actor that has nothing to do registers as idle, a
sweep nudges idle ones with ``Rest``, and the actor itself decides, in its
own slice, whether it may leave.

The router is built before the timers, sequencer and gateways, which need
its ``deliver``; the order actors need them. So its constructor takes the
parts built before it (``OrderCore``) and a factory for the others
(``parts``, given ``deliver``), and builds the order actors'
``OrderContext`` from both: whole and frozen when ``__init__`` returns
(``actors.ports``).
"""

from __future__ import annotations

import logging
import threading
import time
from itertools import islice
from typing import TYPE_CHECKING, Any

import pykka

from actors import effects
from actors.effects import Origin
from actors.eventloop import EventLoop
from actors.inbox import tell
from actors.order import Inbound, OrderActor, Rest
from actors.order_counts import OrderCounts
from actors.ports import OrderContext, OrderCore, PartsFactory
from actors.revival import Revival
from oms.messages import DomainEvent
from oms.model import Order
from oms.outstanding import awaiting_reply
from oms.states import OrderState
from storage.records import CorruptRecord

if TYPE_CHECKING:
    from pykka import ActorRef

logger = logging.getLogger(__name__)

SWEEP_CHUNK = 512  # idle actors the passivation sweep nudges per loop turn at most


class OrderRouter(Revival):
    STRIPES = 64

    def __init__(self, core: OrderCore, parts: PartsFactory, loop: EventLoop,
                 passivate_after_s: float = 1.0) -> None:
        self._live: dict[str, ActorRef[OrderActor]] = {}
        self._stripes = [threading.Lock() for _ in range(self.STRIPES)]
        self.counts = OrderCounts()
        self.passivate_after_s = passivate_after_s
        self.idle: dict[str, OrderActor] = {}  # single dict ops are atomic under the GIL
        self._nudged: set[str] = set()  # told to rest in this pass of the sweep
        self._reviving: dict[str, list[Any]] = {}  # messages for orders being reloaded
        self._counted: dict[str, OrderState | None] = {}  # ... the state counts show
        self._stopped = threading.Event()
        self._loop = loop
        made = parts(self.deliver)  # they only keep deliver: no order exists yet
        self.ctx = OrderContext(core.dispatcher, core.store, core.metrics, core.engines,
                                core.writer, core.publisher, made.timers, made.sequencer,
                                made.gateways, self, self.counts)
        loop.call_soon(self._sweep)  # the passivation sweep is a timer on the loop

    def _stripe(self, order_id: str) -> threading.Lock:
        return self._stripes[hash(order_id) % self.STRIPES]

    # -- lifecycle ---------------------------------------------------------

    def start(self, order: Order, first: Any, reason: str = "new",
              started: tuple[Any, ...] | None = None) -> None:
        """Start an actor for an order in hand (just created or recovered)
        and tell it ``first`` (unless None). ``started``: the effects of the
        ``Start`` it was created with (``actors.effects.NewOrder``), durable
        with it: they run now, after the actor exists, as the writer runs a
        snapshot's."""
        order_id = order.order_id
        with self._stripe(order_id):
            ref = self._live.get(order_id)
            if ref is None and order_id not in self._reviving:
                # with nothing to tell and a reply awaited (that, or its timeout, comes
                # to it), its first slice would find nothing to do: it is not scheduled
                ref = self._spawn(order, reason,
                                  idle=first is None and awaiting_reply(order))
            held = self._tell(order_id, ref, first) if first is not None else None
        if held is not None:
            held.run_held(first)
        if started:
            origin = Origin(self.ctx, order_id, order.order_type, order.source_system,
                            order.created_ts)
            failed = effects.run_all(started, origin)
            if failed is not None:
                effects.report_failed(failed, origin, self.ctx.metrics)

    def deliver(self, order_id: str, message: Any) -> bool:
        """Hand a message to an order, reactivating it if passivated."""
        with self._stripes[hash(order_id) % self.STRIPES]:  # self._stripe(order_id)
            ref = self._live.get(order_id)
            if ref is None and order_id not in self._reviving:
                order = self._load(order_id)
                if order is None:
                    self.ctx.metrics.stale_messages.labels("finished_order").inc()
                    return False
                ref = self._spawn(order, "message")
            held = self._tell(order_id, ref, message)
        if held is not None:  # handled in place, outside the stripe (a crash takes it)
            held.run_held(message)
        return True

    def deliver_event(self, key: bytes, order_id: str, event: DomainEvent) -> bool:
        return self.deliver(order_id, Inbound(key, event))

    def _tell(self, order_id: str, ref: ActorRef[OrderActor] | None,
              message: Any) -> OrderActor | None:
        """The one place a message enters an order actor (stripe held). An
        idle actor on this loop thread is held for it instead (``PooledActor.hold``)
        and returned: the caller hands it the message once the stripe is
        released (``run_held``), as its slice would, with no put or slice."""
        reviving = self._reviving.get(order_id)
        if reviving is not None:
            reviving.append(message)
            return None
        assert ref is not None
        actor = ref._actor_weakref()
        if actor is not None and actor.hold():
            return actor
        try:
            tell(ref, message)  # ref.tell(message), without pykka's frames
        except pykka.ActorDeadError:  # never expected: crashed() takes it out first
            logger.error("order %s: its actor was dead but still live; reloading the order "
                         "from its last durable snapshot", order_id, extra={"order_id": order_id})
            self.ctx.metrics.internal_errors.labels("router").inc()
            self._live.pop(order_id, None)
            self.idle.pop(order_id, None)
            dead = ref._actor_weakref()  # the counts show its state
            self._revive(order_id, [message], dead.counted_state if dead else None)
        return None

    def _spawn(self, order: Order, reason: str, idle: bool = False) -> ActorRef[OrderActor]:
        engine = self.ctx.engines[order.order_type]
        ref = OrderActor.spawn(self.ctx, order, engine, idle=idle)
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
            self.counts.retired()

    def _sweep(self) -> None:
        """Nudge actors idle over ``passivate_after_s``; a loop timer, every
        half of it. A bounded chunk a turn: while more may be due, the sweep
        goes on in the next turn (a call), not in this one."""
        if self._stopped.is_set():
            return
        more = False
        try:
            more = self._sweep_once()
        finally:
            if more:
                self._loop.call_soon(self._sweep)
            else:
                self._nudged.clear()
                self._loop.call_later(max(0.05, self.passivate_after_s / 2), self._sweep)

    def _sweep_once(self) -> bool:
        """Tell at most ``SWEEP_CHUNK`` actors idle over ``passivate_after_s``
        to ``Rest``; True if more may be due. ``idle`` is in the order its
        actors went idle (each is put in when it goes idle and taken out when
        it stops being so), so the due ones are at its front and the first
        one not due ends the pass: the work is what is due, never a walk of
        every idle actor. Those nudged in this pass that stay idle (their
        newest snapshot not yet durable) are at the front too: they are
        passed over (``_nudged``), and nudged again in the next pass."""
        now, nudged = time.monotonic(), self._nudged
        told = 0
        for actor in list(islice(self.idle.values(), len(nudged) + SWEEP_CHUNK)):
            order_id = actor.order.order_id
            if order_id in nudged:
                continue
            since = actor.idle_since
            if since is not None and now - since < self.passivate_after_s:
                return False  # the rest went idle later still
            if told == SWEEP_CHUNK:
                return True
            nudged.add(order_id)
            told += 1
            try:
                actor.actor_ref.tell(Rest())
            except Exception:  # noqa: BLE001 - stopped meanwhile
                self.idle.pop(order_id, None)
        return told == SWEEP_CHUNK

    def alive(self) -> bool:
        return self._loop.alive()  # the sweep runs on the loop

    def stop(self) -> None:
        self._stopped.set()

    def live_ids(self) -> list[str]:
        return list(self._live)

    def snapshot(self) -> dict[str, Any]:
        """The counts and the size of the live set: safe from any thread
        (the counts under their lock; ``len`` of the live set is atomic)."""
        return self.counts.snapshot(len(self._live))


