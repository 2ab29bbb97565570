"""The publisher's slice: events bundled by a burst, told alone and mixed
with other messages are published in the order told; one that cannot be
encoded is survived (logged) and not counted, the rest still go out."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from conftest import endpoint
from helpers import poll_until
from prometheus_client import CollectorRegistry

from actors.loop import burst
from actors.metrics import Metrics
from actors.publisher import Publisher
from oms import codec


@contextlib.contextmanager
def subscribed_publisher() -> Iterator[tuple[Publisher, zmq.Socket, CollectorRegistry]]:
    """A publisher on its own loop and a subscriber to everything, connected
    (a marker until the subscription is in place) and drained."""
    ep, registry = endpoint(), CollectorRegistry()
    pub = Publisher.launch(zmq.Context.instance(), ep, Metrics(registry))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ep)
    try:
        def connected() -> bool:
            pub.publish("web", {"type": "marker", "n": -1})
            return bool(sub.poll(50))
        assert poll_until(connected, timeout=10)
        pub.actor_ref.ask("barrier", timeout=10)
        while sub.poll(0):
            sub.recv_multipart()
        yield pub, sub, registry
    finally:
        sub.close()
        pub.actor_ref.stop(block=True, timeout=5)
        pub.join(5)


def received(sub: zmq.Socket, count: int) -> list[tuple[bytes, Any]]:
    """Up to ``count`` events: (topic, their ``n``)."""
    got = []
    while len(got) < count and sub.poll(5000):
        topic, raw = sub.recv_multipart()
        got.append((topic, codec.decode_map(raw)["n"]))
    return got


def published(registry: CollectorRegistry) -> dict[str, float]:
    """``oms_events_published_total`` by event type."""
    return {s.labels["type"]: s.value for m in registry.collect()
            for s in m.samples if s.name == "oms_events_published_total"}


def test_bundled_and_lone_events_keep_their_order_and_a_bad_one_is_survived(
        caplog: pytest.LogCaptureFixture) -> None:
    with subscribed_publisher() as (pub, sub, registry):
        with caplog.at_level(logging.ERROR), burst():
            pub.publish("web", {"type": "order_state", "n": 1})
            pub.publish("web", {"type": "order_state", "n": 2, "bad": object()})
            pub.publish("app", {"type": "order_progress", "n": 3})
            pub.tell("not an event")  # a mixed bundle: each message in turn
            pub.publish("shop", {"type": "order_progress", "n": 4})
        pub.publish("web", {"type": "order_summary", "n": 5})  # told alone
        pub.actor_ref.ask("barrier", timeout=10)
        assert received(sub, 4) == [(b"web\x00", 1), (b"app\x00", 3), (b"shop\x00", 4),
                                    (b"web\x00", 5)]
        assert not sub.poll(0)
        assert any("unexpected error" in r.getMessage() for r in caplog.records)
        counted = published(registry)
        assert counted["order_state"] == 1  # the one that failed is not counted
        assert counted["order_progress"] == 2 and counted["order_summary"] == 1
