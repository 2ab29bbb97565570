"""The domain-events endpoint (contract §3): domain systems push events here.

A ROUTER socket. Each ``event`` is recorded by the store writer (once per
``event_id``), and only after that commit is ``{type: ack, event_id}`` sent
and the event handed to its order. A repeated ``event_id`` is acknowledged
and ignored. An event for an order that does not exist, or is already
finished, is acknowledged too (so the domain system stops resending it) and
counted; ``docs/operations.md`` says so.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from actors.endpoint import RouterEndpoint
from actors.store_writer import RecordEvent
from oms import codec, errors
from oms.messages import DomainEvent
from oms.store import event_key

logger = logging.getLogger(__name__)


def parse_event(msg: dict[str, Any]) -> tuple[DomainEvent, str] | str:
    """The event and its order id, or what is wrong with it."""
    if msg.get("type") != "event":
        return f"unknown message type {msg.get('type')!r:.100}; expected 'event'"
    for key in ("event_id", "system", "order_id", "name"):
        value = msg.get(key)
        if not isinstance(value, str) or not value or len(value) > 1000:
            return f"{key} must be a non-empty string of at most 1000 characters"
    data = msg.get("data", {})
    if not isinstance(data, dict):
        return "data must be a map"
    return DomainEvent(msg["event_id"], msg["system"], msg["name"], data), msg["order_id"]


class DomainEvents(RouterEndpoint):
    thread_name = "domain-events"
    label = "domain_events"

    def __init__(self, zctx: zmq.Context, endpoint: str, octx: Any,
                 curve: dict[str, Any] | None = None) -> None:
        super().__init__(zctx, endpoint, octx.metrics, curve)
        self.octx = octx

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        self.on_event(envelope, frame, user)

    def on_event(self, envelope: tuple[bytes, ...], frame: bytes,
                 user: str | None = None) -> None:
        try:
            parsed = parse_event(codec.decode_map(frame))
        except codec.DecodeError as exc:
            parsed = str(exc)
        if (user is not None and user != "domains" and not isinstance(parsed, str)
                and parsed[0].system != user):
            self.send_reply(envelope, errors.error_reply(
                errors.UNAUTHORIZED, f"this key is {user!r}; it may not send "
                f"{parsed[0].system!r:.50} events"))
            return
        if isinstance(parsed, str):
            self.metrics.domain_events.labels("unknown", "malformed").inc()
            self.send_reply(envelope, errors.error_reply(errors.MALFORMED, parsed))
            return
        event, order_id = parsed
        system = event.system if len(event.system) <= 32 else "other"

        def done(outcome: str) -> None:  # in the store writer, after the commit
            self.metrics.domain_events.labels(system, outcome).inc()
            if outcome == "error":
                self.reply_to(envelope, errors.error_reply(
                    errors.INTERNAL, "the event could not be recorded; send it again"))
                return
            if outcome == "recorded":
                key = event_key(order_id, event.system, event.event_id)
                self.octx.router.deliver_event(key, order_id, event)
            elif outcome != "duplicate":
                logger.warning("domain event %s for %s order %s acknowledged and ignored",
                               event.event_id, outcome.replace("_", " "), order_id)
            self.reply_to(envelope, {"type": "ack", "event_id": event.event_id})

        self.octx.writer.tell(RecordEvent(order_id, event.system, event.event_id,
                                          {"event_id": event.event_id, "system": event.system,
                                           "order_id": order_id, "name": event.name,
                                           "data": event.data}, done))
