"""Level 3: ``oms serve`` and ``oms simulate`` as real processes."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, sim_report
from helpers import poll_until

from gateways.client import Client, wait_terminal
from oms.sample import sample_orders

RETAIL_OPS = ("reserve_stock", "create_invoice", "capture_payment", "create_shipment")
pytestmark = pytest.mark.slow


def _start(procs: Any, eps: Endpoints, data: Path, sim_extra: list[str]) -> tuple[Any, Any]:
    sim = procs(eps.simulate_args() + sim_extra, "simulate")
    svc = procs(eps.serve_args(data), "serve")
    return sim, svc


def test_thousand_orders_flow_exactly_once(procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    data = tmp_path / "data"
    _sim, svc = _start(procs, eps, data, [
        "--delivery-s", "0.2", "--restock-s", "0.5", "--scarce", "40", "--seed", "3",
        "--fail", "capture_payment=0.05:payment_declined"])
    orders = list(sample_orders(1000, seed=11, source="web", prefix="E2E-",
                                scarce_ratio=0.1))
    with Client(eps.intake, timeout=30) as client:
        client.wait_ready(30)
        started = time.monotonic()
        replies = [r for _q, r in client.pipeline(
            {"type": "submit_order", "order": o} for o in orders)]
        assert [r["type"] for r in replies] == ["accepted"] * 1000
        ids = [r["order_id"] for r in replies]
        views = wait_terminal(client, ids, timeout=240)
        elapsed = time.monotonic() - started
        print(f"\n1000 orders end to end in {elapsed:.2f} s: {1000 / elapsed:.0f} orders/s")

    states = Counter(v["state"] for v in views.values())
    assert set(states) <= {"completed", "failed"}
    assert states["completed"] > 800 and states["failed"] > 0
    assert any(h["state"] == "held" for v in views.values() for h in v["history"])

    report = sim_report(eps.systems["warehouse"], all=True, per_order=True)
    assert report["applied_twice"] == []
    per_order = report["per_order"]
    for oid, view in views.items():
        ops, results = per_order[oid]["ops"], per_order[oid]["results"]
        summary = view["summary"]
        if view["state"] == "completed":
            assert all(ops.get(op) == 1 for op in RETAIL_OPS), (oid, ops)
            assert summary["results"] == {
                "reservation_id": results["reserve_stock"]["reservation_id"],
                "invoice_id": results["create_invoice"]["invoice_id"],
                "payment_id": results["capture_payment"]["payment_id"],
                "shipment_id": results["create_shipment"]["shipment_id"],
                "tracking_number": results["create_shipment"]["tracking_number"],
            }
            assert "release_stock" not in ops
        else:  # declined: invoice voided, stock released, each once; nothing shipped
            assert view["state_reason"] == "payment_declined"
            assert (ops.get("void_invoice"), ops.get("release_stock")) == (1, 1), ops
            assert "create_shipment" not in ops
        assert ops["notify"] >= 2

    # graceful stop, restart on the same data: resubmissions are duplicates
    assert svc.terminate() == 0
    assert "Traceback" not in svc.log.read_text()
    svc2 = procs(eps.serve_args(data), "serve2")
    with Client(eps.intake, timeout=30) as client:
        client.wait_ready(30)
        again = [r for _q, r in client.pipeline(
            {"type": "submit_order", "order": o} for o in orders[:200])]
    assert [r["order_id"] for r in again] == ids[:200]
    assert all(r["duplicate"] for r in again)
    assert svc2.terminate() == 0


def test_waiting_orders_cost_no_threads(procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    _sim, svc = _start(procs, eps, tmp_path / "data", ["--delivery-s", "3600"])
    with Client(eps.intake, timeout=30) as client:
        client.wait_ready(30)
        idle_threads = svc.threads()
        ids = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": o}
            for o in sample_orders(2000, seed=5, source="web", prefix="W-"))]

        def all_waiting() -> bool:
            page = client.request({"type": "list_orders", "state": "inProgress",
                                   "limit": 1000})
            views = [client.get(i)["order"] for i in ids[-20:]]
            return len(page["orders"]) == 1000 and all(
                s["status"] == "running" for v in views for s in v["steps"]
                if s["name"] == "await_delivery")

        poll_until(all_waiting, timeout=120, every=0.2)
        assert svc.threads() == idle_threads < 40
        print(f"\n2000 orders waiting for delivery: {svc.threads()} threads, "
              f"{svc.rss_mb():.0f} MB RSS")
    assert svc.terminate() == 0
