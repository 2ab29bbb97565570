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

import hashlib
import heapq
import itertools
import json
import logging
import random
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import zmq

from oms import codec
from oms.config import DEFAULT_SYSTEMS

logger = logging.getLogger(__name__)

RETRYABLE = {"unavailable", "timeout"}


@dataclass
class SimConfig:
    """Behaviour of the simulated systems.

    latency_ms: delay before every reply.
    stock: initial units of every product (per product).
    stock_of: initial units of particular products, overriding ``stock``.
    restock_s: delay before a back-ordered reservation is filled
      (``stock_reserved`` event).
    delivery_s: delay from ``create_shipment`` to ``shipment_delivered``.
    fail: op -> (probability, error code) of failing a command.
    drop: op -> probability of applying a command but not replying.
    """

    systems: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYSTEMS))
    service_events: str = "tcp://127.0.0.1:5557"
    latency_ms: float = 0.0
    stock: int = 1_000_000
    stock_of: dict[str, int] = field(default_factory=dict)
    restock_s: float = 1.0
    delivery_s: float = 0.5
    fail: dict[str, tuple[float, str]] = field(default_factory=dict)
    drop: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    event_resend_s: float = 1.0
    curve: dict[str, Any] = field(default_factory=dict)  # see oms.cli cmd_simulate


