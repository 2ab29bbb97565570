"""The order actor: a thin shell that feeds its order's engine messages and
carries out what the engine decides, strictly after persisting.

Per slice of messages it runs the engine for each, then sends one
``SaveOrder`` to the store writer whose ``after`` callbacks carry out the
effects (send, publish, arm a timer, reply). The writer runs them only once
the snapshot is durable. When the writer confirms a snapshot and the order is
waiting (no reply outstanding), the actor passivates: the router drops it
and the next message for the order reactivates it from the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import pykka

from actors.pool import PooledActor
from actors.store_writer import Barrier, SaveOrder
from oms import codec
from oms.engine import INTERNAL_ERROR, Engine, hold_internal_error
from oms.errors import DomainError
from oms.messages import CommandResult, DomainEvent, Publish, Reply, Send, Sequence, Timer
from oms.model import Order
from oms.states import OrderState, StepStatus

if TYPE_CHECKING:
    from actors.router import OrderContext

logger = logging.getLogger(__name__)


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


def awaiting_reply(order: Order) -> bool:
    """Whether a command of this order is out at a gateway right now."""
    for step in order.steps.values():
        if step.retry_at is None and (
            (step.status == StepStatus.RUNNING and step.wait is None) or step.comp == "running"
        ):
            return True
    return any(n.status == StepStatus.RUNNING and n.retry_at is None for n in order.notes)


def _tell_quietly(ref: Any, message: Any) -> None:
    """A post-commit note to one actor instance; if it has left memory
    (passivated, retired, crashed) it no longer needs it."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


def _run_all(callbacks: tuple[Callable[[], None], ...]) -> Callable[[], None]:
    def run() -> None:
        for callback in callbacks:
            callback()

    return run


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
        self.idle_since: float | None = None  # when it last had nothing to do
        self._handled: list[Any] = []  # this slice's messages, replayed if it crashes
        self.counted_state = order.state  # its state in the router's counts

    def __str__(self) -> str:
        return f"OrderActor({self.order.order_id})"

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Flushed):
            self._durable = max(self._durable, message.version)
            return None
        if isinstance(message, Rest):
            self._rest(sweep=True)
            return None
        self._busy()
        received = message
        order = self.order
        before, parked = order.state, _parked(order)
        if isinstance(message, HoldInternalError):
            for msg in message.dropped:
                if isinstance(msg, Inbound):  # the event that crashed it: not again
                    self._consumed.append(msg.key)
            turning = hold_internal_error(self.engine, order, message.error, message.dropped,
                                          time.time())
        else:
            if isinstance(message, Inbound):
                self._consumed.append(message.key)
                self._dirty = True
                message = message.event
            turning = self.engine.handle(order, message, time.time())
        if turning.stale:
            self.ctx.metrics.stale_messages.labels(type(message).__name__).inc()
        self._dirty |= turning.changed
        self._effects.extend(turning.effects)
        if order.state != before:
            self.ctx.router.state_changed(before, order.state, order.order_id)
            self.counted_state = order.state
        if _parked(order) != parked:
            self.ctx.router.park(order.order_id, not parked)
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
        self._save()
        self._handled.clear()  # the snapshot handed to the writer carries them now

    def _save(self) -> None:
        if not self._dirty and not self._effects:
            self._rest()
            return
        after = [self._effect(fx) for fx in self._effects]
        if self._dirty:
            order = self.order
            version, ref = order.version, self.actor_ref
            if order.finished or not awaiting_reply(order):
                # only an order that may rest needs to hear its snapshot is durable
                # (``_rest``): one that awaits a reply gets this note with a later
                # snapshot, as a dirty slice is the only way out of awaiting one.
                # Saves a message and a slice for most snapshots.
                after.append(lambda: _tell_quietly(ref, Flushed(version)))
            self.ctx.writer.tell(SaveOrder(
                order.order_id, codec.pack(order.to_record()), not order.finished,
                tuple(self._consumed), tuple(after)))
        else:
            self.ctx.writer.tell(Barrier(_run_all(tuple(after))))
        self._effects, self._consumed, self._dirty = [], [], False

    def _effect(self, fx: Any) -> Callable[[], None]:
        ctx, order_id = self.ctx, self.order.order_id
        if isinstance(fx, Send):
            gateway = ctx.gateways.get(fx.system)
            if gateway is None:
                error = DomainError("unknown_system", f"no gateway for {fx.system!r}", False)
                result = CommandResult(fx.command_id, False, None, error)

                def unknown() -> None:
                    ctx.router.deliver(order_id, result)
                return unknown
            return lambda: gateway.send(order_id, fx)
        if isinstance(fx, Publish):
            return self._publish(fx.payload)
        if isinstance(fx, Timer):
            return lambda: ctx.timers.schedule(fx.at, order_id, fx.token)
        if isinstance(fx, Reply):
            return lambda: fx.reply_to(fx.payload)
        if isinstance(fx, Sequence):
            return lambda: ctx.sequencer.request(fx.key, order_id, fx.enter)
        raise TypeError(f"unknown effect {fx!r}")

    def _publish(self, payload: dict[str, Any]) -> Callable[[], None]:
        """Publish, and log and count a state change, once it is durable."""
        ctx, order_id, order_type = self.ctx, self.order.order_id, self.order.order_type
        topic, created_ts = self.order.source_system, self.order.created_ts

        def publish() -> None:
            kind = payload["type"]
            if kind == "order_state":
                logger.info("order %s %s -> %s", order_id, payload["previous_state"],
                            payload["state"], extra={"order_id": order_id})
                ctx.metrics.transitions.labels(order_type, payload["state"]).inc()
            elif kind == "order_summary":
                summary = payload["summary"]
                ctx.metrics.completion.labels(order_type, summary["state"]).observe(
                    max(0.0, summary["completed_ts"] - created_ts))
            ctx.publisher.publish(topic, payload)

        return publish

    def _busy(self) -> None:
        if self.idle_since is not None:
            self.idle_since = None
            self.ctx.router.idle.pop(self.order.order_id, None)

    def _rest(self, sweep: bool = False) -> None:
        """Leave memory if everything is durable and nothing is awaited:
        a finished order at once, a waiting one once idle long enough."""
        order = self.order
        if self._durable != order.version or self.actor_inbox.queue:
            return
        router = self.ctx.router
        if order.finished:
            router.retire(self)
        elif awaiting_reply(order):
            return
        elif sweep or router.passivate_after_s <= 0:
            if self.idle_since is not None or router.passivate_after_s <= 0:
                router.passivate(self)
        elif self.idle_since is None:
            self.idle_since = time.monotonic()
            router.idle[order.order_id] = self


def _parked(order: Order) -> bool:
    return order.state is OrderState.HELD and order.state_reason == INTERNAL_ERROR
