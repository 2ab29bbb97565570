"""What the alerts read, from a real service: the age of the oldest held
order (a gauge read at scrape time, also right after a restart) and the
gateway's retry counter (every command sent again)."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from conftest import free_port
from helpers import poll_until, retail_order
from test_operations import control, no_restock  # noqa: F401

from gateways.client import Client, wait_terminal

BACKORDERED = [{"id": "x", "product_id": "SKU-901", "quantity": 10**7}]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


@pytest.mark.usefixtures("no_restock")
def test_oldest_held_order_age_is_a_gauge_that_survives_a_restart(
        make_service: Any, eps: Any) -> None:
    port = free_port()
    svc = make_service(metrics_port=port)
    age = "oms_oldest_held_order_age_seconds"
    assert metric(port, age) == 0.0  # nothing held
    with Client(eps.intake) as client:
        held = client.submit(retail_order("age-1", items=BACKORDERED))["order_id"]
        poll_until(lambda: client.get(held)["order"]["state"] == "held")
        done = client.submit(retail_order("age-2"))["order_id"]
        wait_terminal(client, [done], timeout=20)
        first = poll_until(lambda: metric(port, age) or None)
        assert poll_until(lambda: metric(port, age) > first)  # it ages while held
    svc.stop()
    port2 = free_port()
    make_service(metrics_port=port2)  # restart: the age comes from the stored history
    with Client(eps.intake) as client:
        client.wait_ready(20)
        assert metric(port2, age) >= first
        assert client.cancel(held)["type"] == "cancel_accepted"
        wait_terminal(client, [held], timeout=20)
    assert poll_until(lambda: metric(port2, age) == 0.0)


def test_every_retry_is_counted(make_service: Any, sim: Any, eps: Any) -> None:
    port = free_port()
    make_service(metrics_port=port)
    retries = "oms_gateway_retries_total"
    control(eps.systems["billing"], capture_payment=[1.0, "unavailable"])  # retryable
    with Client(eps.intake) as client:
        oid = client.submit(retail_order("retry-1"))["order_id"]

        def attempts() -> int:
            steps = client.get(oid)["order"]["steps"]
            return next(s["attempts"] for s in steps if s["name"] == "capture_payment")

        poll_until(lambda: attempts() >= 3)
        assert metric(port, retries) >= 2  # attempts 2 and 3 were retries
        control(eps.systems["billing"], capture_payment=[0])
        view = wait_terminal(client, [oid], timeout=30)[oid]
    assert view["state"] == "completed"
    sent_again = next(s["attempts"] for s in view["steps"] if s["name"] == "capture_payment") - 1
    assert metric(port, retries) >= sent_again >= 2
