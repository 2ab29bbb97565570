"""Reference domain systems (``oms simulate``), speaking contract §3 exactly.

One process, one thread, one ROUTER per system (warehouse, billing,
shipping, crm, provisioning) and a DEALER that pushes events to the
service's domain-events endpoint, resending each until it is acknowledged.

Each ``command_id`` is applied at most once: a repeat is answered with the
first answer. A *retryable* failure (``unavailable``) is not an answer in
that sense: nothing was applied, so a retry may succeed.

Besides commands, every system's ROUTER answers ``{type: "control", fail:
{op: [rate, code]}}`` (change failure injection while running; rate 0 stops
it) and ``{type: "report"}`` with
what it applied: a count per op, the number of repeats answered from the
cache, operations applied twice for the same order and arguments (there
should be none), and, with ``order_id``, that order's operations.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import signal
import time
from typing import Any

import zmq

from gateways.sim_domain import Domain, SimConfig, error_result
from oms import codec

logger = logging.getLogger(__name__)


class Simulator:
    """The sockets around ``Domain``: a single-threaded poll loop."""

    def __init__(self, cfg: SimConfig, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.domain = Domain(cfg)
        self.ctx = ctx or zmq.Context.instance()
        self.routers: dict[zmq.Socket, str] = {}
        self.replies: list[tuple[float, int, zmq.Socket, list[bytes]]] = []
        self.unacked: dict[str, tuple[float, dict[str, Any]]] = {}
        self.seq = itertools.count()
        self.stopped = False

    def bind(self) -> None:
        curve = self.cfg.curve
        if curve.get("clients_dir"):
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=curve["clients_dir"])
        for system, endpoint in self.cfg.systems.items():
            sock = self.ctx.socket(zmq.ROUTER)
            if curve.get("server"):
                sock.curve_server = True
                sock.curve_secretkey, sock.curve_publickey = curve["secret"], curve["public"]
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.bind(endpoint)
            self.routers[sock] = system
        self.events = self.ctx.socket(zmq.DEALER)
        self.events.setsockopt(zmq.LINGER, 0)
        if curve.get("service_key"):
            self.events.curve_serverkey = curve["service_key"]
            self.events.curve_secretkey, self.events.curve_publickey = (curve["secret"],
                                                                       curve["public"])
        self.events.connect(self.cfg.service_events)

    def run(self) -> None:
        self.bind()
        poller = zmq.Poller()
        for sock in self.routers:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        try:
            while not self.stopped:
                ready = dict(poller.poll(int(self._timeout())))  # pyzmq truncates anyway
                now = time.time()
                for sock, system in self.routers.items():
                    if sock in ready:
                        self._read(sock, system, now)
                if self.events in ready:
                    self._read_acks()
                self._flush(time.time())
        finally:
            for sock in [*self.routers, self.events]:
                sock.close(0)
            if getattr(self, "auth", None) is not None:
                self.auth.stop()

    def _timeout(self) -> float:
        due = [r[0] for r in self.replies[:1]] + [e[0] for e in self.domain.events[:1]]
        due += [t for t, _ in self.unacked.values()]
        if not due:
            return 200.0
        return max(0.0, min(200.0, (min(due) - time.time()) * 1000))

    def _read(self, sock: zmq.Socket, system: str, now: float) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = codec.decode_map(frames[-1])
            except codec.DecodeError as exc:
                self._send(sock, [*frames[:-1], codec.pack(
                    {"type": "error", "code": "malformed", "message": str(exc)})])
                continue
            if msg.get("type") == "control":  # change failure injection while running
                fail = given if isinstance(given := msg.get("fail"), dict) else {}
                for op, spec in fail.items():
                    rate, code = (spec + [None])[:2] if isinstance(spec, list) else (0, None)
                    if rate:
                        self.cfg.fail[op] = (float(rate), str(code or "unavailable"))
                    else:
                        self.cfg.fail.pop(op, None)
                self._send(sock, [*frames[:-1], codec.pack({"type": "control_ok"})])
                continue
            if msg.get("type") == "report":
                order_id = msg.get("order_id") if isinstance(msg.get("order_id"), str) else None
                scope = None if msg.get("all") else system
                reply: dict[str, Any] | None = self.domain.report(scope, order_id)
                if msg.get("per_order"):
                    reply["per_order"] = self.domain.per_order_report()  # type: ignore[index]
                self._send(sock, [*frames[:-1], codec.pack(reply)])
                continue
            try:
                reply = self.domain.handle(system, msg, now)
            except Exception as exc:  # one bad command must not end every system
                logger.exception("%s: command could not be handled", system)
                cid = msg.get("command_id")
                reply = error_result(cid if isinstance(cid, str) else "", "invalid_command",
                               f"the simulator could not handle it: {type(exc).__name__}",
                               False)
            if reply is None:
                continue
            due = now + self.cfg.latency_ms / 1000
            heapq.heappush(self.replies, (due, next(self.seq), sock,
                                          [*frames[:-1], codec.pack(reply)]))

    def _read_acks(self) -> None:
        while True:
            try:
                msg = codec.decode_map(self.events.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            except codec.DecodeError:
                continue
            if msg.get("type") == "ack":
                self.unacked.pop(str(msg.get("event_id")), None)

    def _flush(self, now: float) -> None:
        while self.replies and self.replies[0][0] <= now:
            _due, _seq, sock, frames = heapq.heappop(self.replies)
            self._send(sock, frames)
        while self.domain.events and self.domain.events[0][0] <= now:
            _due, _n, ev = heapq.heappop(self.domain.events)
            self.unacked[ev["event_id"]] = (now, ev)
        for event_id, (due, ev) in list(self.unacked.items()):
            if due <= now:
                try:
                    self.events.send(codec.pack(ev), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self.unacked[event_id] = (now + self.cfg.event_resend_s, ev)

    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the service is gone or slow; it retries under the same command_id

    def stop(self, *_: Any) -> None:
        self.stopped = True


def run_simulator(cfg: SimConfig) -> None:
    sim = Simulator(cfg)
    signal.signal(signal.SIGTERM, sim.stop)
    signal.signal(signal.SIGINT, sim.stop)
    logger.info("simulating %s", ", ".join(f"{k}={v}" for k, v in cfg.systems.items()))
    sim.run()
