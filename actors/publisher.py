"""The channel events endpoint (contract §2): one PUB socket, one thread.

Every message is ``[topic, payload]`` with topic = the order's
``source_system`` followed by one NUL byte (``topic_of``). ZeroMQ matches
subscriptions by prefix; the NUL, which no ``source_system`` may contain,
makes ``web\\0`` match channel ``web`` only, never ``webshop``. With CURVE
on, the socket is an XPUB with manual subscriptions: whatever a subscriber
asks for, it is subscribed to its own identity plus the NUL (an operator:
everything).

Subscribers cannot make the service hold memory without bound:

- ``hwm`` (SNDHWM) bounds what each subscriber's queue holds; beyond it PUB
  drops for that subscriber (channels read what they must not miss with
  ``get_order``);
- a subscriber that stops reading is disconnected after ``stall_timeout_s``
  (ZMTP heartbeats: a stalled peer stops answering the PINGs queued behind
  its unread events), and its queue is freed;
- at most ``max_subscribers`` are connected; a connection beyond that is
  shut down as soon as it is accepted, logged and counted (it may come back
  when a place is free);
- when a subscriber leaves, freed memory is handed back to the system
  (``malloc_trim``), at most once a second.

The connections are watched with a ZeroMQ socket monitor read on this
actor's own thread (``actors.subscribers.SubscriberLimit``, shared with the
sharded front).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import time
from collections import Counter
from typing import Any

import zmq

from actors.loop import LoopActor, bursts
from actors.metrics import Metrics, observe_all
from actors.security import is_operator_name
from actors.sockets import MORE, NOBLOCK, open_socket, send_frame
from actors.subscribers import SubscriberLimit, bind_watched
from actors.throttle import LogThrottle
from oms import codec
from oms.codec import encode_into
from oms.config import ConfigError
from oms.edge import check_number

logger = logging.getLogger(__name__)

TOPIC_END = b"\x00"
"""Ends every topic; no ``source_system`` contains it."""
TOPICS_KEPT = 10_000  # topic frames kept encoded (source systems are few)


def topic_of(source_system: str) -> bytes:
    """The topic frame of a channel's events (and what to subscribe to for exactly
    that channel's events)."""
    return source_system.encode() + TOPIC_END


PublishEvent = tuple
"""What ``publish`` tells the publisher: a plain ``(topic, payload)`` tuple,
13 an order (a NamedTuple took 90 ns more to build, even by ``tuple.__new__``).
Nothing else tells it a tuple."""


def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def subscribe_by_identity(sock: zmq.Socket) -> None:
    """XPUB with CURVE (XPUB_MANUAL): subscribe each new subscriber to its own
    ``source_system``'s topic only (an operator: everything), whatever it asked."""
    for _ in range(1000):
        try:
            frame = sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if frame.bytes[:1] != b"\x01":
            # Unsubscriptions are not honoured: a subscriber keeps its own
            # topic until it disconnects (ZeroMQ then drops its queue).
            continue
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:  # no authenticated peer behind it
            continue
        topic = b"" if is_operator_name(user) else topic_of(str(user))
        sock.setsockopt(zmq.SUBSCRIBE, topic)


