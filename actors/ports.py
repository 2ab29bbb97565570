"""The ports: what each actor is given, typed by what it needs of the others.

Every collaborator is passed to a constructor, whole: nothing is filled in
afterwards. The one cycle of the runtime, orders need the gateways, timers
and sequencer, and those hand their results back to orders, is closed
inside ``OrderRouter.__init__``: it passes its own ``deliver`` to
``parts`` (an ``OrderParts`` factory given by ``app.service``), which
launches the timers, sequencer and gateways, and builds the frozen
``OrderContext`` from what comes back. The parts only keep ``deliver``;
nothing is delivered until an order exists, after the router is built.

The Protocols say what a caller may use of an actor: its thread-safe
helpers (each only tells the actor, so any thread may call it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from actors.eventloop import EventLoop
from actors.metrics import Metrics
from actors.pool import Dispatcher
from oms.engine import Engine
from oms.messages import Send
from storage.store import Store

if TYPE_CHECKING:
    from actors.order_counts import OrderCounts
    from actors.router import OrderRouter


class Deliver(Protocol):
    """Hand a message to an order (``OrderRouter.deliver``); False if the
    order is finished."""

    def __call__(self, order_id: str, message: Any, /) -> bool: ...


class Writer(Protocol):
    """The store writer: takes writes; ``healthy`` is False while its
    commits fail (read on the loop, by the intake)."""

    def tell(self, message: Any) -> None: ...

    @property
    def healthy(self) -> bool: ...


class CommandSink(Protocol):
    """A gateway: carries a command to its domain system."""

    def send(self, order_id: str, command: Send) -> None: ...


class EventSink(Protocol):
    """The publisher: publishes an event on a topic."""

    def publish(self, topic: str, payload: dict[str, Any]) -> None: ...

    def publish_counted(self, topic: str, payload: dict[str, Any], order_type: str,
                        created_ts: float) -> None:
        """``publish`` an ``order_state`` or ``order_summary`` of an order of
        ``order_type`` acknowledged at ``created_ts``, and count it in
        ``oms_order_transitions_total`` or ``oms_order_completion_seconds``."""
        ...


class TimerSink(Protocol):
    """The timers: ``TimerFired(token)`` to the order at wall-clock ``at``."""

    def schedule(self, at: float, order_id: str, token: tuple[Any, ...]) -> None: ...


class SequencerPort(Protocol):
    """The sequencer: ask for the turn of ``key`` (``enter``) or give it back."""

    def request(self, key: str, order_id: str, enter: bool) -> None: ...


class Replier(Protocol):
    """An endpoint that queues a reply to a peer (from any thread)."""

    def reply_to(self, envelope: tuple[bytes, ...], payload: dict[str, Any]) -> None: ...


class OrderParts(NamedTuple):
    """The actors the order router's ``parts`` factory launches, each given
    the router's ``deliver``."""

    timers: TimerSink
    sequencer: SequencerPort
    gateways: Mapping[str, CommandSink]


@dataclass(frozen=True)
class OrderCore:
    """What the router itself needs, all built before it."""

    dispatcher: Dispatcher | EventLoop  # what runs the order actors (the loop in a service)
    store: Store
    metrics: Metrics
    engines: dict[str, Engine]  # by order type
    writer: Writer
    publisher: EventSink


@dataclass(frozen=True)
class OrderContext:
    """What an order actor (and the effects the writer runs for it) talks
    to; built once, by ``OrderRouter.__init__``."""

    dispatcher: Dispatcher | EventLoop
    store: Store
    metrics: Metrics
    engines: dict[str, Engine]
    writer: Writer
    publisher: EventSink
    timers: TimerSink
    sequencer: SequencerPort
    gateways: Mapping[str, CommandSink]
    router: OrderRouter
    counts: OrderCounts  # the router's


PartsFactory = Callable[[Deliver], OrderParts]
