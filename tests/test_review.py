"""Defects found by a hostile review, each held by a real-socket test."""

from __future__ import annotations

from typing import Any

from gateways.client import wait_terminal


def telecom_order(ext: str, item_ids: list[str], customer: str = "sub-r1") -> dict[str, Any]:
    return {"source_system": "web", "external_id": ext, "order_type": "telecom",
            "customer": {"id": customer},
            "customer_address": {"line1": "1 Main St", "city": "Berlin",
                                 "postal_code": "10115", "country": "DE"},
            "items": [{"id": i, "product_id": "FIBER-1000", "quantity": 1,
                       "unit_price_minor": 100} for i in item_ids]}


def test_an_item_id_with_a_hash_sign_does_not_leave_its_step_waiting_forever(
        service: Any, client: Any) -> None:
    """A per-item step's command id carries the item id (``O..:activate[line#1]``);
    the reply must find its step, not be dropped as stale (the order would
    wait for a reply that had come, with no timeout left to end the wait)."""
    reply = client.submit(telecom_order("hash-1", ["line#1", "tv#2"]))
    assert reply["type"] == "accepted", reply
    views = wait_terminal(client, [reply["order_id"]], timeout=20)
    view = views[reply["order_id"]]
    assert view["state"] == "completed", view
