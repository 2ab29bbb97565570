"""Hostile review of the session-6 merges: cases found missing.

An order actor held on the loop thread (``PooledActor.hold``: it took a
message in place and its slice ends at the end of the loop's phase) must
never run a handler on any other thread: a delivery from another thread
(recovery replays the store's inbox from the main thread while the loop
runs; a private timer loop) queues behind it, as a tell to a running actor
does. Real service: sockets, LMDB, simulators.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import Endpoints
from helpers import poll_until
from test_held import held_for_stock, on_loop
from test_operations import no_restock  # noqa: F401

from gateways.client import Client
from oms.messages import DomainEvent, TimerFired


@pytest.mark.usefixtures("no_restock")
def test_a_delivery_from_another_thread_to_a_held_actor_is_queued_not_run_there(
        make_service: Any, eps: Endpoints) -> None:
    """In one loop call (no phase ends between): a stale timer is taken in
    place (the actor is held), then another thread delivers to the same
    order. That thread must not run the handler (the loop may be running
    it or ending its slice): the message is queued, and handled on the loop
    after the held slice ends; the order still completes."""
    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        oid = held_for_stock(svc, client, "review-cross-thread")
        seen: dict[str, Any] = {}

        def build() -> None:
            actor = svc.router._live[oid]._actor_weakref()
            assert svc.router.deliver(oid, TimerFired(("retry", "nothing", 97))) is True
            seen["held"] = (len(actor.actor_inbox), len(actor._handled))

            def other() -> None:
                seen["other"] = svc.router.deliver(oid, TimerFired(("retry", "nothing", 98)))

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(10)
            seen["after_other"] = (len(actor.actor_inbox), len(actor._handled))

        on_loop(svc, build)
        assert seen["held"] == (0, 1)  # taken in place: held
        assert seen["other"] is True
        assert seen["after_other"] == (1, 1)  # queued, not run on the other thread
        assert on_loop(svc, lambda: svc.router.deliver(oid, DomainEvent(
            "ev-review-cross", "warehouse", "stock_reserved", {}))) is True
        poll_until(lambda: client.get(oid)["order"]["state"] == "completed")
    assert svc.dead_components() == [] and svc.is_ready()
