"""Review of session 5's cuts (h/lead5): regressions found, each pinned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import SimThread
from helpers import poll_until, retail_order
from test_store_full import commit_errors, waiting_order_on_a_full_disk

from gateways.client import Client
from oms.messages import TimerFired


def stale(svc: Any) -> float:
    return svc.registry.get_sample_value(
        "oms_order_stale_messages_total", {"kind": "TimerFired"}) or 0.0


def passivations(svc: Any) -> float:
    return svc.registry.get_sample_value("oms_order_passivations_total") or 0.0


def test_a_waiting_order_that_ignores_a_message_before_its_snapshot_is_durable_still_leaves(
        make_service: Any, sim_config: Any, eps: Any, tmp_path: Path) -> None:
    """A waiting order's snapshot only ``Confirm``s its commit (no note, no
    slice). If the order handles a message it ignores (a stale timer) while
    that snapshot is not durable yet, the slice ends with nothing to save and
    the order not yet durable, so it is not marked idle then; nothing wakes it
    once the snapshot is durable. With the ``Flushed`` note (main) the note's
    slice marked it idle and the sweep passivated it; it must still leave
    memory once its snapshot is durable. The snapshot is held by a full disk
    (as in ``test_store_full``) so that the stale timer comes in between."""
    with waiting_order_on_a_full_disk(make_service, sim_config, eps, tmp_path,
                                      "wait-stale") as held:
        svc, oid = held.svc, held.oid
        poll_until(lambda: commit_errors(svc) >= 2, timeout=10)  # held
        # create_shipment's retry timer, come after its reply: ignored
        before = stale(svc)
        assert svc.router.deliver(oid, TimerFired(("retry", "create_shipment", 1)))
        poll_until(lambda: stale(svc) > before, timeout=10)
        assert held.step("create_shipment") == "running"  # still held
        held.release()
        poll_until(lambda: held.step("create_shipment") == "done", timeout=10)  # durable
        poll_until(lambda: svc.router.snapshot()["passivated"] == 1, timeout=10)
        assert oid not in svc.router.live_ids()


def test_a_waiting_order_that_only_answers_a_request_leaves_memory_again(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """(Older than session 5, found on the way.) A request that changes
    nothing but is answered (a cancel refused past the point of no return)
    wakes a passivated waiting order; its slice ends with a ``Barrier`` (the
    reply) and no snapshot, so neither ``_rest`` nor a commit marks it idle
    again: it must still leave memory."""
    sim_config.latency_ms = 1.0
    sim_config.delivery_s = 3600.0  # it waits for delivery, past create_shipment
    sim = SimThread(sim_config)
    try:
        svc = make_service(passivate_after_s=0.05)
        with Client(eps.intake, timeout=30) as client:
            oid = client.submit(retail_order("wait-cancel"))["order_id"]
            poll_until(lambda: passivations(svc) == 1, timeout=30)
            answer = client.cancel(oid, "changed my mind")  # loads it again
            assert answer["type"] == "cancel_rejected", answer
            assert svc.registry.get_sample_value(
                "oms_order_activations_total", {"reason": "message"}) == 1
            poll_until(lambda: passivations(svc) == 2, timeout=10)
            assert oid not in svc.router.live_ids()
        svc.stop()
    finally:
        sim.stop()
