"""docs/protocol.md as a client team reads it: what a review written against
that page alone found the service doing otherwise. Real sockets, a real
service and the reference simulators."""

from __future__ import annotations

from typing import Any

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
