"""Operator actions racing the process, over real sockets: retry, skip,
abort and cancel sent together, pipelined, while the retried step's reply is
on its way. Every request gets an answer, every order ends terminal, the
service stays ready, no component dies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_operations import control, fallout_orders, hold_policy

from gateways.client import Client, wait_terminal


def test_retry_skip_abort_cancel_racing_each_other_and_a_reply(
        make_service: Any, sim: Any, eps: Any, tmp_path: Path) -> None:
    svc = make_service(processes=hold_policy(tmp_path / "procs"))
    control(eps.systems["billing"], capture_payment=[1.0, "payment_declined"])
    with Client(eps.intake, timeout=10) as client:
        ids = fallout_orders(client, 12, "race-")
        control(eps.systems["billing"], capture_payment=[0.0, "payment_declined"])
        sim.cfg.latency_ms = 30.0  # the retried step's reply arrives among the others
        reqs = []
        for i, oid in enumerate(ids):
            kinds = [("retry_step", {}), ("abort_order", {}), ("skip_step", {}),
                     ("cancel_order", {"reason": "race"})]
            kinds = kinds[i % 4:] + kinds[:i % 4]  # each order gets another order of arrival
            reqs += [{"type": t, "order_id": oid, "operator": "op-race", **extra}
                     for t, extra in kinds]
        replies = list(client.pipeline(reqs, window=64))
        assert len(replies) == len(reqs)  # never silence
        kinds_seen = {r["type"] for _, r in replies}
        assert kinds_seen <= {"operator_accepted", "operator_rejected", "cancel_accepted",
                              "cancel_rejected"}, kinds_seen
        views = wait_terminal(client, ids, timeout=30)
        assert all(v["state"] in ("completed", "failed", "cancelled", "partial")
                   for v in views.values()), views
        assert svc.is_ready() and not svc.dead_components()
        assert svc.metrics.order_crashes._value.get() == 0
