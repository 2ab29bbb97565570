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
                 hwm: int = 100_000) -> None:
        super().__init__()
        self.ctx, self.endpoint, self.metrics, self.hwm = ctx, endpoint, metrics, hwm
        self.sock: zmq.Socket | None = None

    def on_start(self) -> None:
        self.sock = open_socket(self.ctx, zmq.PUB, bind=self.endpoint, SNDHWM=self.hwm,
                                LINGER=500)

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
        self.actor_ref.tell(PublishEvent(topic, payload))
