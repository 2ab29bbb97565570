"""A ROUTER server endpoint owned by one loop actor: the intake and the
domain-events endpoint are both one.

It receives ``[routing id, payload]`` (a DEALER) or ``[routing id, b"",
payload]`` (a REQ socket, or a DEALER that sends its empty delimiter), with
the CURVE ``User-Id`` of the sender when CURVE is on, hands each request to
``on_frame``, and sends replies queued from any thread with ``reply_to``
(only this actor's thread touches the socket). Any other shape goes to
``on_bad_envelope``: a ``malformed`` reply that carries back no frame of the
sender's but its routing id and an empty delimiter (``RequestReader``). A
reply to a peer that is gone or whose queue is full (``ROUTER_MANDATORY``)
is counted and logged, never raised: a client gone with thousands of
replies due would be thousands of lines, so the endpoint's lines go through
a ``LogThrottle`` (``self.log``; a summary of those held back leaves at a
tick, ``on_tick``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import zmq

from actors.loop import LoopActor
from actors.metrics import Metrics
from actors.sockets import NOBLOCK, open_socket, recv_frame, send_frames
from actors.throttle import LogThrottle
from oms import codec, errors

MAX_SOCKET_MESSAGE = 4 * 1024 * 1024  # larger frames are cut off by ZeroMQ itself
FRONT_TAG_BYTES = 8
"""The tag the sharded front puts before each request to a shard
(``shards.front_links``): a shard's endpoints take and echo it (``tagged``)."""
BAD_ENVELOPE = ("a request is one frame: a DEALER sends [payload] or [empty frame, payload], "
                "a REQ socket one frame; this message had more")
"""The ``malformed`` reply's message for a message of another shape."""


Request = tuple[tuple[bytes, ...], bytes | None, str | None]
"""(the reply's envelope, the payload frame or None, the sender's ``User-Id``)."""
DRAIN_PER_READ = 4096
"""Frames of one message past its fourth (the most a request has, and one
to know it has more) a ``read`` discards, then the next read goes on: some
1.3 us a frame here, so one message of a million empty frames (2 MB sent)
no longer holds the loop for seconds (it held it 6 s, each frame kept)."""


class RequestReader:
    """Reads what a ROUTER has queued (also the sharded front's two): one
    reader a socket, for the part of a message it has not read yet."""

    __slots__ = ("_draining", "identity_required", "second_sizes", "sock")

    def __init__(self, sock: zmq.Socket, identity_required: bool,
                 tagged: bool = False) -> None:
        self.sock, self.identity_required = sock, identity_required
        self.second_sizes = (0, FRONT_TAG_BYTES) if tagged else (0,)
        self._draining = False  # in a message of too many frames, its rest not yet read

    def read(self, budget: int) -> Iterator[Request]:
        """``budget`` messages at most: (the reply's envelope, the payload
        frame, the sender's CURVE ``User-Id`` or None).

        The envelope is the routing id, then the empty delimiter a REQ socket
        needs back when the request had one: ``[id, payload]`` and ``[id, b"",
        payload]`` are requests (with ``tagged``, a shard behind the front,
        also ``[id, tag, payload]`` with the front's 8-byte tag). Any other
        shape (more frames, a non-empty frame before the payload) has None
        for its payload, to be answered ``malformed``: its envelope is the
        routing id and, when its first frame was empty, ``b""`` (so a REQ
        peer still reads the reply), never a frame the sender chose. Past its
        fourth frame a message's frames are not kept, and at most
        ``DRAIN_PER_READ`` of them are read a call (the socket stays
        readable: the next call goes on)."""
        if self._draining and not self._drain():
            return
        sock, second_sizes = self.sock, self.second_sizes
        for _ in range(budget):
            try:
                part = recv_frame(sock, NOBLOCK, False)
            except zmq.Again:
                return
            parts = [part]
            while part.more and len(parts) < 4:
                part = recv_frame(sock, NOBLOCK, False)
                parts.append(part)
            user = None
            if self.identity_required:
                got = part.get("User-Id")  # a str: pyzmq types all properties as one
                user = got if isinstance(got, str) else None
            frames = [p.bytes for p in parts[:3]]
            n = len(parts)  # (a ROUTER's message has the routing id and a frame at least)
            if n == 2:
                yield (frames[0],), frames[1], user
            elif n == 3 and len(frames[1]) in second_sizes:
                yield (frames[0], frames[1]), frames[2], user
            else:  # (draining is marked first: a read left at this yield goes on with it)
                self._draining = part.more
                yield ((frames[0], b"") if not frames[1] else (frames[0],)), None, user
                if self._draining and not self._drain():
                    return

    def _drain(self) -> bool:
        """Discard up to ``DRAIN_PER_READ`` frames of the message being
        read; True once its last is read. (A message's frames are all
        queued once its first is: no wait.)"""
        sock = self.sock
        for _ in range(DRAIN_PER_READ):
            if not recv_frame(sock, NOBLOCK, False).more:
                self._draining = False
                return True
        return False


