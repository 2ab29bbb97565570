"""The channel intake of the front: its ROUTER socket, how replies go back
to the channels, and the identity rules of docs/security.md (with CURVE on,
the front is the security boundary). What each request is routed to is
``shards.front_routing``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from actors.endpoint import RequestReader
from actors.security import is_operator_name
from actors.throttle import LogThrottle
from oms import codec, errors
from shards.front_config import Envelope, FrontMetrics
from shards.front_links import RESEND_IDEMPOTENT, OnReply

logger = logging.getLogger("shards.front")


def gave_up(rtype: str) -> dict[str, Any]:
    """The front's own ``internal`` reply for a request its shard did not answer."""
    if rtype in RESEND_IDEMPOTENT:
        return errors.error_reply(errors.INTERNAL, "the shard that owns this request did "
                                  "not answer in time; nothing was acknowledged: retry "
                                  "the same request")
    return errors.error_reply(errors.INTERNAL, "the shard that owns this order did not "
                              "answer in time: the outcome is unknown; read the order "
                              "with get_order before asking again")


class ChannelEdge:
    """The intake ROUTER the channels talk to."""

    def __init__(self, sock: zmq.Socket, identity_required: bool,
                 metrics: FrontMetrics) -> None:
        self.sock, self.identity_required, self.m = sock, identity_required, metrics
        self.reader = RequestReader(sock, identity_required)
        self.log = LogThrottle(logger, burst=10)  # flushed by the front's housekeeping

    def requests(self) -> Iterator[tuple[Envelope, bytes | None, str | None]]:
        return self.reader.read(1000)

    # -- replies ----------------------------------------------------------------

    def answer(self, env: Envelope, reply: dict[str, Any], request_id: Any,
               rtype: str) -> None:
        if request_id is not None:
            reply = dict(reply, request_id=request_id)
        self.m.requests.labels(rtype, reply.get("type", "?")).inc()
        self._send(env, codec.pack(reply))

    def _send(self, env: Envelope, frame: bytes) -> None:
        try:
            self.sock.send_multipart([*env, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a channel gone with its replies due: a flood
            self.log.report(exc.errno, "front reply not delivered: %s", exc,
                            summary=f"front replies not delivered ({exc.strerror})")

    def relay(self, env: Envelope, rtype: str, request_id: Any = None,
              check: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
              ) -> OnReply:
        """A reply handler that passes the shard's reply on unchanged (or the
        front's own ``internal`` when the shard never answered)."""
        def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            if reply is None or raw is None:
                self.answer(env, gave_up(rtype), request_id, rtype)
                return
            replaced = check(reply) if check is not None else None
            if replaced is not None:
                self.answer(env, replaced, request_id, rtype)
                return
            self.m.requests.labels(rtype, str(reply.get("type", "?"))).inc()
            self._send(env, raw)

        return on_reply

    # -- identity rules ------------------------------------------------------------

    def is_operator(self, user: str | None) -> bool:
        return not self.identity_required or is_operator_name(user)

    def denied(self, user: str | None, source: Any) -> dict[str, Any] | None:
        """The ``unauthorized`` reply when ``user`` may not act on orders of
        ``source``; None when it may."""
        if self.is_operator(user) or source == user:
            return None
        return errors.error_reply(errors.UNAUTHORIZED, f"this channel is {user!r}; "
                                  f"it may not act on orders of {source!r:.100}")

    def not_own(self, user: str | None, reply: dict[str, Any]) -> dict[str, Any] | None:
        """``denied`` for the order in a shard's ``order`` reply."""
        view = reply.get("order")
        if reply.get("type") == "order" and isinstance(view, dict):
            return self.denied(user, view.get("source_system"))
        return None
