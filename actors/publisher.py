"""The channel events endpoint (contract §2): one PUB socket, one thread.

Every message is ``[topic, payload]`` with topic = the order's
``source_system``. PUB drops for slow subscribers at its high-water mark
rather than blocking the service; channels that must not miss a result read
it with ``get_order``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import zmq

from actors.loop import LoopActor, open_socket
from oms import codec
from oms.metrics import Metrics


class PublishEvent(NamedTuple):
    topic: str
    payload: dict[str, Any]


class Publisher(LoopActor):
    thread_name = "events-pub"

    def __init__(self, ctx: zmq.Context, endpoint: str, metrics: Metrics,
                 hwm: int = 100_000, curve: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.ctx, self.endpoint, self.metrics, self.hwm = ctx, endpoint, metrics, hwm
        self.curve = curve or {}
        self.sock: zmq.Socket | None = None

    def on_start(self) -> None:
        # XPUB: with CURVE on, subscriptions come to us (XPUB_MANUAL) and each
        # subscriber is subscribed to its own source_system only, whatever it asked.
        kind, manual = (zmq.XPUB, {"XPUB_MANUAL": 1}) if self.curve else (zmq.PUB, {})
        self.sock = open_socket(self.ctx, kind, bind=self.endpoint, SNDHWM=self.hwm,
                                LINGER=500, **manual, **self.curve)

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] if self.sock is not None and self.curve else []

    def on_readable(self, sock: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                frame = sock.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if data[:1] not in (b"\x00", b"\x01"):
                continue
            user = frame.get("User-Id")
            topic = b"" if str(user).startswith("operator") else str(user).encode()
            option = zmq.SUBSCRIBE if data[:1] == b"\x01" else zmq.UNSUBSCRIBE
            sock.setsockopt(option, topic)

    def on_receive(self, message: Any) -> None:
        if isinstance(message, PublishEvent) and self.sock is not None:
            self.metrics.published.labels(message.payload.get("type", "?")).inc()
            self.sock.send_multipart(
                [message.topic.encode(), codec.pack(message.payload)], flags=zmq.NOBLOCK)

    def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Thread-safe: queue an event for publication."""
        self.tell(PublishEvent(topic, payload))
