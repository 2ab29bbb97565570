"""Hostile review 10 (b): kill -9 in the middle of compensation and of
sequencing, while channels cancel and operators abort orders. Real
processes (the service, the simulators), loopback only, bounded."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, sim_report
from test_chaos import (
    Killer,
    chaos_orders,
    chaos_service,
    stuck_summary,
    submit_until_acked,
    wait_all_terminal,
)

from bench.faults import sequencing_overlaps
from gateways.client import Client

pytestmark = pytest.mark.slow
UNDO = {"reserve_stock": "release_stock", "create_invoice": "void_invoice",
        "capture_payment": "refund_payment"}


class Meddler(threading.Thread):
    """While the service is killed and restarted: cancels orders in progress
    or waiting for their turn, aborts held ones (awaiting stock) and half the
    running or waiting telecom ones, each once;
    a request the kill cut off is simply lost (its order is asked no more)."""

    def __init__(self, intake: str, order_ids: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.intake, self.order_ids = intake, order_ids
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self.asked: dict[str, str] = {}
        self.answers: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                with Client(self.intake, timeout=2) as client:
                    while not self.stopped.is_set():
                        self.meddle(client)
            except TimeoutError:
                continue  # killed under us: connect again

    def meddle(self, client: Client) -> None:
        oid = self.rng.choice(self.order_ids)
        if oid in self.asked:
            return
        view = client.get(oid).get("order") or {}
        state, reason = view.get("state"), view.get("state_reason")
        if state in ("inProgress", "pending") and reason != "compensating" and (
                view.get("order_type") != "telecom" or self.rng.random() < 0.5):
            self.asked[oid] = "cancel"
            reply = client.cancel(oid, "review10")
        elif state == "held" or (state in ("inProgress", "pending")
                                 and reason != "compensating"):  # telecom: abort half
            self.asked[oid] = "abort"
            reply = client.request({"type": "abort_order", "order_id": oid,
                                    "operator": "rev10", "reason": "review10"})
        else:
            return
        self.answers[f"{self.asked[oid]}:{reply['type']}"] += 1


def test_kill_9_during_cancels_aborts_and_compensation_undoes_each_step_once(
        procs: Any, tmp_path: Path) -> None:
    """Five kill -9 rounds while orders are cancelled (in progress, or
    waiting for their customer's turn) and aborted (held for stock): every
    acknowledged order ends terminal; nothing is applied twice; a cancelled
    or failed retail order has each step it completed undone exactly once
    and a completed one none; sequencing held."""
    eps = Endpoints()
    procs(eps.simulate_args() + [
        "--delivery-s", "0.5", "--restock-s", "1.5", "--scarce", "30", "--seed", "7",
        "--drop", "reserve_stock=0.03", "--drop", "create_invoice=0.03",
        "--drop", "void_invoice=0.05", "--drop", "release_stock=0.05",
        "--drop", "refund_payment=0.05", "--drop", "deactivate_service=0.05",
        "--latency-ms", "20", "--fail", "capture_payment=0.08:payment_declined",
        "--fail", "refund_payment=0.05:unavailable",
        "--fail", "activate_service=0.03:unavailable"], "simulate")
    orders = chaos_orders(600, customers=4, seed=33)
    # (the Killer's first start: before the orders)
    killer = Killer(chaos_service(procs, eps, tmp_path), kills=5, seed=11)
    acked = submit_until_acked(eps, orders, time.monotonic() + 60)
    assert len(acked) == len(orders)
    meddler = Meddler(eps.intake, list(acked.values()), seed=3)
    meddler.start()
    killer.start()  # the kills while orders run, compensate and are meddled with
    killer.join(60)
    meddler.stopped.set()
    meddler.join(30)
    assert killer.done == 5
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views, stuck = wait_all_terminal(client, list(acked.values()), timeout=60)
    report = sim_report(eps.systems["warehouse"], all=True, per_order=True)
    print(f"\nrev10 chaos: {killer.done} kills, {len(acked)} orders, asked "
          f"{dict(meddler.answers)}, states {Counter(v['state'] for v in views.values())}")
    customer_of = {acked[o["external_id"]]: o["customer"]["id"] for o in orders}
    assert not stuck, stuck_summary(stuck) + f"; asked {[meddler.asked.get(o) for o in stuck]}"
    assert report["applied_twice"] == []
    assert sum(n for k, n in meddler.answers.items() if k.endswith("accepted")) >= 20
    wrong = []
    for oid, view in views.items():
        if view["order_type"] != "retail":
            continue
        done = report["per_order"].get(oid, {})
        ops, results = done.get("ops", {}), done.get("results", {})
        for forward, undo in UNDO.items():
            owed = 1 if (forward in results and view["state"] in ("cancelled", "failed")) else 0
            if ops.get(forward, 0) > 1 or ops.get(undo, 0) != owed:
                wrong.append((oid, view["state"], meddler.asked.get(oid), ops))
                break
    assert wrong == [], wrong[:5]
    assert sequencing_overlaps(views, customer_of) == []
    assert killer.service.terminate() == 0
