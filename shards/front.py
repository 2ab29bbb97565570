"""The front of a sharded service: one intake, one events and one
domain-events endpoint in front of N shard processes (docs/scaling.md).

One thread polls every socket. It routes each request to the shard that
owns it and relays the shard's reply unchanged: a submit by its customer's
virtual shard (after recording source_system + external_id -> virtual shard
in its own LMDB, synced, before forwarding), a request for one order by the
virtual shard in its id (or the dedup index for an external id), and
``list_orders`` / ``order_counts`` to every shard, merged. It republishes
every shard's events and forwards domain events to the owning shard, whose
``ack`` it relays. With CURVE on it applies the identity rules itself (the
shards listen on loopback for the front alone).

Run by the supervisor as ``python -m shards.front CONFIG.json``; the file's
``shards`` list is read again when it changes (Ray moves a shard).
"""

from __future__ import annotations

import base64
import fcntl
import heapq
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, process_collector

from actors.publisher import topic_of
from actors.security import is_operator_name
from oms import codec, errors
from oms.sharding import vshard_of, vshard_of_order_id
from storage.records import ext_key

logger = logging.getLogger("shards.front")

RESEND_IDEMPOTENT = {"submit_order", "get_order", "list_orders", "order_counts", "event", "raw",
                     "ping"}
OPERATOR_ONLY = {"retry_step", "skip_step", "abort_order", "order_counts"}
BY_ORDER = {"get_order", "cancel_order", "retry_step", "skip_step", "abort_order"}
# idempotent requests: re-sent to a restarted shard, answered `internal` after this
GIVE_UP_S = float(os.environ.get("OMS_FRONT_GIVE_UP_S", "30"))
# cancel and operator requests: not re-sent; "outcome unknown" after this
UNSURE_S = float(os.environ.get("OMS_FRONT_UNSURE_S", "10"))
PING_S = 0.5
DOWN_AFTER_S = 3.0
CURSOR_PREFIX = "S1."


@dataclass
class Pending:
    """A request sent to a shard, waiting for its reply."""

    tag: bytes
    shard: int
    frame: bytes  # what was sent (re-sent as is)
    kind: str  # request type, "event", "ping" or a sub-request
    sent: float
    deadline: float
    on_reply: Callable[[dict[str, Any] | None, bytes | None], None]
    idempotent: bool = True
    domain: bool = False  # to the shard's domain-events endpoint


@dataclass
class ShardLink:
    k: int
    intake: str
    events: str
    domain_events: str
    req: Any = None
    sub: Any = None
    dom: Any = None
    mon_req: Any = None
    mon_dom: Any = None
    last_answer: float = 0.0
    ping_sent: float | None = None
    up: bool = False
    # requests in flight on a connection that dropped: re-sent (or answered
    # "outcome unknown") once the connection is back
    lost: dict[str, set[bytes]] = field(default_factory=lambda: {"req": set(), "dom": set()})