class Domain:
    """The systems' business state and rules. No sockets: pure enough to test."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ids = itertools.count(1)
        self.stock: dict[str, int] = defaultdict(lambda: cfg.stock)
        self.stock.update(cfg.stock_of)
        self.reservations: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.applied: dict[str, dict[str, Any]] = {}  # command_id -> first reply
        self.counts: Counter[str] = Counter()
        self.repeats: Counter[str] = Counter()
        self.per_order: dict[str, Counter[str]] = defaultdict(Counter)
        self.results: dict[str, dict[str, Any]] = defaultdict(dict)  # order -> op -> data
        self.fingerprints: Counter[tuple[str, str, bytes]] = Counter()
        self.events: list[tuple[float, int, dict[str, Any]]] = []  # (due, n, event) to push

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def handle(self, system: str, cmd: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The reply to a command, or None to drop it (no reply)."""
        command_id = cmd.get("command_id")
        if not isinstance(command_id, str):
            return {"type": "result", "command_id": command_id, "ok": False,
                    "error": {"code": "invalid_command", "message": "command_id must be a "
                              "string", "retryable": False}}
        if command_id in self.applied:
            self.repeats[system] += 1
            return self.applied[command_id]
        op, args = cmd.get("op"), cmd.get("args") or {}
        order_id = str(cmd.get("order_id", ""))
        fail = self.cfg.fail.get(str(op))
        if fail and self.rng.random() < fail[0]:
            code = fail[1]
            reply = _error(command_id, code, f"simulated {code}", code in RETRYABLE)
            if code in RETRYABLE:
                return reply  # not applied: a retry may succeed
        else:
            try:
                data = self.apply(system, op, args, order_id, now)
            except SimError as exc:
                reply = _error(command_id, exc.code, str(exc), False)
            else:
                reply = {"type": "result", "command_id": command_id, "ok": True, "data": data}
                self.results[order_id].setdefault(str(op), data)
        self.applied[command_id] = reply
        self.counts[f"{system}.{op}"] += 1
        self.per_order[order_id][str(op)] += 1
        self.fingerprints[(order_id, str(op), _fingerprint(args))] += 1
        if self.rng.random() < self.cfg.drop.get(str(op), 0.0):
            return None
        return reply

    def apply(self, system: str, op: Any, args: dict[str, Any], order_id: str,
              now: float) -> dict[str, Any]:
        handler = getattr(self, f"op_{system}_{op}", None)
        if handler is None:
            raise SimError("unknown_op", f"{system} has no op {op!r}")
        return handler(args, order_id, now)

    def event(self, due: float, system: str, order_id: str, name: str,
              data: dict[str, Any]) -> None:
        ev = {"type": "event", "event_id": self.new_id(f"{system}-ev"), "system": system,
              "order_id": order_id, "name": name, "data": data}
        heapq.heappush(self.events, (due, next(self.ids), ev))

    # -- warehouse ---------------------------------------------------------

    def op_warehouse_reserve_stock(self, args: dict, order_id: str, now: float) -> dict:
        items = [(str(i.get("product_id")), int(i.get("quantity", 1)))
                 for i in args.get("items") or [] if isinstance(i, dict)]
        rid = self.new_id("res")
        if all(self.stock[p] >= q for p, q in items):
            for p, q in items:
                self.stock[p] -= q
            self.reservations[rid] = {"items": items, "status": "reserved"}
            return {"reservation_id": rid, "status": "reserved"}
        self.reservations[rid] = {"items": items, "status": "backordered"}
        self.event(now + self.cfg.restock_s, "warehouse", order_id, "stock_reserved",
                   {"reservation_id": rid})
        return {"reservation_id": rid, "status": "backordered"}

    def op_warehouse_release_stock(self, args: dict, order_id: str, now: float) -> dict:
        res = self.reservations.get(str(args.get("reservation_id")))
        if res is None:
            raise SimError("unknown_reservation", "no such reservation")
        if res["status"] == "reserved":
            for p, q in res["items"]:
                self.stock[p] += q
        res["status"] = "released"
        return {}

    def op_warehouse_receive_return(self, args: dict, order_id: str, now: float) -> dict:
        return {"receipt_id": self.new_id("rcpt")}

    def op_warehouse_restock(self, args: dict, order_id: str, now: float) -> dict:
        return {}

    # -- billing -----------------------------------------------------------

    def op_billing_create_invoice(self, args: dict, order_id: str, now: float) -> dict:
        return {"invoice_id": self.new_id("inv")}

    def op_billing_void_invoice(self, args: dict, order_id: str, now: float) -> dict:
        return {}

    def op_billing_capture_payment(self, args: dict, order_id: str, now: float) -> dict:
        return {"payment_id": self.new_id("pay")}

    def op_billing_refund_payment(self, args: dict, order_id: str, now: float) -> dict:
        return {}

    # -- shipping ----------------------------------------------------------

    def op_shipping_create_shipment(self, args: dict, order_id: str, now: float) -> dict:
        sid = self.new_id("shp")
        self.event(now + self.cfg.delivery_s, "shipping", order_id, "shipment_delivered",
                   {"shipment_id": sid})
        return {"shipment_id": sid, "tracking_number": f"TRK{next(self.ids):09d}"}

    def op_shipping_cancel_shipment(self, args: dict, order_id: str, now: float) -> dict:
        return {}

    # -- crm ---------------------------------------------------------------

    def op_crm_notify(self, args: dict, order_id: str, now: float) -> dict:
        return {}

    # -- provisioning ------------------------------------------------------

    def op_provisioning_activate_service(self, args: dict, order_id: str, now: float) -> dict:
        sid = str(args.get("service_id") or self.new_id("svc"))
        self.services[sid] = {"product_id": args.get("product_id"),
                              "attributes": args.get("attributes") or {}}
        return {"service_id": sid}

    def op_provisioning_modify_service(self, args: dict, order_id: str, now: float) -> dict:
        svc = self._service(args)
        previous = svc["attributes"]
        svc["attributes"] = args.get("attributes") or {}
        return {"previous_attributes": previous}

    def op_provisioning_deactivate_service(self, args: dict, order_id: str,
                                           now: float) -> dict:
        svc = self._service(args)
        del self.services[str(args["service_id"])]
        return {"product_id": svc["product_id"], "attributes": svc["attributes"]}

    def _service(self, args: dict) -> dict[str, Any]:
        sid = str(args.get("service_id"))
        if sid not in self.services:
            if sid.startswith("svc-existing"):  # services that exist before any order
                self.services[sid] = {"product_id": "legacy", "attributes": {}}
            else:
                raise SimError("unknown_service", f"no service {sid!r}")
        return self.services[sid]

    # -- reports -----------------------------------------------------------

    def report(self, system: str | None, order_id: str | None) -> dict[str, Any]:
        prefix = f"{system}." if system else ""
        out: dict[str, Any] = {
            "type": "report",
            "counts": {k: v for k, v in self.counts.items() if k.startswith(prefix)},
            "repeats": sum(self.repeats.values()),
            "applied_twice": [
                {"order_id": o, "op": op, "times": n}
                for (o, op, _d), n in self.fingerprints.items() if n > 1
            ],
        }
        if order_id is not None:
            out["order"] = dict(self.per_order.get(order_id, {}))
            out["results"] = self.results.get(order_id, {})
        return out

    def per_order_report(self) -> dict[str, Any]:
        return {o: {"ops": dict(c), "results": self.results.get(o, {})}
                for o, c in self.per_order.items()}


def _fingerprint(args: Any) -> bytes:
    """The same for equal args whatever their key order (an op applied twice
    shows up as one fingerprint counted twice). JSON with sorted keys is
    encoded in C: a third of the cost of ``codec.digest``, which dominated
    the simulator's profile."""
    text = json.dumps(args, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class SimError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error(command_id: str, code: str, message: str, retryable: bool) -> dict[str, Any]:
    return {"type": "result", "command_id": command_id, "ok": False,
            "error": {"code": code, "message": message, "retryable": retryable}}


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
                reply = _error(cid if isinstance(cid, str) else "", "invalid_command",
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
