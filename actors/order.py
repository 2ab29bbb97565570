"""The order actor: a thin shell that feeds its order's engine messages and
carries out what the engine decides, strictly after persisting.

Per slice of messages it runs the engine for each, then sends one
``SaveOrder`` to the store writer with the engine's effects (send, publish,
arm a timer, reply; data, ``actors.effects``). The writer runs them only
once the snapshot is durable. When the writer confirms a snapshot and the order is
finished, the actor retires; when it is waiting (no reply outstanding), the
actor passivates once idle long enough (``_resting``): the router drops it
and the next message for the order reactivates it from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from actors.effects import Confirm, Origin, Tell
from actors.inbox import tell
from actors.pool import PooledActor
from actors.store_writer import Barrier, SaveOrder
from oms import snapshot
from oms.engine import INTERNAL_ERROR, Engine, hold_internal_error
from oms.messages import DomainEvent
from oms.model import Order
from oms.outstanding import AWAITING, FINISHED, WAITING, standing
from oms.states import OrderState

if TYPE_CHECKING:
    from actors.ports import OrderContext

logger = logging.getLogger(__name__)
_HELD = OrderState.HELD
_now = time.time
_new = tuple.__new__  # _new(SaveOrder, (...)): a NamedTuple without its generated __new__'s
# frame (every field given: 235 -> 128 ns a SaveOrder, 6.4 an order)


class _RecordBuffer(threading.local):
    """Each thread's buffer for the snapshot records of its order actors'
    saves (``oms.snapshot.encode_in``): a loop's, never shared."""

    def __init__(self) -> None:
        self.buf = bytearray(4096)


_records = _RecordBuffer()

class Flushed(NamedTuple):
    """The snapshot with this version is durable."""

    version: int


class Rest(NamedTuple):
    """From the router's sweep: you have been idle a while; passivate if you can."""


class HoldInternalError(NamedTuple):
    """From the router, first to an order reloaded after its handler raised."""

    error: str
    dropped: tuple[Any, ...]


class Inbound(NamedTuple):
    """A recorded domain event; ``key`` is its inbox record to consume."""

    key: bytes
    event: DomainEvent