@dataclass
class FrontConfig:
    data: str
    intake: str
    events: str
    domain_events: str
    vshards: int
    owner: list[int]
    shards: list[dict[str, str]]
    order_types: list[str] = field(default_factory=list)
    processes: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    curve_server_key: str | None = None
    curve_clients: str | None = None
    systems: list[str] = field(default_factory=list)  # domain systems' names
    events_hwm: int = 1000
    max_subscribers: int = 100
    subscriber_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "json"

    @classmethod
    def read(cls, file: str | Path) -> FrontConfig:
        raw = json.loads(Path(file).read_text(encoding="utf-8"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


class StopFlag:
    """Set from a signal handler: a plain attribute, no lock (a threading.Event
    set by a second SIGTERM inside the first one's ``set`` deadlocked the front)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


class FrontMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("oms_front_requests_total", "Requests relayed by the front, by "
                                "type and reply type", ["type", "reply"], registry=registry)
        self.resent = Counter("oms_front_resent_total", "Requests re-sent to a shard that "
                              "came back", ["to_shard"], registry=registry)
        self.gave_up = Counter("oms_front_gave_up_total", "Requests answered internal because "
                               "their shard did not answer in time", ["to_shard"],
                               registry=registry)
        self.shard_up = Gauge("oms_front_shard_up", "1 when the shard answers the front's pings",
                              ["to_shard"], registry=registry)
        self.pending = Gauge("oms_front_pending_requests", "Requests waiting for a shard",
                             registry=registry)
        self.index_commit = Histogram("oms_front_index_commit_seconds", "Dedup index group "
                                      "commit (fsync) time", registry=registry,
                                      buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5))
        self.events = Counter("oms_front_events_total", "Channel events republished",
                              registry=registry)
        self.subscribers = Gauge("oms_event_subscribers", "Connections to the events "
                                 "endpoint", registry=registry)
        self.subscribers_refused = Counter("oms_event_subscribers_refused_total",
                                           "Events connections closed at once: "
                                           "max_subscribers were connected", registry=registry)


class Front:
    def __init__(self, cfg: FrontConfig, config_file: str | None = None) -> None:
        self.cfg = cfg
        self.config_file = config_file
        self.config_mtime = 0.0
        self.stop_flag = StopFlag()
        self.reload_flag = StopFlag()  # SIGHUP: read the client keys again
        self.registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=self.registry)
        self.m = FrontMetrics(self.registry)
        Gauge("oms_ready", "1 when every shard answers the front (the front's /readyz)",
              registry=self.registry).set_function(lambda: float(self.ready()))
        self.vshards, self.owner = cfg.vshards, list(cfg.owner)
        self._tags = itertools.count(1)
        self.pending: dict[bytes, Pending] = {}
        self.timeouts: list[tuple[float, bytes]] = []
        self.batch_index: dict[bytes, int] = {}
        self.batch_forwards: list[tuple[int, bytes, Pending]] = []
        self.identity_required = False
        self.user: str | None = None
        self.http: Any = None
        self.security: Any = None
        self.engine_types: list[str] = list(cfg.order_types)
        self.systems = frozenset(cfg.systems)

    # -- start / stop -------------------------------------------------------

    def open(self) -> None:
        cfg = self.cfg
        folder = Path(cfg.data) / "front"
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / "front.lock", "a+")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{folder} is in use by another front") from None
        self.env = lmdb.open(str(folder), map_size=64 * 1024 * 1024, max_dbs=2, sync=True,
                             metasync=True)
        self.index = self.env.open_db(b"ext")
        if not self.engine_types:
            from actors.settings import load_processes

            self.engine_types = sorted(load_processes(cfg.processes))
        self.ctx = zmq.Context()
        curve: dict[str, Any] = {}
        if cfg.curve_server_key or cfg.curve_clients:
            from actors.security import ChannelSecurity

            self.security = ChannelSecurity(self.ctx, cfg.curve_server_key or "",
                                            cfg.curve_clients or "")
            curve = self.security.server_options()
            self.identity_required = True
        self.intake = self._bind(zmq.ROUTER, cfg.intake, ROUTER_MANDATORY=1, SNDHWM=10_000,
                                 RCVHWM=10_000, MAXMSGSIZE=4 * 1024 * 1024, **curve)
        # as actors.publisher: a bounded queue per subscriber, a stalled one dropped
        # (heartbeats), a handshake that never completes after 5 s
        stall_ms = int(cfg.subscriber_timeout_s * 1000)
        events = {"SNDHWM": cfg.events_hwm, "HANDSHAKE_IVL": 5000,
                  "HEARTBEAT_IVL": max(100, stall_ms // 3), "HEARTBEAT_TIMEOUT": stall_ms}
        self.proxy: EventsProxy | None = None
        if curve:
            self.pub = self._bind(zmq.XPUB, cfg.events, True, XPUB_MANUAL=1, **events, **curve)
        else:  # events go from the shards to the subscribers in C (zmq.proxy), not here
            self.pub = self._bind(zmq.XPUB, cfg.events, True, **events)
            self.proxy = EventsProxy(self.ctx, self.pub, [s["events"] for s in cfg.shards])
        self.domain = self._bind(zmq.ROUTER, cfg.domain_events, ROUTER_MANDATORY=1,
                                 MAXMSGSIZE=4 * 1024 * 1024, **curve)
        self.links = [ShardLink(k, s["intake"], s["events"], s["domain_events"])
                      for k, s in enumerate(cfg.shards)]
        for link in self.links:
            self._connect(link)
        if cfg.metrics_port:
            from actors.http import HttpServer

            self.http = HttpServer(cfg.metrics_host, cfg.metrics_port, self.registry,
                                   self.ready)
        if self.config_file:
            self.config_mtime = os.stat(self.config_file).st_mtime
        logger.info("front ready: intake %s, events %s, domain events %s, %d shards",
                    cfg.intake, cfg.events, cfg.domain_events, len(self.links))

    def _bind(self, kind: int, endpoint: str, watch: bool = False,
              **options: Any) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        if watch:  # from before the bind: no connection goes uncounted
            self.subscribers = Subscribers(sock.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED), self.cfg.max_subscribers, self.m)
        sock.bind(endpoint)
        if watch:
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if bound.startswith("tcp://"):
                self.subscribers.port = int(bound.rsplit(":", 1)[1])
        return sock

    def _connect(self, link: ShardLink) -> None:
        for name in ("mon_req", "mon_dom"):
            old = getattr(link, name)
            if old is not None:
                getattr(link, name[4:]).disable_monitor()
                old.close(0)
        for name in ("req", "sub", "dom"):
            old = getattr(link, name)
            if old is not None:
                old.close(0)
        link.req = self.ctx.socket(zmq.DEALER)
        link.dom = self.ctx.socket(zmq.DEALER)
        for sock in (link.req, link.dom):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        watch = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        link.mon_req = link.req.get_monitor_socket(watch)
        link.mon_dom = link.dom.get_monitor_socket(watch)
        link.req.connect(link.intake)
        link.dom.connect(link.domain_events)
        if self.proxy is not None:
            return  # the events proxy holds the connections to the shards' events
        link.sub = self.ctx.socket(zmq.SUB)
        link.sub.setsockopt(zmq.LINGER, 0)
        link.sub.setsockopt(zmq.RCVHWM, 100_000)
        link.sub.setsockopt(zmq.RECONNECT_IVL, 100)
        link.sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        link.sub.setsockopt(zmq.SUBSCRIBE, b"")
        link.sub.connect(link.events)
        link.ping_sent, link.up = None, False

    def ready(self) -> bool:
        return all(link.up for link in self.links)

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
        for link in self.links:
            link.req.disable_monitor()
            link.dom.disable_monitor()
        if self.proxy is not None:
            self.proxy.stop()
        self.pub.disable_monitor()
        self.subscribers.monitor.close(0)
        for sock in [self.intake, self.pub, self.domain] + [
                s for link in self.links for s in self._link_sockets(link)]:
            sock.close(0)
        if self.security is not None:
            self.security.stop()
        self.ctx.term()
        self.env.sync(True)
        self.env.close()
        self._lock.close()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        self._poller = poller
        self._register(poller)
        last_check = 0.0
        while not self.stop_flag.is_set():
            events = dict(poller.poll(50))
            now = time.monotonic()
            for link in self.links:
                if events.get(link.req):
                    self._from_shard(link, link.req)
                if events.get(link.dom):
                    self._from_shard(link, link.dom)
                if link.sub is not None and events.get(link.sub):
                    self._events_from(link.sub)
                if events.get(link.mon_req):
                    self._connection(link, "req")
                if events.get(link.mon_dom):
                    self._connection(link, "dom")
            if events.get(self.intake):
                self._from_channels()
            if events.get(self.domain):
                self._from_domains()
            if events.get(self.subscribers.monitor):
                self.subscribers.on_monitor()
            if self.identity_required and events.get(self.pub):
                self._subscriptions()
            self._flush_batch()
            if now - last_check >= 0.05:
                last_check = now
                self._housekeeping(now)

    @staticmethod
    def _link_sockets(link: ShardLink) -> tuple[Any, ...]:
        return tuple(s for s in (link.req, link.sub, link.dom, link.mon_req, link.mon_dom)
                     if s is not None)

    def _register(self, poller: zmq.Poller) -> None:
        for sock in [self.intake, self.domain, self.subscribers.monitor] + [
                s for link in self.links for s in self._link_sockets(link)]:
            poller.register(sock, zmq.POLLIN)
        if self.identity_required:
            poller.register(self.pub, zmq.POLLIN)

    def _housekeeping(self, now: float) -> None:
        proxy = self.proxy.thread if self.proxy is not None else None
        if proxy is not None and not proxy.is_alive():  # the one failure rule: exit loudly
            logger.critical("the events proxy thread ended; the front exits (restarted)")
            raise SystemExit(70)
        for link in self.links:
            if link.ping_sent is None and now - link.last_answer >= PING_S:
                self._ping(link, now)
            elif link.ping_sent is not None and now - link.ping_sent > DOWN_AFTER_S and link.up:
                link.up = False
                self.m.shard_up.labels(str(link.k)).set(0)
                logger.warning("shard %d does not answer: marked down", link.k)
        while self.timeouts and self.timeouts[0][0] <= now:
            _, tag = heapq.heappop(self.timeouts)
            p = self.pending.get(tag)
            if p is not None and p.deadline <= now:
                del self.pending[tag]
                self.m.gave_up.labels(str(p.shard)).inc()
                p.on_reply(None, None)
        self.m.pending.set(len(self.pending))
        if self.reload_flag.is_set():
            self.reload_flag.value = False
            if self.security is not None:
                try:
                    self.security.reload()
                except Exception as exc:  # noqa: BLE001 - a bad folder: keep the keys we have
                    logger.error("client keys not reloaded: %s", exc)
        if self.config_file:
            self._reread_config()

    def _ping(self, link: ShardLink, now: float) -> None:
        link.ping_sent = now

        def pong(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            link.ping_sent = None
            if reply is not None and not link.up:
                self._mark_up(link)

        self.send(link.k, codec.pack({"type": "get_order", "order_id": "-"}), "ping",
                  pong, deadline_s=DOWN_AFTER_S * 4)

    def _mark_up(self, link: ShardLink) -> None:
        logger.info("shard %d answers: up", link.k)
        link.up = True
        self.m.shard_up.labels(str(link.k)).set(1)

    def _connection(self, link: ShardLink, which: str) -> None:
        """A connection to a shard dropped (the shard died) or came back.

        What was in flight when it dropped may be lost: once it is back,
        idempotent requests are re-sent and the others are answered
        "outcome unknown". (Requests sent while it was down wait in the
        socket and go out on reconnection.)"""
        from zmq.utils.monitor import recv_monitor_message

        mon = link.mon_req if which == "req" else link.mon_dom
        domain = which == "dom"
        while True:
            try:
                event = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                lost = {t for t, p in self.pending.items()
                        if p.shard == link.k and p.domain == domain}
                link.lost[which] |= lost
                logger.warning("connection to shard %d (%s) lost with %d requests in flight",
                               link.k, which, len(lost))
            elif event["event"] == zmq.EVENT_CONNECTED and link.lost[which]:
                self._resend_lost(link, which)

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

    def _reread_config(self) -> None:
        try:
            mtime = os.stat(self.config_file).st_mtime  # type: ignore[arg-type]
        except OSError:
            return
        if mtime == self.config_mtime:
            return
        self.config_mtime = mtime
        try:
            cfg = FrontConfig.read(self.config_file)  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError) as exc:
            logger.error("front config not re-read: %s", exc)
            return
        for link, new in zip(self.links, cfg.shards, strict=False):
            if (link.intake, link.events, link.domain_events) != (
                    new["intake"], new["events"], new["domain_events"]):
                logger.info("shard %d moved to %s", link.k, new["intake"])
                for sock in self._link_sockets(link):
                    self._poller.unregister(sock)
                link.intake, link.events, link.domain_events = (
                    new["intake"], new["events"], new["domain_events"])
                for which, domain in (("req", False), ("dom", True)):
                    link.lost[which] |= {t for t, p in self.pending.items()
                                         if p.shard == link.k and p.domain == domain}
                self._connect(link)
                for sock in self._link_sockets(link):
                    self._poller.register(sock, zmq.POLLIN)
                if self.proxy is not None:
                    self.proxy.restart([lk.events for lk in self.links])

    # -- sending to shards ------------------------------------------------------

    def send(self, shard: int, frame: bytes, kind: str,
             on_reply: Callable[[dict[str, Any] | None, bytes | None], None],
             deadline_s: float | None = None, domain: bool = False,
             later: bool = False) -> Pending:
        idempotent = kind in RESEND_IDEMPOTENT
        later = later or bool(self.batch_forwards)  # keep arrival order behind a deferred one
        now = time.monotonic()
        limit = deadline_s or (GIVE_UP_S if idempotent else UNSURE_S)
        tag = next(self._tags).to_bytes(8, "big")
        p = Pending(tag, shard, frame, kind, now, now + limit, on_reply, idempotent, domain)
        self.pending[tag] = p
        heapq.heappush(self.timeouts, (p.deadline, tag))
        if later:
            self.batch_forwards.append((shard, frame, p))
        else:
            self._put(p)
        return p

    def _put(self, p: Pending) -> None:
        link = self.links[p.shard]
        sock = link.dom if p.domain else link.req
        try:
            sock.send_multipart([p.tag, p.frame], flags=zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: the shard is far behind; the deadline answers
            logger.warning("queue to shard %d full", p.shard)

    def _from_shard(self, link: ShardLink, sock: zmq.Socket) -> None:
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

    def _flush_batch(self) -> None:
        """Commit the index entries of this round (one fsync), then forward."""
        if self.batch_index:
            started = time.perf_counter()
            with self.env.begin(write=True, db=self.index) as txn:
                for key, vshard in self.batch_index.items():
                    txn.put(key, bytes([vshard]))
            self.m.index_commit.observe(time.perf_counter() - started)
            self.batch_index.clear()
        if self.batch_forwards:
            forwards, self.batch_forwards = self.batch_forwards, []
            for _, _, p in forwards:
                if p.tag in self.pending:
                    self._put(p)

    # -- channels ----------------------------------------------------------------

    def _from_channels(self) -> None:
        for _ in range(1000):
            try:
                if self.identity_required:
                    parts = self.intake.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    got = parts[-1].get("User-Id")  # a str: pyzmq types all properties as one
                    user = got if isinstance(got, str) else None
                    frames = [p.bytes for p in parts]
                else:
                    frames, user = self.intake.recv_multipart(flags=zmq.NOBLOCK), None
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            env, frame = tuple(frames[:-1]), frames[-1]
            try:
                self.on_request(env, frame, user)
            except Exception:
                logger.exception("front failed on a request")
                self.answer(env, errors.error_reply(errors.INTERNAL, "internal error; see "
                                                    "the service log"), None, "?")

    def answer(self, env: tuple[bytes, ...], reply: dict[str, Any], request_id: Any,
               rtype: str) -> None:
        if request_id is not None:
            reply = dict(reply, request_id=request_id)
        self.m.requests.labels(rtype, reply.get("type", "?")).inc()
        self._send_channel(env, codec.pack(reply))

    def _send_channel(self, env: tuple[bytes, ...], frame: bytes) -> None:
        try:
            self.intake.send_multipart([*env, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("front reply not delivered: %s", exc)

    def relay(self, env: tuple[bytes, ...], rtype: str, request_id: Any = None,
              check: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
              ) -> Callable[[dict[str, Any] | None, bytes | None], None]:
        """A reply handler that passes the shard's reply on unchanged (or the
        front's own ``internal`` when the shard never answered)."""
        def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            if reply is None or raw is None:
                self.answer(env, self._gave_up(rtype), request_id, rtype)
                return
            replaced = check(reply) if check is not None else None
            if replaced is not None:
                self.answer(env, replaced, request_id, rtype)
                return
            self.m.requests.labels(rtype, str(reply.get("type", "?"))).inc()
            self._send_channel(env, raw)

        return on_reply

    @staticmethod
    def _gave_up(rtype: str) -> dict[str, Any]:
        if rtype in RESEND_IDEMPOTENT:
            return errors.error_reply(errors.INTERNAL, "the shard that owns this request did "
                                      "not answer in time; nothing was acknowledged: retry "
                                      "the same request")
        return errors.error_reply(errors.INTERNAL, "the shard that owns this order did not "
                                  "answer in time: the outcome is unknown; read the order "
                                  "with get_order before asking again")

    def is_operator(self, user: str | None) -> bool:
        return not self.identity_required or is_operator_name(user)

    def denied(self, user: str | None, source: Any) -> dict[str, Any] | None:
        if self.is_operator(user) or source == user:
            return None
        return errors.error_reply(errors.UNAUTHORIZED, f"this channel is {user!r}; "
                                  f"it may not act on orders of {source!r:.100}")

    def on_request(self, env: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        try:
            req = codec.decode_map(frame) if len(frame) <= codec.MAX_FRAME_BYTES else None
        except codec.DecodeError:
            req = None
        if req is None:  # shard 0 gives exactly a single node's answer (too_large, malformed)
            self.send(0, frame, "raw", self.relay(env, "?"))
            return
        rid = req.get("request_id")
        rid = rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
        rtype = req.get("type") if isinstance(req.get("type"), str) else "?"
        if rtype in OPERATOR_ONLY and not self.is_operator(user):
            self.answer(env, errors.error_reply(errors.UNAUTHORIZED,
                                                f"{rtype} is for operators only"), rid, rtype)
        elif rtype == "submit_order":
            self.submit(env, frame, req, rid, user)
        elif rtype in BY_ORDER:
            self.by_order(env, frame, req, rid, rtype, user)
        elif rtype == "list_orders":
            self.list_orders(env, req, rid, user)
        elif rtype == "order_counts":
            self.order_counts(env, rid)
        else:  # unknown type: shard 0 answers it with the list of known types
            self.send(0, frame, "raw", self.relay(env, "unknown", rid))

    def process_of_vshard(self, vshard: int) -> int:
        return self.owner[vshard]

    # submit_order

    def submit(self, env: tuple[bytes, ...], frame: bytes, req: dict[str, Any], rid: Any,
               user: str | None) -> None:
        from oms.validation import validate_order

        order, _errs = validate_order(req.get("order"), self.engine_types)
        if order is None:  # the shard answers `rejected` with every error, as one node
            self.send(0, frame, "submit_order", self.relay(env, "submit_order", rid))
            return
        if denied := self.denied(user, order["source_system"]):
            self.answer(env, denied, rid, "submit_order")
            return
        vshard = vshard_of(order["customer"]["id"], self.vshards)
        key = ext_key(order["source_system"], order["external_id"])
        known = self.batch_index.get(key)
        if known is None:
            with self.env.begin(db=self.index) as txn:
                raw = txn.get(key)
            known = raw[0] if raw else None
        if known is not None and known != vshard:
            self._conflict(env, order, known, rid)
            return
        later = known is None or key in self.batch_index
        if known is None:
            self.batch_index[key] = vshard
        self.send(self.process_of_vshard(vshard), frame, "submit_order",
                  self.relay(env, "submit_order", rid), later=later)

    def _conflict(self, env: tuple[bytes, ...], order: dict[str, Any], vshard: int,
                  rid: Any) -> None:
        """The key is known in another virtual shard: the customer changed."""
        def found(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            view = (reply or {}).get("order") or {}
            what = f"submitted as {view['order_id']}" if view.get("order_id") else "submitted"
            self.answer(env, errors.error_reply(
                errors.CONFLICT, f"this source_system and external_id were {what} with a "
                "different payload (another customer)"), rid, "submit_order")

        ask = {"type": "get_order", "source_system": order["source_system"],
               "external_id": order["external_id"]}
        self.send(self.process_of_vshard(vshard), codec.pack(ask), "get_order", found)

    # one order: get, cancel, operator requests

    def by_order(self, env: tuple[bytes, ...], frame: bytes, req: dict[str, Any], rid: Any,
                 rtype: str, user: str | None) -> None:
        order_id = req.get("order_id")
        source, ext = req.get("source_system"), req.get("external_id")
        by_ext = (rtype in ("get_order", "cancel_order") and order_id is None
                  and isinstance(source, str) and isinstance(ext, str))
        if by_ext and (denied := self.denied(user, source)):
            self.answer(env, denied, rid, rtype)
            return
        if by_ext:
            assert isinstance(source, str) and isinstance(ext, str)  # by_ext says so
            key = ext_key(source, ext)
            if key in self.batch_index:
                raw: Any = bytes([self.batch_index[key]])
            else:
                with self.env.begin(db=self.index) as txn:
                    raw = txn.get(key)
            if raw is None:
                self.answer(env, errors.error_reply(errors.NOT_FOUND, "no order with that "
                                                    "source_system and external_id"), rid, rtype)
                return
            shard = self.process_of_vshard(raw[0])
        else:
            vshard = vshard_of_order_id(order_id, self.vshards)
            # not one of ours (or not a string): shard 0 gives a single node's answer
            shard = 0 if vshard is None else self.process_of_vshard(vshard)
        if self.is_operator(user):
            self.send(shard, frame, rtype, self.relay(env, rtype, rid))
            return
        if rtype == "get_order":
            self.send(shard, frame, rtype, self.relay(
                env, rtype, rid, check=lambda reply: self._own(user, reply)))
            return
        # cancel_order by a channel: read the order's owner first, then cancel
        ask: dict[str, Any] = {k: req[k] for k in ("order_id", "source_system", "external_id")
                               if k in req}
        ask["type"] = "get_order"

        def then(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            if reply is None:
                self.answer(env, self._gave_up("get_order"), rid, rtype)
            elif reply.get("type") != "order":
                self.answer(env, reply, rid, rtype)
            elif denied := self._own(user, reply):
                self.answer(env, denied, rid, rtype)
            else:
                self.send(shard, frame, rtype, self.relay(env, rtype, rid))

        self.send(shard, codec.pack(ask), "get_order", then)

    def _own(self, user: str | None, reply: dict[str, Any]) -> dict[str, Any] | None:
        view = reply.get("order")
        if reply.get("type") == "order" and isinstance(view, dict):
            return self.denied(user, view.get("source_system"))
        return None

    # every shard: list_orders, order_counts

    def list_orders(self, env: tuple[bytes, ...], req: dict[str, Any], rid: Any,
                    user: str | None) -> None:
        source = req.get("source_system")
        if not self.is_operator(user):
            if source is not None and (denied := self.denied(user, source)):
                self.answer(env, denied, rid, "list_orders")
                return
            req = dict(req, source_system=user)
        after = req.get("after")
        if after is None:
            cursors: dict[int, str | None] = dict.fromkeys(range(len(self.links)))
        else:
            parsed = parse_cursor(after, len(self.links))
            if parsed is None:
                self.answer(env, errors.error_reply(
                    errors.MALFORMED, "after must be a cursor string from a previous reply's "
                    "next"), rid, "list_orders")
                return
            cursors = parsed
        limit = req.get("limit", 100)
        base = {k: v for k, v in req.items() if k not in ("request_id", "after")}
        pages: dict[int, dict[str, Any]] = {}
        asked = list(cursors)
        if not asked:
            self.answer(env, {"type": "orders", "orders": [], "next": None}, rid, "list_orders")
            return

        def collect(k: int) -> Callable[[dict[str, Any] | None, bytes | None], None]:
            def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
                pages[k] = reply if reply is not None else self._gave_up("list_orders")
                if len(pages) == len(asked):
                    self.answer(env, merge_pages(pages, cursors, limit), rid, "list_orders")
            return on_reply

        for k in asked:
            sub = dict(base)
            if cursors[k] is not None:
                sub["after"] = cursors[k]
            self.send(k, codec.pack(sub), "list_orders", collect(k))

    def order_counts(self, env: tuple[bytes, ...], rid: Any) -> None:
        replies: dict[int, dict[str, Any]] = {}

        def collect(k: int) -> Callable[[dict[str, Any] | None, bytes | None], None]:
            def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
                replies[k] = reply if reply is not None else self._gave_up("order_counts")
                if len(replies) == len(self.links):
                    self.answer(env, sum_counts(list(replies.values())), rid, "order_counts")
            return on_reply

        for link in self.links:
            self.send(link.k, codec.pack({"type": "order_counts"}), "order_counts",
                      collect(link.k))

    # -- events --------------------------------------------------------------------

    def _events_from(self, sub: zmq.Socket) -> None:
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

    def _subscriptions(self) -> None:
        """XPUB with CURVE: a subscriber gets its own source_system only
        (operators: everything), whatever it asked (as actors.publisher)."""
        for _ in range(1000):
            try:
                frame = self.pub.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if frame.bytes[:1] != b"\x01":
                continue  # unsubscriptions are not honoured (as actors.publisher)
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:
                continue
            topic = b"" if is_operator_name(user) else topic_of(str(user))
            self.pub.setsockopt(zmq.SUBSCRIBE, topic)

    # -- domain events ---------------------------------------------------------------

    def _from_domains(self) -> None:
        from actors.domain_events import authorise
        from oms import edge

        for _ in range(1000):
            try:
                if self.identity_required:
                    parts = self.domain.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    got = parts[-1].get("User-Id")  # a str: pyzmq types all properties as one
                    user = got if isinstance(got, str) else None
                    frames = [p.bytes for p in parts]
                else:
                    frames, user = self.domain.recv_multipart(flags=zmq.NOBLOCK), None
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            env, frame = tuple(frames[:-1]), frames[-1]
            shard = 0  # too large, malformed: shard 0 answers as one node would
            parsed: Any = None
            if len(frame) <= edge.MAX_EVENT_BYTES:
                try:
                    parsed = edge.parse_event(codec.decode_map(frame))
                except codec.DecodeError:
                    parsed = None
            if isinstance(parsed, edge.Event):
                if user is not None and (denied := authorise(parsed, user, self.systems)):
                    self._send_domain(env, errors.error_reply(errors.UNAUTHORIZED, denied))
                    continue
                vshard = vshard_of_order_id(parsed.order_id, self.vshards)
                shard = 0 if vshard is None else self.process_of_vshard(vshard)

            def on_reply(reply: dict[str, Any] | None, raw: bytes | None,
                         env: tuple[bytes, ...] = env) -> None:
                if raw is None:
                    self._send_domain(env, errors.error_reply(
                        errors.INTERNAL, "the event could not be recorded; send it again"))
                else:
                    self._send_domain_raw(env, raw)

            self.send(shard, frame, "event", on_reply, domain=True)

    def _send_domain(self, env: tuple[bytes, ...], reply: dict[str, Any]) -> None:
        self._send_domain_raw(env, codec.pack(reply))

    def _send_domain_raw(self, env: tuple[bytes, ...], frame: bytes) -> None:
        try:
            self.domain.send_multipart([*env, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("domain event answer not delivered: %s", exc)


class Subscribers:
    """At most ``max_subscribers`` connections to the events endpoint; more are
    shut down as soon as they are accepted (as ``actors.publisher`` does)."""

    def __init__(self, monitor: zmq.Socket, limit: int, metrics: FrontMetrics) -> None:
        self.monitor, self.limit, self.m = monitor, limit, metrics
        self.live: set[int] = set()
        self.refused: set[int] = set()
        self.port: int | None = None
        self.m.subscribers.set(0)

    def on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        events = []
        for _ in range(1000):
            try:
                events.append(recv_monitor_message(self.monitor, flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        closes = {e["value"]: i for i, e in enumerate(events)
                  if e["event"] == zmq.EVENT_DISCONNECTED}
        for i, ev in enumerate(events):
            fd = ev["value"]
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self.live.add(fd)
                if len(self.live - self.refused) > self.limit and closes.get(fd, -1) < i:
                    self._refuse(fd)
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.live.discard(fd)
                self.refused.discard(fd)
        self.m.subscribers.set(len(self.live - self.refused))

    def _refuse(self, fd: int) -> None:
        import socket

        self.m.subscribers_refused.inc()
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            return
        try:  # still ours? (a closed connection's fd number may be reused)
            if self.port is None or conn.getsockname()[1] == self.port:
                conn.shutdown(socket.SHUT_RDWR)
                self.refused.add(fd)
        except (OSError, IndexError, TypeError):
            pass
        finally:
            conn.detach()  # ZeroMQ owns the fd
        logger.warning("events subscriber refused: %d connected already (max_subscribers)",
                       self.limit)


class EventsProxy:
    """CURVE off: the shards' events reach the subscribers through
    ``zmq.proxy`` (XSUB connected to every shard, the front's XPUB), in a
    thread of its own that runs in C without the GIL. Subscriptions travel
    upstream, so each shard sends only what someone subscribed to."""

    _ids = itertools.count(1)

    def __init__(self, ctx: zmq.Context, pub: zmq.Socket, endpoints: list[str]) -> None:
        self.ctx, self.pub = ctx, pub
        self.thread: threading.Thread | None = None
        self.start(endpoints)

    def start(self, endpoints: list[str]) -> None:
        address = f"inproc://events-proxy-{next(self._ids)}"
        self.control = self.ctx.socket(zmq.PAIR)
        self.control.bind(address)
        xsub = self.ctx.socket(zmq.XSUB)
        for name, value in (("LINGER", 0), ("RCVHWM", 100_000), ("RECONNECT_IVL", 100),
                            ("RECONNECT_IVL_MAX", 1000)):
            xsub.setsockopt(getattr(zmq, name), value)
        for endpoint in endpoints:
            xsub.connect(endpoint)
        peer = self.ctx.socket(zmq.PAIR)
        peer.connect(address)

        def run() -> None:
            try:
                zmq.proxy_steerable(xsub, self.pub, None, peer)
            except zmq.ZMQError as exc:  # the context ended under it
                logger.info("events proxy ended: %s", exc)
            finally:
                xsub.close(0)
                peer.close(0)

        self.thread = threading.Thread(target=run, name="events-proxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.control.send(b"TERMINATE")
            self.thread.join(5)
            self.control.close(0)
            self.thread = None

    def restart(self, endpoints: list[str]) -> None:
        self.stop()
        self.start(endpoints)


# -- list_orders merging ---------------------------------------------------------------


def make_cursor(cursors: dict[int, str | None]) -> str | None:
    """One opaque string: shard -> its own cursor (None: from the newest); a
    shard that is done is left out; nil when every shard is done."""
    if not cursors:
        return None
    packed = codec.pack({str(k): v for k, v in sorted(cursors.items())})
    return CURSOR_PREFIX + base64.urlsafe_b64encode(packed).decode()


def parse_cursor(value: Any, shards: int) -> dict[int, str | None] | None:
    if not isinstance(value, str) or not value.startswith(CURSOR_PREFIX) or len(value) > 8000:
        return None
    try:
        raw = codec.unpack(base64.urlsafe_b64decode(value[len(CURSOR_PREFIX):]))
        out = {int(k): v for k, v in raw.items()}
    except Exception:  # noqa: BLE001 - any undecodable cursor is a bad cursor
        return None
    if any(not 0 <= k < shards or not (v is None or isinstance(v, str)) for k, v in
           out.items()):
        return None
    return out


def merge_pages(pages: dict[int, dict[str, Any]], cursors: dict[int, str | None],
                limit: int) -> dict[str, Any]:
    """Newest first over every shard's page; each shard's cursor moves past
    exactly what was returned from it."""
    for reply in pages.values():
        if reply.get("type") != "orders":
            return reply  # an error (the same from every shard for a bad filter)
    heads = {k: list(reply.get("orders") or []) for k, reply in pages.items()}
    taken: dict[int, int] = dict.fromkeys(heads, 0)
    out: list[dict[str, Any]] = []
    while len(out) < limit:
        best, best_key = None, None
        for k, orders in heads.items():
            if taken[k] < len(orders):
                o = orders[taken[k]]
                key = (o.get("created_ts") or 0.0, str(o.get("order_id")))
                if best_key is None or key > best_key:
                    best, best_key = k, key
        if best is None:
            break
        out.append(heads[best][taken[best]])
        taken[best] += 1
    following: dict[int, str | None] = {}
    for k, orders in heads.items():
        if taken[k] == len(orders):
            nxt = pages[k].get("next")
            if nxt is not None:
                following[k] = nxt
        else:
            following[k] = orders[taken[k] - 1]["order_id"] if taken[k] else cursors[k]
    return {"type": "orders", "orders": out, "next": make_cursor(following)}


def sum_counts(replies: list[dict[str, Any]]) -> dict[str, Any]:
    for reply in replies:
        if reply.get("type") != "order_counts":
            return reply
    counts: dict[str, int] = {}
    for reply in replies:
        for state, n in (reply.get("counts") or {}).items():
            counts[state] = counts.get(state, 0) + int(n)
    return {"type": "order_counts", "counts": counts,
            "in_flight": sum(int(r.get("in_flight") or 0) for r in replies),
            "live_actors": sum(int(r.get("live_actors") or 0) for r in replies)}


def main(argv: list[str] | None = None) -> int:
    from actors import logs

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m shards.front CONFIG.json", file=sys.stderr)
        return 2
    cfg = FrontConfig.read(args[0])
    logs.setup(cfg.log_level, cfg.log_format)
    front = Front(cfg, args[0])
    try:
        front.open()
    except Exception as exc:  # noqa: BLE001 - any start failure is reported and exits 2
        print(f"oms front: cannot start: {exc}", file=sys.stderr)
        return 2
    ready = Path(cfg.data) / "front" / "ready"
    ready.write_text(f"pid {os.getpid()}\n")  # the supervisor waits for it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: front.stop_flag.set())
    signal.signal(signal.SIGHUP, lambda *_: front.reload_flag.set())
    try:
        front.run()
    finally:
        ready.unlink(missing_ok=True)
        front.close()
    logger.info("front stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
