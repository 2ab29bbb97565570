"""docs/protocol.md as a client team reads it: what a review written against
that page alone found the service doing otherwise. Real sockets, a real
service and the reference simulators."""

from __future__ import annotations

from typing import Any

from conftest import SimThread
from helpers import poll_until, retail_order

from gateways.client import Client, wait_terminal


def _no_rid(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "request_id"}


def test_cancel_by_external_id_of_an_archived_order_is_rejected_as_archived(
        make_service: Any, sim: Any, client: Client) -> None:
    """§1 "Archived orders": `cancel_order` of an archived order is
    `cancel_rejected` "(archived)", by `order_id` or by `source_system` +
    `external_id` (the two ways §1 names an order); by external id it was
    answered `not_found`, as if the order had never existed."""
    make_service(retention_s=0.5, retention_interval_s=0.05)
    oid = client.submit(retail_order("arch-ext"))["order_id"]
    wait_terminal(client, [oid], timeout=20)
    poll_until(lambda: client.get(oid)["order"].get("archived") is True, timeout=15)
    expected = {"type": "cancel_rejected", "order_id": oid,
                "reason": "order is already completed (archived)"}
    assert _no_rid(client.cancel(oid)) == expected
    by_ext = client.request({"type": "cancel_order", "source_system": "web",
                             "external_id": "arch-ext"})
    assert _no_rid(by_ext) == expected



def _taken_then_refused(client: Client, refused: str) -> None:
    """``taken`` was accepted before; now no new order can be taken."""
    first = retail_order("taken")
    taken = client.request({"type": "get_order", "source_system": "web",
                            "external_id": "taken"})["order"]["order_id"]
    again = client.submit(first)
    assert (again["type"], again["order_id"], again["duplicate"]) == ("accepted", taken, True)
    assert client.submit(dict(first, currency="USD"))["code"] == "conflict"
    assert client.submit(retail_order("new"))["code"] == refused


def test_a_resubmission_at_the_admission_limit_is_a_duplicate_not_busy(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """§1: the same payload again is `accepted` `duplicate: true` with the
    same `order_id`; `busy` says "the order was NOT taken". A channel whose
    first reply was lost resent its order while the service was at its
    admission limit and was told `busy`: that its order, already taken and
    running, was not. A resubmission asks for nothing new: it is answered
    as ever (a changed payload is `conflict`); a new order is `busy`."""
    sim_config.delivery_s = 3600.0  # every accepted order stays in flight
    thread = SimThread(sim_config)
    try:
        make_service(max_in_flight=1)
        with Client(eps.intake, timeout=30) as client:
            assert client.submit(retail_order("taken"))["type"] == "accepted"
            _taken_then_refused(client, "busy")
    finally:
        thread.stop()


def test_a_resubmission_while_the_store_cannot_write_is_a_duplicate_not_unavailable(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """As above while the store cannot write (its map at the cap):
    `unavailable` ("nothing was taken") only for a new order."""
    sim_config.delivery_s = 3600.0
    thread = SimThread(sim_config)
    try:
        make_service(map_size_mb=1, max_map_size_mb=2)
        pad = {f"k{n}": "p" * 900 for n in range(5)}  # every order needs fresh pages
        with Client(eps.intake, timeout=30) as client:
            assert client.submit(retail_order("taken"))["type"] == "accepted"
            for n in range(3000):
                reply = client.submit(retail_order(f"fill-{n}", attributes={"pad": pad}))
                if reply["type"] != "accepted":
                    break
            assert reply["code"] == "unavailable", reply
            _taken_then_refused(client, "unavailable")
    finally:
        thread.stop()
