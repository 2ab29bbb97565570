"""The ``engine`` scenario: what one step costs the pure engine, and what a
snapshot costs to encode, in-process with no I/O (time.perf_counter)."""

from __future__ import annotations

import time
from typing import Any

from oms import snapshot
from oms.engine import Engine, new_order
from oms.messages import CommandResult, DomainEvent, Send, Start
from oms.process import builtin_processes
from oms.sample import sample_orders
from oms.validation import validate_order

DATA = {
    "reserve_stock": {"reservation_id": "r", "status": "reserved"},
    "create_invoice": {"invoice_id": "i"}, "capture_payment": {"payment_id": "p"},
    "create_shipment": {"shipment_id": "s", "tracking_number": "t"},
}


def _valid(raw: dict[str, Any]) -> dict[str, Any]:
    order, problems = validate_order(raw, ["retail"])
    if order is None:
        raise ValueError(f"a sample order is invalid: {problems}")
    return order


def run_engine(count: int) -> dict[str, Any]:
    proc = builtin_processes()["retail"]
    engine = Engine(proc)
    raws = list(sample_orders(count, seed=1, source="bench", prefix="ENG-"))
    orders = [_valid(r) for r in raws]
    for warm in (True, False):
        handled = 0
        encode_s = handle_s = 0.0
        started = time.perf_counter()
        for n, req in enumerate(orders[: max(1, count // 10)] if warm else orders):
            order = new_order(f"O{n:012d}", req, proc, 1.0)
            queue: list[Any] = [Start()]
            while queue:
                msg = queue.pop()
                t0 = time.perf_counter()
                turning = engine.handle(order, msg, 2.0)
                t1 = time.perf_counter()
                snapshot.encode(order)
                encode_s += time.perf_counter() - t1
                handle_s += t1 - t0
                handled += 1
                for fx in turning.effects:
                    if isinstance(fx, Send):
                        queue.append(CommandResult(fx.command_id, True, DATA.get(fx.op, {})))
                if order.steps["await_delivery"].wait and not queue:
                    queue.append(DomainEvent("e", "shipping", "shipment_delivered", {}))
        total = time.perf_counter() - started
    return {"orders": count, "messages": handled, "orders_per_s": count / total,
            "us_per_message": handle_s / handled * 1e6,
            "us_per_snapshot_encode": encode_s / handled * 1e6,
            "us_per_order_engine": handle_s / count * 1e6, "seconds": total,
            "mode": "in-process, no I/O"}
