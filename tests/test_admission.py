"""Admission control and back-pressure over real sockets."""

from __future__ import annotations

from typing import Any

import zmq
from conftest import SimThread

from oms.client import Client, wait_terminal
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
