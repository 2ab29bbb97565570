"""The front's connections to its shards, and what is in flight on them.

Per shard (``ShardLink``): a DEALER to its intake, a DEALER to its
domain-events endpoint, a socket monitor on each, and with CURVE on a SUB
to its events (with CURVE off the events proxy holds those connections,
``shards.front_events``). ``ShardLinks`` sends requests and matches replies
by tag, answers what a shard did not answer in time, re-sends what a
dropped connection may have lost, and pings each shard for its health.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.throttle import LogThrottle
from oms import codec, errors
from shards.front_config import FrontMetrics

logger = logging.getLogger("shards.front")

RESEND_IDEMPOTENT = {"submit_order", "get_order", "list_orders", "order_counts", "event", "raw",
                     "ping"}
# idempotent requests: re-sent to a restarted shard, answered `internal` after this
GIVE_UP_S = float(os.environ.get("OMS_FRONT_GIVE_UP_S", "30"))
# cancel and operator requests: not re-sent; "outcome unknown" after this
UNSURE_S = float(os.environ.get("OMS_FRONT_UNSURE_S", "10"))
PING_S = 0.5
DOWN_AFTER_S = 3.0

OnReply = Callable[[dict[str, Any] | None, bytes | None], None]
"""Called with the shard's reply (decoded, and as sent), or (None, None) when
there is none: the shard did not answer in time, or the request was lost and
may not be sent again."""


@dataclass
class Pending:
    """A request sent to a shard, waiting for its reply."""

    tag: bytes
    shard: int
    frame: bytes  # what was sent (re-sent as is)
    kind: str  # request type, "event", "ping" or a sub-request
    sent: float
    deadline: float
    on_reply: OnReply
    idempotent: bool = True
    domain: bool = False  # to the shard's domain-events endpoint


def _dealer(ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    for name, value in (("LINGER", 0), ("SNDHWM", 100_000), ("RCVHWM", 100_000),
                        ("RECONNECT_IVL", 100), ("RECONNECT_IVL_MAX", 1000)):
        sock.setsockopt(getattr(zmq, name), value)
    return sock


class ShardLink:
    """The sockets to one shard, and its health as the front sees it."""

    def __init__(self, ctx: zmq.Context, k: int, endpoints: dict[str, str],
                 events_sub: bool) -> None:
        self.ctx, self.k, self.events_sub = ctx, k, events_sub
        self.intake, self.events = endpoints["intake"], endpoints["events"]
        self.domain_events = endpoints["domain_events"]
        self.last_answer = 0.0
        self.ping_sent: float | None = None
        self.last_ping = 0.0
        self.up = False
        self.writable = True  # its store can write (its pong's ``writable``)
        # requests in flight on a connection that dropped: re-sent (or answered
        # "outcome unknown") once the connection is back
        self.lost: dict[str, set[bytes]] = {"req": set(), "dom": set()}
        self.req, self.dom = _dealer(ctx), _dealer(ctx)
        self.mon_req, self.mon_dom, self.sub = self._connect()

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket | None]:
        watch = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        mon_req, mon_dom = self.req.get_monitor_socket(watch), self.dom.get_monitor_socket(watch)
        self.req.connect(self.intake)
        self.dom.connect(self.domain_events)
        if not self.events_sub:
            return mon_req, mon_dom, None  # the events proxy holds the connections
        sub = self.ctx.socket(zmq.SUB)
        for name, value in (("LINGER", 0), ("RCVHWM", 100_000), ("RECONNECT_IVL", 100),
                            ("RECONNECT_IVL_MAX", 1000), ("SUBSCRIBE", b"")):
            sub.setsockopt(getattr(zmq, name), value)
        sub.connect(self.events)
        self.ping_sent, self.up = None, False
        return mon_req, mon_dom, sub

    def endpoints(self) -> tuple[str, str, str]:
        return self.intake, self.events, self.domain_events

    def sockets(self) -> tuple[zmq.Socket, ...]:
        return tuple(s for s in (self.req, self.sub, self.dom, self.mon_req, self.mon_dom)
                     if s is not None)

    def unwatch(self) -> None:
        self.req.disable_monitor()
        self.dom.disable_monitor()

    def reconnect(self, endpoints: dict[str, str]) -> None:
        """The shard moved (Ray): new sockets to its new endpoints."""
        self.unwatch()
        for sock in self.sockets():
            sock.close(0)
        self.intake, self.events = endpoints["intake"], endpoints["events"]
        self.domain_events = endpoints["domain_events"]
        self.req, self.dom = _dealer(self.ctx), _dealer(self.ctx)
        self.mon_req, self.mon_dom, self.sub = self._connect()


class ShardLinks:
    """Every shard's link, and the requests waiting for a shard's reply."""

    def __init__(self, ctx: zmq.Context, shards: list[dict[str, str]], events_sub: bool,
                 metrics: FrontMetrics) -> None:
        self.links = [ShardLink(ctx, k, s, events_sub) for k, s in enumerate(shards)]
        self.m = metrics
        self._tags = itertools.count(1)
        self.pending: dict[bytes, Pending] = {}
        self.timeouts: list[tuple[float, bytes]] = []
        # sent after this round's dedup index commit (``flush_deferred``)
        self.deferred: list[Pending] = []
        self.log = LogThrottle(logger, burst=10)  # flushed by the front's housekeeping

    def ready(self) -> bool:
        """Every shard answers and its store can write (a shard's own
        /readyz: ``unavailable`` makes the service not ready)."""
        return all(link.up and link.writable for link in self.links)

    def sockets(self) -> list[zmq.Socket]:
        return [s for link in self.links for s in link.sockets()]

    # -- sending ---------------------------------------------------------------

    def send(self, shard: int, frame: bytes, kind: str, on_reply: OnReply,
             deadline_s: float | None = None, domain: bool = False,
             later: bool = False) -> Pending:
        idempotent = kind in RESEND_IDEMPOTENT
        later = later or bool(self.deferred)  # keep arrival order behind a deferred one
        now = time.monotonic()
        limit = deadline_s or (GIVE_UP_S if idempotent else UNSURE_S)
        tag = next(self._tags).to_bytes(8, "big")
        p = Pending(tag, shard, frame, kind, now, now + limit, on_reply, idempotent, domain)
        self.pending[tag] = p
        heapq.heappush(self.timeouts, (p.deadline, tag))
        if later:
            self.deferred.append(p)
        else:
            self._put(p)
        return p

    def _put(self, p: Pending) -> None:
        link = self.links[p.shard]
        sock = link.dom if p.domain else link.req
        try:
            sock.send_multipart([p.tag, p.frame], flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: the shard is far behind; the deadline answers
            self.log.report(p.shard, "queue to shard %d full", p.shard,
                            summary=f"requests not queued to shard {p.shard} (queue full)")

    def flush_deferred(self) -> None:
        """Send what waited for the dedup index's commit, in arrival order."""
        if self.deferred:
            deferred, self.deferred = self.deferred, []
            for p in deferred:
                if p.tag in self.pending:
                    self._put(p)

    def from_shard(self, link: ShardLink, sock: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            link.last_answer = time.monotonic()
            if not link.up:  # any answer says it is up (a busy shard gets no pings)
                self._mark_up(link)
            if len(parts) != 2:
                continue
            p = self.pending.pop(parts[0], None)
            if p is None:
                continue  # answered already (a re-sent request answered twice)
            try:
                reply = codec.unpack(parts[1])
            except Exception:  # noqa: BLE001 - an unreadable shard reply becomes an error reply
                reply = {"type": "error", "code": errors.INTERNAL,
                         "message": "a shard sent an unreadable reply"}
            try:
                p.on_reply(reply if isinstance(reply, dict) else {}, parts[1])
            except Exception:
                logger.exception("front failed on a %s reply", p.kind)

    def expire(self, now: float) -> None:
        """Answer (None) each request whose shard did not answer in time."""
        while self.timeouts and self.timeouts[0][0] <= now:
            _, tag = heapq.heappop(self.timeouts)
            p = self.pending.get(tag)
            if p is not None and p.deadline <= now:
                del self.pending[tag]
                self.m.gave_up.labels(str(p.shard)).inc()
                p.on_reply(None, None)
        self.m.pending.set(len(self.pending))

    # -- health ------------------------------------------------------------------

    def check_health(self, now: float) -> None:
        for link in self.links:
            # pinged busy or not: the pong says whether its store can write
            if link.ping_sent is None and now - link.last_ping >= PING_S:
                self._ping(link, now)
            elif (link.ping_sent is not None and now - link.ping_sent > DOWN_AFTER_S
                  and now - link.last_answer > DOWN_AFTER_S and link.up):
                link.up = False
                self.m.shard_up.labels(str(link.k)).set(0)
                logger.warning("shard %d does not answer: marked down", link.k)

    def _ping(self, link: ShardLink, now: float) -> None:
        link.ping_sent = link.last_ping = now

        def pong(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            link.ping_sent = None
            if reply is not None and not link.up:
                self._mark_up(link)
            writable = reply is None or reply.get("writable") is not False
            if writable != link.writable:
                link.writable = writable
                log = logger.info if writable else logger.warning
                log("shard %d: its store %s", link.k, "can write again" if writable
                    else "cannot write: not ready")

        self.send(link.k, codec.pack({"type": "order_counts"}), "ping",
                  pong, deadline_s=DOWN_AFTER_S * 4)

    def _mark_up(self, link: ShardLink) -> None:
        logger.info("shard %d answers: up", link.k)
        link.up = True
        self.m.shard_up.labels(str(link.k)).set(1)

    # -- connections dropped and back ---------------------------------------------

    def on_connection(self, link: ShardLink, which: str) -> None:
        """A connection to a shard dropped (the shard died) or came back.

        What was in flight when it dropped may be lost: once it is back,
        idempotent requests are re-sent and the others are answered
        "outcome unknown". (Requests sent while it was down wait in the
        socket and go out on reconnection.)"""
        mon = link.mon_req if which == "req" else link.mon_dom
        while True:
            try:
                event = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = self._in_flight(link, which)
                link.lost[which] |= lost
                logger.warning("connection to shard %d (%s) lost with %d requests in flight",
                               link.k, which, len(lost))
            elif event["event"] == zmq.EVENT_CONNECTED and link.lost[which]:
                self._resend_lost(link, which)

    def _in_flight(self, link: ShardLink, which: str) -> set[bytes]:
        domain = which == "dom"
        return {t for t, p in self.pending.items() if p.shard == link.k and p.domain == domain}

    def _resend_lost(self, link: ShardLink, which: str) -> None:
        tags, link.lost[which] = link.lost[which], set()
        sock = link.dom if which == "dom" else link.req
        resent = 0
        for tag in sorted(tags):
            p = self.pending.get(tag)
            if p is None:
                continue
            if p.idempotent:
                resent += 1
                try:
                    sock.send_multipart([p.tag, p.frame], flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the deadline answers it
            else:
                del self.pending[tag]
                p.on_reply(None, None)
        self.m.resent.labels(str(link.k)).inc(resent)
        logger.info("shard %d reconnected: %d requests re-sent, %d answered 'outcome unknown'",
                    link.k, resent, len(tags) - resent)

    def move(self, link: ShardLink, endpoints: dict[str, str]) -> None:
        """The shard now listens elsewhere: what is in flight to it is lost
        (re-sent or answered once the new connection is up)."""
        logger.info("shard %d moved to %s", link.k, endpoints["intake"])
        for which in ("req", "dom"):
            link.lost[which] |= self._in_flight(link, which)
        link.reconnect(endpoints)

    def close(self) -> None:
        for link in self.links:
            link.unwatch()
            for sock in link.sockets():
                sock.close(0)
