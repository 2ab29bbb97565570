"""The front's domain-events endpoint: a ROUTER the domain systems push
their events to. Each event goes to the shard that owns its order, and the
shard's answer (its ``ack`` after its commit) goes back unchanged
(docs/scaling.md, "Domain events"). With CURVE on, an event must come from
its system's identity (``actors.domain_events.authorise``).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from actors.domain_events import authorise
from actors.endpoint import BAD_ENVELOPE, RequestReader
from actors.throttle import LogThrottle
from oms import codec, edge, errors
from shards.front_config import Envelope, Placement
from shards.front_links import ShardLinks

logger = logging.getLogger("shards.front")


class DomainRelay:
    def __init__(self, sock: zmq.Socket, links: ShardLinks, placement: Placement,
                 identity_required: bool, systems: frozenset[str]) -> None:
        self.sock, self.links, self.placement = sock, links, placement
        self.identity_required, self.systems = identity_required, systems
        self.reader = RequestReader(sock, identity_required)
        self.log = LogThrottle(logger, burst=10)  # flushed by the front's housekeeping

    def from_domains(self) -> None:
        for env, frame, user in self.reader.read(1000):
            if frame is None:  # not one event frame: refused as one node refuses it
                self._answer(env, codec.pack(errors.error_reply(errors.MALFORMED,
                                                                BAD_ENVELOPE)))
                continue
            shard = 0  # too large, malformed: shard 0 answers as one node would
            parsed: Any = None
            if len(frame) <= edge.MAX_EVENT_BYTES:
                try:
                    parsed = edge.parse_event(codec.decode_map(frame))
                except codec.DecodeError:
                    parsed = None
            if isinstance(parsed, edge.Event):
                if user is not None and (denied := authorise(parsed, user, self.systems)):
                    self._answer(env, codec.pack(errors.error_reply(errors.UNAUTHORIZED,
                                                                    denied)))
                    continue
                shard = self.placement.process_of_order_id(parsed.order_id)

            def on_reply(reply: dict[str, Any] | None, raw: bytes | None,
                         env: Envelope = env) -> None:
                if raw is None:
                    self._answer(env, codec.pack(errors.error_reply(
                        errors.INTERNAL, "the event could not be recorded; send it again")))
                else:
                    self._answer(env, raw)

            self.links.send(shard, frame, "event", on_reply, domain=True)

    def _answer(self, env: Envelope, frame: bytes) -> None:
        try:
            self.sock.send_multipart([*env, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a domain system gone with its answers due: a flood
            self.log.report(exc.errno, "domain event answer not delivered: %s", exc,
                            summary=f"domain event answers not delivered ({exc.strerror})")