class Publisher(LoopActor):
    thread_name = "events-pub"
    direct = PublishEvent  # 13 an order, without pykka's envelope handling (LoopActor.on_batch)
    _bare = frozenset((PublishEvent,))  # a Bundle's events come into on_batch bare (its own loop)
    # its fields in slots, as the gateway's: the instance dict stays under CPython
    # 3.11's 30 shared keys (past them every self.x lookup is unspecialized)
    __slots__ = ("_completions", "_kinds", "_out", "_published", "_topics", "_transitions",
                 "_trim", "_trim_at", "ctx", "curve", "endpoint", "hwm", "log",
                 "max_subscribers", "metrics", "sock", "stall_timeout_s", "subscribers")

    def __init__(self, ctx: zmq.Context, endpoint: str, metrics: Metrics, *,
                 hwm: int = 1000, curve: dict[str, Any] | None = None,
                 max_subscribers: int = 100, stall_timeout_s: float = 30.0) -> None:
        super().__init__()
        problem = (check_number(hwm, "events_hwm", 1, 1_000_000)
                   or check_number(max_subscribers, "max_subscribers", 1, 100_000)
                   or check_number(stall_timeout_s, "subscriber_timeout_s", 0.1, 3600))
        if problem is not None:
            raise ConfigError(problem)
        self.ctx, self.endpoint, self.metrics, self.hwm = ctx, endpoint, metrics, int(hwm)
        self.max_subscribers, self.stall_timeout_s = int(max_subscribers), stall_timeout_s
        self.curve = curve or {}
        self.sock: zmq.Socket | None = None
        self.subscribers: SubscriberLimit | None = None  # made with the socket, on_start
        self._trim = _malloc_trim()
        self._trim_at: float | None = None
        self.log = LogThrottle(logger, every_s=5.0)
        self._topics: dict[str, bytes] = {}  # source_system -> its topic frame
        self._published: dict[str, Any] = {}  # event type -> its counter child
        self._out = bytearray(256)  # each event encoded here, then sent (a copying send)
        self._kinds: list[str] = []  # types published since the last tick: counted there
        # of the events published in place since the last tick (``publish_counted``):
        self._transitions: dict[tuple[str, str], int] = {}  # (order type, state) -> count
        self._completions: dict[tuple[str, str], list[float]] = {}  # ... -> seconds

    def on_start(self) -> None:
        # XPUB: with CURVE on, subscriptions come to us (XPUB_MANUAL) and each
        # subscriber is subscribed to its own source_system only, whatever it asked.
        kind = zmq.XPUB if self.curve else zmq.PUB
        manual: dict[str, Any] = {"XPUB_MANUAL": 1} if self.curve else {}
        ping_ms = max(100, int(self.stall_timeout_s * 1000 / 3))
        # HANDSHAKE_IVL: a connection that never completes its handshake (no
        # key, or no ZMTP at all) holds a subscriber place for 5 s at most
        self.sock = open_socket(self.ctx, kind, SNDHWM=self.hwm, LINGER=500,
                                HANDSHAKE_IVL=5000, HEARTBEAT_IVL=ping_ms,
                                HEARTBEAT_TIMEOUT=int(self.stall_timeout_s * 1000),
                                **manual, **self.curve)
        try:  # watched from before the bind: no connection goes uncounted
            monitor, port = bind_watched(self.sock, self.endpoint)
        except BaseException:
            self.on_stop()
            raise
        self.subscribers = SubscriberLimit(monitor, port, self.max_subscribers,
                                           self.metrics.subscribers,
                                           self.metrics.subscribers_refused, self.log)

    def sockets(self) -> list[zmq.Socket]:
        # The PUB socket too, though it is never readable: polling it makes
        # ZeroMQ process its commands (a gone subscriber's queue is freed only
        # then), also while no event is being published.
        socks = [self.sock] if self.sock is not None else []
        return socks + ([self.subscribers.monitor] if self.subscribers is not None else [])

    def on_readable(self, sock: zmq.Socket) -> None:
        if self.subscribers is not None and sock is self.subscribers.monitor:
            if self.subscribers.on_monitor():  # someone left: trim soon
                self._trim_at = self._trim_at or time.monotonic() + 1.0
            return
        if self.curve:
            subscribe_by_identity(sock)

    def poll_timeout(self) -> float | None:
        """Milliseconds until the trim or the log's next summary is due, or None."""
        due = self.log.due
        if self._trim_at is not None and (due is None or self._trim_at < due):
            due = self._trim_at
        return None if due is None else max(0.0, (due - time.monotonic()) * 1000)

    def on_tick(self) -> None:
        """After each slice (and read, and when due): count what the slice
        published, one ``inc`` per event type instead of one per event."""
        if self._kinds or self._transitions or self._completions:
            self._count()
        if self._trim_at is not None and time.monotonic() >= self._trim_at:
            self._trim_at = None
            if self._trim is not None:
                self._trim(0)  # a stalled subscriber's queue was freed: give it back
        if self.log.due is not None:
            self.log.flush()  # the count of refusals not logged (``LogThrottle``)

    def on_receive(self, message: Any) -> None:
        if isinstance(message, PublishEvent):
            self.on_direct(message)

    def on_direct(self, message: tuple[str, dict[str, Any]]) -> None:
        """Publish one told event (``tell`` outside a burst)."""
        self.on_batch([message])

    def on_batch(self, envelopes: list[Any]) -> None:
        """Publish a slice's events (13 an order), in one loop: a bundle's
        ``PublishEvent`` comes in bare (``_bare``); anything else (an ask, a
        stop, an event told alone) goes through ``LoopActor.on_batch``, in
        order. An event that fails is survived, as any told message."""
        sock, topics, kinds, out = self.sock, self._topics, self._kinds, self._out
        for message in envelopes:
            if type(message) is not PublishEvent:
                LoopActor.on_batch(self, [message])
                if self.actor_stopped.is_set():
                    return
                sock = self.sock
                continue
            if sock is None:
                continue
            try:
                name, payload = message
                topic = topics.get(name)
                if topic is None:
                    topic = self._topic(name)
                # two sends (send_multipart's checks cost more); both frames are
                # encoded first, so nothing can fail between the two sends
                data = codec.pack_into(payload, out)
                send_frame(sock, topic, MORE)
                send_frame(sock, data, NOBLOCK)
                kinds.append(payload.get("type", "?"))  # counted once sent (on_tick)
            except Exception:  # noqa: BLE001 - the failure rule, as a told message
                self._loop.survived(self.component, sys.exc_info())

    def _count(self) -> None:
        kinds, self._kinds = self._kinds, []
        for kind, n in Counter(kinds).items():
            counter = self._published.get(kind)
            if counter is None:
                counter = self._published[kind] = self.metrics.published.labels(kind)
            counter.inc(n)
        metrics = self.metrics
        transitions, self._transitions = self._transitions, {}
        for key, n in transitions.items():
            metrics.transitions.labels(*key).inc(n)
        completions, self._completions = self._completions, {}
        for key, values in completions.items():
            observe_all(metrics.completion.labels(*key), values)

    def on_stop(self) -> None:
        self.log.flush(ending=True)
        if self._kinds or self._transitions or self._completions:
            self._count()
        if self.sock is not None:
            if self.subscribers is not None:
                self.subscribers.close(self.sock)
            self.sock.close()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Thread-safe: queue an event for publication. In the store writer's
        burst on the publisher's loop, published at once while the burst
        holds the publisher (``LoopActor.in_place``, its first test inline:
        13 an order); else told. In place, an event is sent as ``on_batch``
        sends each, and an error in it is survived as a told message's."""
        if ((getattr(bursts, "pending", None) is not self.held_by or self.mail)
                and not self.in_place()):
            self.tell((topic, payload))  # a PublishEvent
            return
        sock = self.sock
        if sock is None:
            return
        try:
            frame = self._topics.get(topic)
            if frame is None:
                frame = self._topic(topic)
            out = self._out  # both frames first: nothing fails between the sends
            try:
                encode_into(payload, out)
            except Exception:  # noqa: BLE001 - pack_into decides: the same bytes, or msgpack's error
                codec.pack_into(payload, out)
            send_frame(sock, frame, MORE)
            send_frame(sock, out, NOBLOCK)
            self._kinds.append(payload.get("type", "?"))  # counted once sent (on_tick)
        except Exception:  # noqa: BLE001 - the failure rule, as a told message
            self._loop.survived(self.component, sys.exc_info())

    def publish_counted(self, topic: str, payload: dict[str, Any], order_type: str,
                        created_ts: float) -> None:
        """Thread-safe: ``publish`` an ``order_state`` (counted in
        ``oms_order_transitions_total``) or an ``order_summary`` (its
        acceptance to terminal state in ``oms_order_completion_seconds``).
        Counted first, whether or not it can be sent, as before; in place
        (``LoopActor.in_place``) once per label set at the slice's end
        (``on_tick``: one ``inc``, one ``observe_all``), else at once."""
        if payload["type"] == "order_state":
            key = (order_type, payload["state"])
            if not self.in_place():
                self.metrics.transitions.labels(*key).inc()
                self.tell((topic, payload))  # a PublishEvent
                return
            transitions = self._transitions
            transitions[key] = transitions.get(key, 0) + 1
        else:
            summary = payload["summary"]
            key, took = (order_type, summary["state"]), max(0.0, summary["completed_ts"]
                                                            - created_ts)
            if not self.in_place():
                self.metrics.completion.labels(*key).observe(took)
                self.tell((topic, payload))  # a PublishEvent
                return
            values = self._completions.get(key)
            if values is None:
                values = self._completions[key] = []
            values.append(took)
        self.publish(topic, payload)  # in place, as held (mail put meanwhile goes first)

    def _topic(self, name: str) -> bytes:
        topics = self._topics
        if len(topics) >= TOPICS_KEPT:
            topics.clear()
        topic = topics[name] = topic_of(name)
        return topic
