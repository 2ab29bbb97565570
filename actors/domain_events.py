"""The domain-events endpoint (contract §3): domain systems push events here.

A ROUTER socket. Each ``event`` is recorded by the store writer (once per
``event_id``), and only after that commit is ``{type: ack, event_id}`` sent
and the event handed to its order. A repeated ``event_id`` is acknowledged
and ignored. An event for an order that does not exist, or is already
finished, is acknowledged too (so the domain system stops resending it),
counted and logged; ``docs/operations.md`` says so.

Before anything is recorded, each event is checked at the edge
(``oms.edge``: at most 64 KiB, the contract's fields and types, finite
numbers) and its sender authorised (``authorise``: only domain systems, each
for its own events). A refused event gets an ``error`` reply, is counted
under the ``system`` label ``invalid`` (so no sender can add time series)
and logged. Both kinds of line are bounded (``RouterEndpoint.log``, an
``actors.throttle.LogThrottle``): the first 10 a second per code (or per
outcome and system), then one line a second with how many were not logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import zmq

from actors.effects import AnswerEvent
from actors.endpoint import BAD_ENVELOPE, RouterEndpoint
from actors.ports import OrderContext
from actors.security import DOMAINS
from actors.store_writer import RecordEvent
from oms import codec, edge, errors
from oms.messages import DomainEvent
from storage.records import event_key

_new = tuple.__new__  # a NamedTuple without the Python frame of its generated __new__

INVALID = "invalid"
"""The ``system`` label of a refused event: only configured systems get their own."""


def authorise(event: edge.Event, user: str | None, systems: frozenset[str]) -> str | None:
    """None if this sender may push this event; else why not.

    With CURVE on (``user`` is the key's name), only a domain system's key
    may push events, and only its own system's: the event's ``system`` must
    be the key's name. ``domains`` (one process speaking for several, like
    the simulators) may name any configured system. A channel's or an
    operator's key may push nothing. Without CURVE, the ``system`` must be
    one of the configured domain systems.
    """
    if user is None or user == DOMAINS:
        if event.system in systems:
            return None
        known = ", ".join(sorted(systems))  # only for the refusal (not per event)
        return f"system {event.system!r:.50} is not a domain system of this service ({known})"
    if user not in systems:
        known = ", ".join(sorted(systems))
        return f"this key is {user!r}, not a domain system's key ({known}, {DOMAINS})"
    if event.system != user:
        return f"this key is {user!r}; it may not send {event.system!r:.50} events"
    return None


def stored_event(ev: Any, systems: frozenset[str]) -> DomainEvent | str:
    """An event read back from the store's inbox at recovery, checked again
    as at the edge (shape, sizes, numbers; its system one of this service's
    domain systems): the event, or why it is not replayed. The store may
    hold events recorded by an older version or for a system no longer
    configured; they must not move an order after a restart."""
    if not isinstance(ev, dict):
        return f"not a map: {type(ev).__name__}"
    parsed = edge.parse_event({**ev, "type": "event"})
    if isinstance(parsed, edge.Violation):
        return parsed.message
    if len(codec.pack(ev)) > edge.MAX_EVENT_BYTES:
        return f"larger than {edge.MAX_EVENT_BYTES} bytes"
    denied = authorise(parsed, None, systems)
    if denied is not None:
        return denied
    return DomainEvent(parsed.event_id, parsed.system, parsed.name, parsed.data)


class DomainEvents(RouterEndpoint):
    thread_name = "domain-events"
    label = "domain_events"

    def __init__(self, zctx: zmq.Context, endpoint: str, octx: OrderContext,
                 curve: dict[str, Any] | None = None, *,
                 systems: Iterable[str] | None = None, hwm: int = 10_000,
                 tagged: bool = False) -> None:
        super().__init__(zctx, endpoint, octx.metrics, curve, hwm, tagged)
        self.octx = octx
        self.systems = frozenset(octx.gateways if systems is None else systems)

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        self.on_event(envelope, frame, user)

    def on_bad_envelope(self, envelope: tuple[bytes, ...], user: str | None) -> None:
        self.refuse(envelope, INVALID, errors.MALFORMED, BAD_ENVELOPE)

    def refuse(self, envelope: tuple[bytes, ...], label: str, code: str, message: str) -> None:
        """An error reply (never an ack): the event is not recorded."""
        self.metrics.domain_events.labels(label, code).inc()
        self.log.report(code, "domain event refused (%s): %s", code, message,
                        summary=f"domain events refused ({code})")
        self.send_reply(envelope, errors.error_reply(code, message))

    def on_event(self, envelope: tuple[bytes, ...], frame: bytes,
                 user: str | None = None) -> None:
        if len(frame) > edge.MAX_EVENT_BYTES:
            self.refuse(envelope, INVALID, errors.TOO_LARGE, f"event of {len(frame)} bytes; "
                        f"at most {edge.MAX_EVENT_BYTES}")
            return
        try:  # a plain event (most): read and checked in one step, in C
            fast = edge.decode_event(frame)
        except Exception:  # noqa: BLE001 - not a plain event: the full checks decide
            fast = None
        if fast is not None:
            parsed = _new(edge.Event, (fast.event_id, fast.system, fast.order_id, fast.name,
                                       fast.data))
        else:
            try:
                checked = edge.parse_event(codec.decode_map(frame))
            except codec.DecodeError as exc:
                checked = edge.Violation("undecodable", str(exc))
            if isinstance(checked, edge.Violation):
                self.refuse(envelope, INVALID, errors.MALFORMED, checked.message)
                return
            parsed = checked
        denied = authorise(parsed, user, self.systems)
        if denied is not None:
            self.refuse(envelope, INVALID, errors.UNAUTHORIZED, denied)
            return
        self.record(envelope, parsed)

    def record(self, envelope: tuple[bytes, ...], parsed: edge.Event) -> None:
        """Hand an authorised event to the store writer; ack after the commit."""
        order_id = parsed.order_id
        event = DomainEvent(parsed.event_id, parsed.system, parsed.name, parsed.data)
        key = event_key(order_id, event.system, event.event_id)  # hashed once, for both
        answer = AnswerEvent(self, envelope, order_id, event, key)  # after the commit
        self.octx.writer.tell(RecordEvent(order_id, event.system, event.event_id,
                                          {"event_id": event.event_id, "system": event.system,
                                           "order_id": order_id, "name": event.name,
                                           "data": event.data}, answer, key))

    def recorded(self, outcome: str, envelope: tuple[bytes, ...], order_id: str,
                 event: DomainEvent, key: bytes) -> None:
        """In the store writer, after the commit (``actors.effects.AnswerEvent``):
        acknowledge, and hand a newly recorded event (its inbox ``key``) to its order."""
        system = event.system  # a configured system: a bounded label
        self.metrics.domain_events.labels(system, outcome).inc()
        if outcome == "error":
            self.reply_to(envelope, errors.error_reply(
                errors.INTERNAL, "the event could not be recorded; send it again"))
            return
        if outcome == "recorded":
            self.octx.router.deliver_event(key, order_id, event)
        elif outcome != "duplicate":  # (a replayed backlog: thousands, hence the throttle)
            what = outcome.replace("_", " ")
            self.log.report((outcome, system), "domain event %s for %s %s acknowledged and "
                            "ignored", event.event_id, what, order_id,
                            summary=f"events from {system} for {what}s acknowledged and ignored",
                            extra={"order_id": order_id, "event_id": event.event_id,
                                   "system": system})
        self.reply_to(envelope, {"type": "ack", "event_id": event.event_id})
