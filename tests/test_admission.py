"""Admission control and back-pressure over real sockets."""

from __future__ import annotations

from typing import Any

import zmq
from conftest import SimThread

from gateways.client import Client, wait_terminal
from oms.sample import sample_orders


def test_beyond_max_in_flight_intake_answers_busy_and_takes_nothing(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    sim_config.delivery_s = 0.5
    thread = SimThread(sim_config)
    try:
        make_service(max_in_flight=20)
        orders = list(sample_orders(300, seed=8, source="web", prefix="ADM-"))
        with Client(eps.intake, timeout=30) as client:
            replies = {q["order"]["external_id"]: r for q, r in client.pipeline(
                {"type": "submit_order", "order": o} for o in orders)}
            busy = [e for e, r in replies.items() if r.get("code") == "busy"]
            accepted = [r["order_id"] for r in replies.values() if r["type"] == "accepted"]
            assert busy and accepted
            assert len(busy) + len(accepted) == len(orders)
            views = wait_terminal(client, accepted, timeout=60)
            assert {v["state"] for v in views.values()} == {"completed"}
            for ext in busy[:20]:  # a busy order was not taken: it can be sent again
                found = client.request({"type": "get_order", "source_system": "web",
                                        "external_id": ext})
                assert found["code"] == "not_found"
    finally:
        thread.stop()


def test_a_stalled_subscriber_cannot_block_the_service(service: Any, eps: Any) -> None:
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(eps.events)  # and never reads
    try:
        with Client(eps.intake, timeout=30) as client:
            ids = [r["order_id"] for _q, r in client.pipeline(
                {"type": "submit_order", "order": o}
                for o in sample_orders(1000, seed=9, source="web", prefix="STALL-"))]
            views = wait_terminal(client, ids, timeout=120)
        assert len(views) == 1000
    finally:
        stalled.close()


def test_a_pipelined_burst_cannot_slip_past_the_limit_before_its_commits(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """Creates handed to the writer but not yet committed count too: with a
    limit of 10 and orders that stay in flight (slow deliveries), a burst of
    300 sent without waiting gets at most 10 accepted, every other one a
    clear busy, and nothing busy is stored."""
    sim_config.delivery_s = 30.0  # every accepted order stays in flight for the test
    thread = SimThread(sim_config)
    try:
        make_service(max_in_flight=10)
        orders = list(sample_orders(300, seed=11, source="web", prefix="BURST-"))
        with Client(eps.intake, timeout=30) as client:
            replies = [r for _q, r in client.pipeline(
                {"type": "submit_order", "order": o} for o in orders)]
            accepted = [r for r in replies if r["type"] == "accepted"]
            busy = [r for r in replies if r.get("code") == "busy"]
            assert 1 <= len(accepted) <= 10
            assert len(accepted) + len(busy) == 300
            assert "10 orders in flight" in busy[0]["message"]
            counts = client.request({"type": "order_counts"})
            assert counts["in_flight"] == len(accepted)
            again = client.submit(orders[-1])  # still busy: the slots are taken
            assert again.get("code") == "busy"
    finally:
        thread.stop()
