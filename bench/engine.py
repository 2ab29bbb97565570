"""The ``engine`` scenario: what one step costs the pure engine, and what a
snapshot costs to encode, in-process with no I/O (time.perf_counter).

A warm-up pass over a tenth of the orders, then ``ROUNDS`` timed passes over
all of them; the figures are each pass's, reported as min / median / max
(the median in the headline fields), as a shared machine makes single passes
noisy."""

from __future__ import annotations

import statistics
import time
from typing import Any

from oms import snapshot
from oms.engine import Engine, new_order
from oms.messages import CommandResult, DomainEvent, Send, Start
from oms.process import ProcessDef, builtin_processes
from oms.sample import sample_orders
from oms.validation import validate_order

ROUNDS = 5
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


def _pass(engine: Engine, proc: ProcessDef, orders: list[dict[str, Any]]) -> dict[str, Any]:
    """Every order from start to completed: seconds in the engine and in
    snapshot encoding, and the messages handled."""
    handled = 0
    encode_s = handle_s = 0.0
    started = time.perf_counter()
    for n, req in enumerate(orders):
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
    return {"messages": handled, "handle_s": handle_s, "encode_s": encode_s,
            "seconds": time.perf_counter() - started}


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_engine(count: int, rounds: int = ROUNDS) -> dict[str, Any]:
    proc = builtin_processes()["retail"]
    engine = Engine(proc)
    raws = list(sample_orders(count, seed=1, source="bench", prefix="ENG-"))
    orders = [_valid(r) for r in raws]
    _pass(engine, proc, orders[: max(1, count // 10)])  # warm-up
    passes = [_pass(engine, proc, orders) for _ in range(rounds)]
    per_order = _spread([p["handle_s"] / count * 1e6 for p in passes])
    handled = passes[0]["messages"]
    total = statistics.median(p["seconds"] for p in passes)
    return {"orders": count, "messages": handled, "orders_per_s": count / total,
            "rounds": rounds, "us_per_order_engine_spread": per_order,
            "us_per_message": per_order["median"] * count / handled,
            "us_per_snapshot_encode": statistics.median(
                p["encode_s"] / handled * 1e6 for p in passes),
            "us_per_order_engine": per_order["median"], "seconds": total,
            "mode": "in-process, no I/O"}