class SendReply(NamedTuple):
    envelope: tuple[bytes, ...]
    payload: dict[str, Any]


class RouterEndpoint(LoopActor):
    label = "endpoint"  # for metrics and logs
    direct = SendReply  # a few an order, without pykka's envelope handling (LoopActor.on_batch)

    def __init__(self, zctx: zmq.Context, endpoint: str, metrics: Metrics,
                 curve: dict[str, Any] | None = None, hwm: int = 10_000,
                 tagged: bool = False) -> None:
        """``tagged``: a shard's endpoint, which the sharded front sends its
        requests with a tag frame before each (``RequestReader``)."""
        super().__init__()
        self.tagged = tagged
        self.zctx, self.endpoint, self.metrics, self.hwm = zctx, endpoint, metrics, hwm
        self.curve = curve or {}
        self.identity_required = bool(curve)
        self.sock: zmq.Socket | None = None
        self.reader: RequestReader | None = None  # the socket's, once it is open
        self._out = bytearray(256)  # each reply encoded here, then sent (a copying send)
        # lines that may come in floods: the first 10 a second of a kind, then a count
        self.log = LogThrottle(logging.getLogger(type(self).__module__), burst=10)

    def on_start(self) -> None:
        self.sock = open_socket(self.zctx, zmq.ROUTER, bind=self.endpoint, ROUTER_MANDATORY=1,
                                SNDHWM=self.hwm, RCVHWM=self.hwm, LINGER=1000,
                                MAXMSGSIZE=MAX_SOCKET_MESSAGE, **self.curve)
        self.reader = RequestReader(self.sock, self.identity_required, self.tagged)

    def on_stop(self) -> None:
        self.log.flush(ending=True)  # the counts of lines held back: not lost
        if self.sock is not None:
            self.sock.close()

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] if self.sock is not None else []

    def on_readable(self, sock: zmq.Socket) -> None:
        assert self.reader is not None and self.reader.sock is sock  # (its one socket)
        for envelope, frame, user in self.reader.read(self.read_budget):
            if frame is None:
                self.on_bad_envelope(envelope, user)
            else:
                self.on_frame(envelope, frame, user)

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        raise NotImplementedError

    def poll_timeout(self) -> float | None:
        """Milliseconds until the log's next summary is due, or None."""
        due = self.log.due
        return None if due is None else max(0.0, (due - time.monotonic()) * 1000)

    def on_tick(self) -> None:
        """The log's summaries of the windows that ended (``LogThrottle``)."""
        if self.log.due is not None:
            self.log.flush()

    def on_bad_envelope(self, envelope: tuple[bytes, ...], user: str | None) -> None:
        """A message that is not one request frame (``RequestReader``): a
        ``malformed`` reply (a subclass also counts it)."""
        self.send_reply(envelope, errors.error_reply(errors.MALFORMED, BAD_ENVELOPE))

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
            self.log.report(("undelivered", exc.errno), "%s reply not delivered: %s",
                            self.label, exc, summary=f"{self.label} replies not delivered "
                            f"({exc.strerror})")

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
