"""The simulated domain systems' business state and rules (``Domain``) and
their settings (``SimConfig``): no sockets. ``gateways.simulator`` runs them
behind one ROUTER per system.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from oms.config import DEFAULT_SYSTEMS

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
    curve: dict[str, Any] = field(default_factory=dict)  # see app.cli cmd_simulate


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
            reply = error_result(command_id, code, f"simulated {code}", code in RETRYABLE)
            if code in RETRYABLE:
                return reply  # not applied: a retry may succeed
        else:
            try:
                data = self.apply(system, op, args, order_id, now)
            except SimError as exc:
                reply = error_result(command_id, exc.code, str(exc), False)
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


def error_result(command_id: str, code: str, message: str, retryable: bool) -> dict[str, Any]:
    return {"type": "result", "command_id": command_id, "ok": False,
            "error": {"code": code, "message": message, "retryable": retryable}}
