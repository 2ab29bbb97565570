"""The front's events endpoint: one XPUB that republishes every shard's
events, unchanged, to the channels (docs/scaling.md, "Events").

With CURVE off the events go through ``zmq.proxy`` in a thread of its own
(``EventsProxy``); with CURVE on the front's loop relays them
(``EventsFanIn.relay``, from each shard's SUB in ``shards.front_links``) and
subscribes each subscriber to its own topic only. Either way at most
``max_subscribers`` are connected (``actors.subscribers``, as on one node).
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import zmq

from actors.publisher import subscribe_by_identity
from actors.subscribers import SubscriberLimit, bind_watched
from actors.throttle import LogThrottle
from shards.front_config import FrontConfig, FrontMetrics, server_socket

logger = logging.getLogger("shards.front")


class EventsFanIn:
    """The XPUB the channels subscribe to, and how shard events reach it."""

    def __init__(self, pub: zmq.Socket, subscribers: SubscriberLimit,
                 proxy: EventsProxy | None, metrics: FrontMetrics) -> None:
        self.pub, self.subscribers, self.proxy, self.m = pub, subscribers, proxy, metrics

    @classmethod
    def open(cls, ctx: zmq.Context, cfg: FrontConfig, curve: dict[str, Any],
             metrics: FrontMetrics) -> EventsFanIn:
        # as actors.publisher: a bounded queue per subscriber, a stalled one dropped
        # (heartbeats), a handshake that never completes after 5 s
        stall_ms = int(cfg.subscriber_timeout_s * 1000)
        options = {"SNDHWM": cfg.events_hwm, "HANDSHAKE_IVL": 5000,
                   "HEARTBEAT_IVL": max(100, stall_ms // 3), "HEARTBEAT_TIMEOUT": stall_ms}
        manual = {"XPUB_MANUAL": 1} if curve else {}
        pub = server_socket(ctx, zmq.XPUB, **manual, **options, **curve)
        monitor, port = bind_watched(pub, cfg.events)
        subscribers = SubscriberLimit(monitor, port, cfg.max_subscribers, metrics.subscribers,
                                      metrics.subscribers_refused,
                                      LogThrottle(logger, every_s=5.0))
        # CURVE off: events go from the shards to the subscribers in C (zmq.proxy)
        proxy = None if curve else EventsProxy(ctx, pub, [s["events"] for s in cfg.shards])
        return cls(pub, subscribers, proxy, metrics)

    def sockets(self) -> list[zmq.Socket]:
        """What the front's loop polls: the monitor, and with CURVE on the XPUB
        (for subscriptions)."""
        return [self.subscribers.monitor] + ([self.pub] if self.proxy is None else [])

    def relay(self, sub: zmq.Socket) -> None:
        """CURVE on: republish what one shard's SUB has queued."""
        for _ in range(2000):
            try:
                parts = sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.pub.send_multipart(parts, flags=zmq.NOBLOCK)
                self.m.events.inc()
            except zmq.Again:
                pass  # as on one node: PUB drops for slow subscribers

    def on_subscriptions(self) -> None:
        """XPUB with CURVE: a subscriber gets its own source_system only
        (operators: everything), whatever it asked (as actors.publisher)."""
        subscribe_by_identity(self.pub)

    def check_proxy(self) -> None:
        """The one failure rule: a dead proxy thread ends the front loudly."""
        thread = self.proxy.thread if self.proxy is not None else None
        if thread is not None and not thread.is_alive():
            logger.critical("the events proxy thread ended; the front exits (restarted)")
            raise SystemExit(70)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        self.subscribers.close(self.pub)
        self.pub.close(0)


class EventsProxy:
    """CURVE off: the shards' events reach the subscribers through
    ``zmq.proxy`` (XSUB connected to every shard, the front's XPUB), in a
    thread of its own that runs in C without the GIL. Subscriptions travel
    upstream, so each shard sends only what someone subscribed to.

    The XSUB lives as long as the front: when a shard moves, the proxy is
    stopped, the XSUB connected to the new place and the proxy started
    again. The XSUB keeps every subscription that went through it and sends
    them to each publisher it connects to; a new XSUB would have none, and
    every channel already subscribed would get no event again (the XPUB
    passes a subscription upstream once, when the channel subscribes)."""

    _ids = itertools.count(1)

    def __init__(self, ctx: zmq.Context, pub: zmq.Socket, endpoints: list[str]) -> None:
        self.ctx, self.pub = ctx, pub
        self.thread: threading.Thread | None = None
        self.xsub = ctx.socket(zmq.XSUB)
        for name, value in (("LINGER", 0), ("RCVHWM", 100_000), ("RECONNECT_IVL", 100),
                            ("RECONNECT_IVL_MAX", 1000)):
            self.xsub.setsockopt(getattr(zmq, name), value)
        self.endpoints: list[str] = []
        self.start(endpoints)

    def start(self, endpoints: list[str]) -> None:
        """Connect the XSUB to ``endpoints`` (only while no proxy runs: a
        socket is used by one thread at a time), then run the proxy."""
        for endpoint in self.endpoints:
            if endpoint not in endpoints:
                self.xsub.disconnect(endpoint)
        for endpoint in endpoints:
            if endpoint not in self.endpoints:
                self.xsub.connect(endpoint)
        self.endpoints = list(endpoints)
        address = f"inproc://events-proxy-{next(self._ids)}"
        self.control = self.ctx.socket(zmq.PAIR)
        self.control.bind(address)
        peer = self.ctx.socket(zmq.PAIR)
        peer.connect(address)
        xsub = self.xsub

        def run() -> None:
            try:
                zmq.proxy_steerable(xsub, self.pub, None, peer)
            except zmq.ZMQError as exc:  # the context ended under it
                logger.info("events proxy ended: %s", exc)
            finally:
                peer.close(0)

        self.thread = threading.Thread(target=run, name="events-proxy", daemon=True)
        self.thread.start()

    def stop(self) -> bool:
        """End the proxy thread (the XSUB, with its subscriptions, stays);
        False if it did not end in time."""
        thread, self.thread = self.thread, None
        if thread is not None:
            self.control.send(b"TERMINATE")
            thread.join(5)
            self.control.close(0)
            return not thread.is_alive()
        return True

    def restart(self, endpoints: list[str]) -> None:
        if not self.stop():  # it may still use the XSUB: the front exits (restarted)
            logger.critical("the events proxy did not stop; the front exits (restarted)")
            raise SystemExit(70)
        self.start(endpoints)

    def close(self) -> None:
        self.stop()
        self.xsub.close(0)
