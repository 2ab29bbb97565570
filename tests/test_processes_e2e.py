"""Processes as data, over real sockets: a new order type with no code
change, and the telecom process (parallel items, partial, sequencing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import retail_order

from app.cli import main
from gateways.client import Client, wait_terminal

RETURN = """
[process]
order_type = "return"
description = "Receive returned goods, refund, restock"
notify = { system = "crm", op = "notify", states = ["completed", "failed"] }

[steps.receive]
system = "warehouse"
op = "receive_return"
args = { items = "$order.stock_items" }
collect = ["receipt_id"]

[steps.refund]
after = ["receive"]
system = "billing"
op = "refund_payment"
args = { payment_id = "$order.attributes.payment_id" }

[steps.restock]
after = ["receive"]
system = "warehouse"
op = "restock"
args = { receipt_id = "$steps.receive.receipt_id" }
"""


def test_new_order_type_runs_without_code(tmp_path: Path, make_service: Any, sim: Any,
                                          client: Client) -> None:
    folder = tmp_path / "procs"
    folder.mkdir()
    (folder / "return.toml").write_text(RETURN)
    assert main(["processes", "check", str(folder)]) == 0
    make_service(processes=str(folder))
    order = retail_order("ret-1", order_type="return", attributes={"payment_id": "pay-7"})
    oid = client.submit(order)["order_id"]
    view = wait_terminal(client, [oid], timeout=20)[oid]
    assert view["state"] == "completed"
    assert [s["name"] for s in view["steps"]][:3] == ["receive", "refund", "restock"]
    assert view["summary"]["results"]["receipt_id"].startswith("rcpt-")
    ops = sim.report(order_id=oid)["order"]
    assert ops == {"receive_return": 1, "refund_payment": 1, "restock": 1, "notify": 1}


def test_invalid_definition_is_refused_with_file_and_key(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "bad.toml").write_text(RETURN.replace('after = ["receive"]\nsystem = "billing"',
                                                      'after = ["recieve"]\nsystem = "billing"'))
    assert main(["processes", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: steps.refund.after: unknown step 'recieve' (did you mean 'receive'?)" in err


def telecom(ext: str, customer: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"source_system": "crm-ui", "external_id": ext, "order_type": "telecom",
            "customer": {"id": customer},
            "customer_address": {"line1": "1 Way", "city": "Oslo", "postal_code": "0150",
                                 "country": "NO"},
            "items": items}


def test_telecom_partial_over_the_wire(service: Any, client: Client, sim: Any) -> None:
    items = [{"id": "fiber", "product_id": "FIBER", "quantity": 1, "unit_price_minor": 4000},
             {"id": "tv", "action": "modify", "product_id": "TV", "quantity": 1,
              "service_id": "svc-existing-1", "attributes": {"ch": 100}},
             {"id": "dsl", "action": "delete", "product_id": "DSL", "service_id": "svc-gone"},
             {"id": "phone", "action": "noChange", "product_id": "PHONE"}]
    oid = client.submit(telecom("tel-1", "sub-1", items))["order_id"]
    view = wait_terminal(client, [oid], timeout=20)[oid]
    assert view["state"] == "partial"
    assert {i["id"]: i["state"] for i in view["items"]} == {
        "fiber": "completed", "tv": "completed", "dsl": "failed", "phone": "completed"}
    assert len(view["summary"]["results"]["service_ids"]) == 1


def test_same_customer_orders_run_one_at_a_time(make_service: Any, sim_config: Any,
                                                client: Client) -> None:
    from conftest import SimThread

    sim_config.latency_ms = 30.0  # long enough for the second order to find the first busy
    thread = SimThread(sim_config)
    try:
        make_service()
        item = [{"id": "a", "product_id": "FIBER", "quantity": 1}]
        first = client.submit(telecom("seq-1", "sub-9", item))["order_id"]
        second = client.submit(telecom("seq-2", "sub-9", item))["order_id"]
        other = client.submit(telecom("seq-3", "sub-8", item))["order_id"]
        views = wait_terminal(client, [first, second, other], timeout=20)
    finally:
        thread.stop()
    hist2 = [h["state"] for h in views[second]["history"]]
    assert hist2[:3] == ["acknowledged", "pending", "inProgress"]
    done_first = views[first]["summary"]["completed_ts"]
    started_second = next(h["ts"] for h in views[second]["history"]
                          if h["state"] == "inProgress")
    assert started_second >= done_first
    assert "pending" not in [h["state"] for h in views[other]["history"]]


def test_cancelled_or_aborted_pending_orders_free_the_queue_at_once(
        make_service: Any, sim_config: Any, client: Client) -> None:
    """Issue 12 defects 3 and 8 through the real actors and sequencer: a
    pending telecom order cancelled (or aborted by an operator) leaves its
    customer's queue at once; the customer's next order runs, no restart."""
    from conftest import SimThread

    sim_config.latency_ms = 150.0  # the first order stays busy while we act
    thread = SimThread(sim_config)
    try:
        make_service()
        item = [{"id": "a", "product_id": "FIBER", "quantity": 1}]
        ids = [client.submit(telecom(f"q-{i}", "sub-7", item))["order_id"] for i in range(4)]
        assert client.cancel(ids[1], "changed my mind")["type"] == "cancel_accepted"
        abort = client.request({"type": "abort_order", "order_id": ids[2], "operator": "ann",
                                "reason": "duplicate"})
        assert abort["type"] == "operator_accepted", abort
        views = wait_terminal(client, ids, timeout=15)
    finally:
        thread.stop()
    assert [views[i]["state"] for i in ids] == ["completed", "cancelled", "failed", "completed"]
    assert views[ids[2]]["state_reason"] == "aborted"
    for oid in ids[1:3]:
        assert "inProgress" not in [h["state"] for h in views[oid]["history"]]


def test_an_attribute_a_reply_could_not_carry_back_is_refused_and_the_bounds_go_round(
        service: Any, client: Client, sim: Any) -> None:
    """Item attributes go to provisioning and come back in a later modify's
    reply (the reference simulator answers ``previous_attributes``). NaN,
    binary or a number past signed 64 bits would make every later modify
    of that service fail as ``invalid_reply``: they are refused at intake,
    with the field, and the service answers the next order. Values at the
    bounds go out and come back: the modifies complete."""
    def add(ext: str, attributes: dict[str, Any]) -> dict[str, Any]:
        return telecom(ext, "sub-attrs", [{"id": "fiber", "product_id": "FIBER", "quantity": 1,
                                           "attributes": attributes}])

    for value, message in ((float("nan"), "must be a finite number"),
                           (b"\x00", "binary values are not allowed"),
                           (2**64 - 1, "numbers must be within signed 64 bits"),
                           (1.5e300, "numbers must be within signed 64 bits")):
        reply = client.submit(add(f"attr-bad-{value!r:.8}", {"x": [value]}))
        assert reply["type"] == "rejected", reply
        assert reply["errors"] == [{"field": "items[0].attributes.x[0]", "message": message}]
    bounds = {"max": 2**63 - 1, "min": -2**63, "f": 9.2e18, "g": -0.5, "s": "x" * 1000}
    first = client.submit(add("attr-ok", bounds))["order_id"]
    view = wait_terminal(client, [first], timeout=20)[first]
    assert view["state"] == "completed", view
    service_id = view["summary"]["results"]["service_ids"][0]
    ids = []
    for n in range(2):
        modify = [{"id": "fiber", "action": "modify", "product_id": "FIBER", "quantity": 1,
                   "service_id": service_id, "attributes": dict(bounds, n=n)}]
        ids.append(client.submit(telecom(f"attr-mod-{n}", "sub-attrs", modify))["order_id"])
        done = wait_terminal(client, ids[-1:], timeout=20)[ids[-1]]
        assert done["state"] == "completed", done