class OrderActor(PooledActor):
    def __init__(self, ctx: OrderContext, order: Order, engine: Engine) -> None:
        super().__init__(ctx.dispatcher)
        self.ctx = ctx
        self.order = order
        self.engine = engine
        self._effects: list[Any] = []
        self._consumed: list[bytes] = []
        self._dirty = False
        self._durable = order.version  # the newest version the store confirmed
        # whether the write the order was loaded from (or created by) left it in
        # the store's active set, then whether its last snapshot sent did
        # (``SaveOrder.listed``): every order is loaded from there (``_load``,
        # recovery) or created there unless its Start finished it. (A terminal
        # order still delivering CRM notes is listed too: False only costs a put.)
        self._listed = not order.state.terminal
        self.idle_since: float | None = None  # when it last had nothing to do
        self._handled: list[Any] = []  # this slice's messages, replayed if it crashes
        self.counted_state = order.state  # its state in the router's counts
        self.origin = Origin(ctx, order.order_id, order.order_type, order.source_system,
                             order.created_ts)  # whose effects the writer runs

    def __str__(self) -> str:
        return f"OrderActor({self.order.order_id})"

    def on_receive(self, message: Any) -> Any:
        kind = type(message)  # exact types: all are final NamedTuples
        if kind is Flushed:
            self._durable = max(self._durable, message.version)
            return None
        if kind is Rest:
            self._rest(sweep=True)
            return None
        if self.idle_since is not None:
            self._busy()
        received = message
        order = self.order
        before = order.state
        parked = before == _HELD and order.state_reason == INTERNAL_ERROR
        if kind is HoldInternalError:
            for msg in message.dropped:
                if isinstance(msg, Inbound):  # the event that crashed it: not again
                    self._consumed.append(msg.key)
            turning = hold_internal_error(self.engine, order, message.error, message.dropped,
                                          time.time())
            self._effects.extend(turning.effects)
        else:
            if kind is Inbound:
                self._consumed.append(message.key)
                self._dirty = True
                message = message.event
            # its effects appended to the slice's list itself (a crash drops the
            # actor and that list with it: ``OrderRouter.crashed``)
            turning = self.engine.handle(order, message, _now(), self._effects)
        if turning.stale:
            self.ctx.metrics.stale_messages.labels(type(message).__name__).inc()
        if turning.changed:
            self._dirty = True
        after = order.state
        if after is not before and after != before:  # (the same member: most messages)
            self.ctx.counts.state_changed(before, after, order.order_id)
            self.counted_state = after
        if (parked or after == _HELD) and _parked(order) != parked:
            self.ctx.counts.park(order.order_id, not parked)
        self._handled.append(received)
        return None

    def on_crash(self, exc_info: Any, message: Any) -> None:
        """The order failure rule: see ``OrderRouter.crashed``."""
        handled, self._handled = self._handled, []
        self.ctx.router.crashed(self, exc_info, message, handled)

    def on_stop(self) -> None:
        """Stopped by pykka's own ``ActorRef.stop`` (ours use ``stop_now``):
        see ``OrderRouter.stopped``."""
        self.ctx.router.stopped(self, self._handled)
        self._handled = []

    def on_slice_end(self) -> None:
        """The slice's one save: its snapshot, if it changed the order, with
        its effects, to the writer (``SaveOrder``); else its effects alone,
        to run after what is queued before them (``Barrier``), or nothing."""
        if self._dirty:
            order = self.order
            effects = self._effects
            stands = standing(order)  # finished, awaiting a reply, or neither: asked once
            finished = stands == FINISHED
            if stands:  # (not AWAITING)
                # only an order that may rest needs to hear its snapshot is durable
                # (``_rest``): one that awaits a reply gets this note with a later
                # snapshot, as a dirty slice is the only way out of awaiting one.
                # Saves a message and a slice for most snapshots.
                self._resting(effects, finished)
            consumed = self._consumed
            # the slice's lists themselves, handed over (the actor starts new ones):
            # a copy of each was one more object a save, made and freed for nothing
            self.ctx.writer.tell(_new(SaveOrder, (
                order.order_id, snapshot.encode_in(order, _records.buf), not finished,
                consumed if consumed else (), effects, self.origin, self._listed,
                order.state._value_ if finished else None)))  # (its plain string)
            self._listed = not finished
            self._effects = []
            if consumed:  # (one domain event an order: most slices took none)
                self._consumed = []
            self._dirty = False
        elif self._effects:  # nothing new to make durable (a reply only)
            self.ctx.writer.tell(Barrier(self._effects, self.origin))  # handed over, as a save's
            self._effects, self._consumed = [], []
            self._rest()  # it may rest, as after a slice with nothing to save
        else:
            self._rest()
        self._handled.clear()  # the snapshot handed to the writer carries them now

    def _resting(self, effects: list[Any], finished: bool) -> None:
        """This snapshot lets the order leave memory once it is durable. A
        finished order retires, and with ``passivate_after_s`` 0 a waiting
        one passivates, in the slice of the ``Flushed`` note the commit sends.
        Any other waiting order is marked idle now and only records the
        commit (``Confirm``: no message, no slice); the router's sweep
        passivates it later (``Rest``), once its newest snapshot is durable."""
        order = self.order
        router = self.ctx.router
        if finished or router.passivate_after_s <= 0:
            effects.append(_new(Tell, (self, _new(Flushed, (order.version,)))))
            return
        effects.append(_new(Confirm, (self, order.version)))
        self._idle()

    def tell(self, message: Any) -> None:
        """A note for this actor instance (``Tell(self, Flushed)``, run by the
        store writer after the commit): handled in place if the actor is
        idle on this loop (``PooledActor.hold``), else told (pykka's
        ``ActorDeadError`` once it has stopped: it no longer needs it)."""
        if self.hold():
            self.run_held(message)
        else:
            tell(self._actor_ref, message)

    def confirmed(self, version: int) -> None:
        """The snapshot with this version is durable (``actors.effects.Confirm``,
        run by the store writer after the commit, on the loop between slices)."""
        self._durable = max(self._durable, version)

    def _busy(self) -> None:
        if self.idle_since is not None:
            self.idle_since = None
            self.ctx.router.idle.pop(self.order.order_id, None)

    def _rest(self, sweep: bool = False) -> None:
        """Leave memory if everything is durable and nothing is awaited:
        a finished order at once, a waiting one once idle long enough."""
        order = self.order
        router = self.ctx.router
        queued = self.actor_inbox.queue
        if self._durable != order.version or queued:
            if (not sweep and self.idle_since is None and not queued
                    and router.passivate_after_s > 0 and standing(order) == WAITING):
                # its snapshot only ``Confirm``s its commit (``_resting``): no slice
                # follows it, so idle from now; the sweep's ``Rest`` waits for it
                self._idle()
            return
        stands = standing(order)
        if stands == FINISHED:
            router.retire(self)
        elif stands == AWAITING:
            return
        elif sweep or router.passivate_after_s <= 0:
            if self.idle_since is not None or router.passivate_after_s <= 0:
                router.passivate(self)
        else:
            self._idle()

    def _idle(self) -> None:
        """Idle from now (for the router's sweep), unless it already is."""
        if self.idle_since is None:
            self.idle_since = time.monotonic()
            self.ctx.router.idle[self.order.order_id] = self


def _parked(order: Order) -> bool:
    return order.state is OrderState.HELD and order.state_reason == INTERNAL_ERROR
