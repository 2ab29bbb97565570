"""Effects are data until the store writer runs them.

Everything that must happen only once a commit made it true is an effect, a
small typed value: the engine's (``oms.messages``: ``Send``, ``Publish``,
``Timer``, ``Reply``, ``Sequence``) and the runtime's below (``Tell`` an
actor instance a note, ``Confirm`` a durable snapshot to one without a
note, ``Revive`` an order after a crash, answer a create or a domain event,
``Wake`` or ``Collect`` for a waiter off the loop). The
writer (``actors.store_writer``) hands each to ``run``, the one dispatcher,
by type, strictly after the commit; a failure is logged with the effect's
type and order id (``describe``). Tests assert on the effects themselves.

``Origin`` says whose engine effects they are: the order, and the
collaborators that carry them out (its ``OrderContext``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pykka

from oms.engine import Engine, new_order
from oms.errors import DomainError
from oms.messages import (
    CommandResult,
    DomainEvent,
    Publish,
    Reply,
    Send,
    Sequence,
    Start,
    Timer,
)

if TYPE_CHECKING:
    from actors.ports import OrderContext, Replier
    from actors.supervision import Supervisor
    from storage.records import Created

logger = logging.getLogger(__name__)


class Origin(NamedTuple):
    """The order whose engine effects these are.

    ctx: the order's collaborators (gateways, publisher, timers, sequencer,
      router, metrics).
    topic: its source system (the publisher's topic).
    created_ts: when it was acknowledged (for the completion histogram).
    """

    ctx: OrderContext
    order_id: str
    order_type: str
    topic: str
    created_ts: float


class Teller(Protocol):
    """An actor reference (or anything that takes a told message)."""

    def tell(self, message: Any) -> None: ...


class Revivable(Protocol):
    """The order router, as a ``Revive`` uses it."""

    def revived(self, order_id: str, spawn: bool) -> None: ...


class CreateAnswerer(Protocol):
    """The intake, as an ``AnswerCreate`` uses it."""

    def created(self, created: Created, source: str, reply: ReplyTo,
                started: tuple[Any, ...] | None = None) -> None: ...

    def admitted(self) -> None: ...


class EventAnswerer(Protocol):
    """The domain-events endpoint, as an ``AnswerEvent`` uses it."""

    def recorded(self, outcome: str, envelope: tuple[bytes, ...], order_id: str,
                 event: DomainEvent, key: bytes) -> None: ...


class Tell(NamedTuple):
    """Tell one actor instance ``message``; if it has left memory
    (passivated, retired, crashed) it no longer needs it."""

    ref: Teller
    message: Any


class Confirmable(Protocol):
    """An order actor instance, as a ``Confirm`` uses it."""

    def confirmed(self, version: int) -> None: ...


class Confirm(NamedTuple):
    """Tell an order actor instance that its snapshot ``version`` is durable
    without a message (``OrderActor.confirmed``): for a waiting order, which
    has nothing to do then (its idle time already runs; the router's sweep
    passivates it). It runs on the loop thread, between actors' slices."""

    actor: Confirmable
    version: int


class Revive(NamedTuple):
    """The router reloads an order from its last durable snapshot
    (``OrderRouter.revived``); an error there is escalated to ``supervisor``
    (None outside a service: the error is raised)."""

    router: Revivable
    order_id: str
    spawn: bool
    supervisor: Supervisor | None


class ReplyTo(NamedTuple):
    """Where the reply to one request goes: ``endpoint.reply_to(envelope,
    payload)``, with the request's ``request_id`` added. The ``reply_to`` of
    a ``Cancel``, an ``Operate`` and so of a ``Reply`` effect; calling it
    sends the reply (from any thread)."""

    endpoint: Replier
    envelope: tuple[bytes, ...]
    request_id: str | int | None = None

    def __call__(self, payload: dict[str, Any]) -> None:
        if self.request_id is not None:
            payload = dict(payload, request_id=self.request_id)
        self.endpoint.reply_to(self.envelope, payload)


class AnswerCreate(NamedTuple):
    """Answer a ``submit_order`` with the create's outcome (``Intake.created``)
    and free its admission slot."""

    intake: CreateAnswerer
    source_system: str
    reply: ReplyTo
    build: NewOrder | None = None  # whose Start effects follow the reply


class AnswerEvent(NamedTuple):
    """Acknowledge (or refuse) a domain event with its recording's outcome and
    hand it to its order (``DomainEvents.recorded``)."""

    endpoint: EventAnswerer
    envelope: tuple[bytes, ...]
    order_id: str
    event: DomainEvent
    key: bytes  # its ``storage.records.event_key``: its inbox record


class Wake(NamedTuple):
    """Set ``event``: a waiter off the loop (retention) goes on."""

    event: threading.Event


class Collect(NamedTuple):
    """Append the write's outcome to ``into`` (read by a waiter off the loop)."""

    into: list[Any]


class NewOrder:
    """How the writer builds a new order for the id it assigns, already
    started: ``oms.engine.new_order`` of ``request``, then the engine's
    ``Start`` on it in the same transaction, so the order's first snapshot
    is its started one (before, the order actor ran ``Start`` and saved a
    second snapshot: one snapshot, one message and one slice an order).

    started: the Start's effects once built, run after the commit by the
    create's answer (``AnswerCreate``); None if ``Start`` raised, and the
    order is stored unstarted: its actor runs ``Start`` as its first message,
    where the order failure rule holds it (docs/architecture.md).
    """

    __slots__ = ("engine", "request", "started")

    def __init__(self, request: dict[str, Any], engine: Engine) -> None:
        self.request = request
        self.engine = engine
        self.started: tuple[Any, ...] | None = None

    def __call__(self, order_id: str) -> Any:
        proc, now = self.engine.proc, time.time()
        order = new_order(order_id, self.request, proc, now)
        try:
            self.started = tuple(self.engine.handle(order, Start(), now).effects)
        except Exception:  # noqa: BLE001 - the actor runs Start again and holds it
            self.started = None
            return new_order(order_id, self.request, proc, now)
        return order


def describe(effect: Any, origin: Origin | None = None, order_id: str | None = None) -> str:
    """An effect's type and order id, for a failure log."""
    if origin is not None:
        order_id = origin.order_id
    order_id = order_id or getattr(effect, "order_id", None)
    return f"{type(effect).__name__} (order {order_id or '-'})"


def run(effect: Any, origin: Origin | None = None, outcome: Any = None) -> None:
    """Carry out one effect (the one dispatcher, by type). ``outcome``: what
    the write it follows came to, for an answer."""
    handler = _BY_TYPE.get(type(effect))
    if handler is None:
        raise TypeError(f"unknown effect {effect!r}")
    handler(effect, origin, outcome)


def report_failed(failed: tuple[Any, Exception], origin: Origin | None, metrics: Any,
                  order_id: str | None = None) -> None:
    """What ``run_all`` returned for an effect that raised: logged with its
    type and order id, counted as the writer's internal error (the one way
    a post-commit effect's failure is reported, by the writer and the router)."""
    effect, exc = failed
    logger.error("post-commit effect %s failed", describe(effect, origin, order_id),
                 exc_info=exc)
    metrics.internal_errors.labels("writer").inc()


def run_all(effects: Iterable[Any], origin: Origin | None) -> tuple[Any, Exception] | None:
    """Carry out ``effects`` in order, as ``run`` each (one snapshot's or
    barrier's); the first that raises ends it, returned with its error (the
    rest are not run). One call for all of them: 25 effects an order; the
    commonest two, an ``order_progress`` event (10 an order) and a command
    to a known system (6), are handed on here as ``_publish`` and ``_send``
    would, without their frames."""
    by_type = _BY_TYPE
    for effect in effects:
        try:
            kind = type(effect)
            if kind is Publish and origin is not None:
                payload = effect.payload
                if (name := payload["type"]) != "order_state" and name != "order_summary":
                    origin.ctx.publisher.publish(origin.topic, payload)
                    continue
            elif kind is Send and origin is not None:
                gateway = origin.ctx.gateways.get(effect.system)
                if gateway is not None:
                    gateway.send(origin.order_id, effect)
                    continue
            by_type[kind](effect, origin, None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who logs it
            known = type(effect) in by_type
            return effect, exc if known else TypeError(f"unknown effect {effect!r}")
    return None


def _send(fx: Send, origin: Origin | None, _outcome: Any) -> None:
    assert origin is not None
    ctx = origin.ctx
    gateway = ctx.gateways.get(fx.system)
    if gateway is None:
        error = DomainError("unknown_system", f"no gateway for {fx.system!r}", False)
        ctx.router.deliver(origin.order_id, CommandResult(fx.command_id, False, None, error))
        return
    gateway.send(origin.order_id, fx)


def _publish(fx: Publish, origin: Origin | None, _outcome: Any) -> None:
    """Publish, and log a state change; the publisher counts it, and an
    order's completion (``EventSink.publish_counted``)."""
    assert origin is not None
    payload = fx.payload
    kind = payload["type"]
    if kind == "order_state":
        order_id = origin.order_id
        logger.info("order %s %s -> %s", order_id, payload["previous_state"],
                    payload["state"], extra={"order_id": order_id})
    elif kind != "order_summary":  # order_progress: 10 of 13 an order
        origin.ctx.publisher.publish(origin.topic, payload)
        return
    origin.ctx.publisher.publish_counted(origin.topic, payload, origin.order_type,
                                         origin.created_ts)


def _timer(fx: Timer, origin: Origin | None, _outcome: Any) -> None:
    assert origin is not None
    origin.ctx.timers.schedule(fx.at, origin.order_id, fx.token)


def _reply(fx: Reply, _origin: Origin | None, _outcome: Any) -> None:
    fx.reply_to(fx.payload)


def _sequence(fx: Sequence, origin: Origin | None, _outcome: Any) -> None:
    assert origin is not None
    origin.ctx.sequencer.request(fx.key, origin.order_id, fx.enter)


def _tell(fx: Tell, _origin: Origin | None, _outcome: Any) -> None:
    try:  # not contextlib.suppress: an object per call, twice an order
        fx.ref.tell(fx.message)
    except pykka.ActorDeadError:
        pass


def _confirm(fx: Confirm, _origin: Origin | None, _outcome: Any) -> None:
    fx.actor.confirmed(fx.version)


def _revive(fx: Revive, _origin: Origin | None, _outcome: Any) -> None:
    try:
        fx.router.revived(fx.order_id, fx.spawn)
    except Exception:  # the order would stay in limbo: escalate
        if fx.supervisor is None:
            raise
        fx.supervisor.died("router", sys.exc_info())


def _answer_create(fx: AnswerCreate, _origin: Origin | None, outcome: Any) -> None:
    try:
        fx.intake.created(outcome, fx.source_system, fx.reply,
                          fx.build.started if fx.build is not None else None)
    finally:
        fx.intake.admitted()


def _answer_event(fx: AnswerEvent, _origin: Origin | None, outcome: Any) -> None:
    fx.endpoint.recorded(outcome, fx.envelope, fx.order_id, fx.event, fx.key)


def _wake(fx: Wake, _origin: Origin | None, _outcome: Any) -> None:
    fx.event.set()


def _collect(fx: Collect, _origin: Origin | None, outcome: Any) -> None:
    fx.into.append(outcome)


_BY_TYPE: dict[type, Callable[[Any, Origin | None, Any], None]] = {
    Send: _send, Publish: _publish, Timer: _timer, Reply: _reply, Sequence: _sequence,
    Tell: _tell, Confirm: _confirm, Revive: _revive, AnswerCreate: _answer_create,
    AnswerEvent: _answer_event, Wake: _wake, Collect: _collect,
}
