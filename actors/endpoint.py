"""A ROUTER server endpoint owned by one loop actor: the intake and the
domain-events endpoint are both one.

It receives ``[envelope..., payload]`` (with the CURVE ``User-Id`` of the
sender when CURVE is on), hands each request to ``on_frame``, and sends
replies queued from any thread with ``reply_to`` (only this actor's thread
touches the socket). A reply to a peer that is gone or whose queue is full
(``ROUTER_MANDATORY``) is counted and logged, never raised.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import zmq

from actors.loop import LoopActor
from actors.metrics import Metrics
from actors.sockets import open_socket, recv_frames, recv_parts, send_frames
from oms import codec

logger = logging.getLogger(__name__)

MAX_SOCKET_MESSAGE = 4 * 1024 * 1024  # larger frames are cut off by ZeroMQ itself


def read_requests(sock: zmq.Socket, identity_required: bool, budget: int
                  ) -> Iterator[tuple[tuple[bytes, ...], bytes, str | None]]:
    """What a ROUTER has queued, ``budget`` messages at most: (envelope, the
    payload frame, the sender's CURVE ``User-Id`` or None); a message without
    a payload frame is skipped (nothing to answer). Also the sharded front's."""
    for _ in range(budget):
        try:
            if identity_required:
                parts = recv_parts(sock)
                got = parts[-1].get("User-Id")  # a str: pyzmq types all properties as one
                user = got if isinstance(got, str) else None
                frames = [p.bytes for p in parts]
            else:
                frames, user = recv_frames(sock), None
        except zmq.Again:
            return
        if len(frames) >= 2:
            payload = frames.pop()
            yield tuple(frames), payload, user


class SendReply(NamedTuple):
    envelope: tuple[bytes, ...]
    payload: dict[str, Any]


class RouterEndpoint(LoopActor):
    label = "endpoint"  # for metrics and logs
    direct = SendReply  # a few an order, without pykka's envelope handling (LoopActor.on_batch)

    def __init__(self, zctx: zmq.Context, endpoint: str, metrics: Metrics,
                 curve: dict[str, Any] | None = None, hwm: int = 10_000) -> None:
        super().__init__()
        self.zctx, self.endpoint, self.metrics, self.hwm = zctx, endpoint, metrics, hwm
        self.curve = curve or {}
        self.identity_required = bool(curve)
        self.sock: zmq.Socket | None = None
        self._out = bytearray(256)  # each reply encoded here, then sent (a copying send)

    def on_start(self) -> None:
        self.sock = open_socket(self.zctx, zmq.ROUTER, bind=self.endpoint, ROUTER_MANDATORY=1,
                                SNDHWM=self.hwm, RCVHWM=self.hwm, LINGER=1000,
                                MAXMSGSIZE=MAX_SOCKET_MESSAGE, **self.curve)

    def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] if self.sock is not None else []

    def on_readable(self, sock: zmq.Socket) -> None:
        for envelope, frame, user in read_requests(sock, self.identity_required,
                                                   self.read_budget):
            self.on_frame(envelope, frame, user)

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        raise NotImplementedError

    def on_receive(self, message: Any) -> None:
        if isinstance(message, SendReply):
            self.send_reply(message.envelope, message.payload)

    def send_reply(self, envelope: tuple[bytes, ...], payload: dict[str, Any]) -> None:
        """From this actor's own thread: the payload is encoded first, so
        nothing fails between the envelope's sends and its own."""
        sock = self.sock
        if sock is None:
            return
        out = codec.pack_into(payload, self._out)  # (2 an order: no inline first try)
        try:
            send_frames(sock, envelope, out)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue full
            self.metrics.reply_failures.labels(self.label).inc()
            logger.warning("%s reply not delivered: %s", self.label, exc)

    def reply_to(self, envelope: tuple[bytes, ...], payload: dict[str, Any]) -> None:
        """From any thread: queue a reply to this peer. In the store writer's
        burst on this endpoint's loop, sent at once while the burst holds the
        endpoint (``LoopActor.in_place``), so a create's reply still leaves
        before the new order's first commands and events."""
        if self.in_place():
            try:
                self.send_reply(envelope, payload)
            except Exception:  # noqa: BLE001 - the failure rule, as a told message
                self._loop.survived(self.component, sys.exc_info())
            return
        self.tell(SendReply(envelope, payload))
