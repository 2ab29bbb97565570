"""docs/protocol.md as a client team reads it: what a review written against
that page alone found the service doing otherwise. Real sockets, a real
service and the reference simulators."""

from __future__ import annotations

from typing import Any

import zmq
from conftest import SimThread
from helpers import poll_until, retail_order
from test_operations import control

from gateways.client import Client, wait_terminal
from oms import codec


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


def _subscribed(eps: Any, client: Client, topic: bytes) -> zmq.Socket:
    """A SUB socket that is known to receive: a probe order's event came."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(eps.events)
    probe = client.submit(retail_order("probe"))["order_id"]
    poll_until(lambda: sub.poll(100) and codec.decode_map(
        sub.recv_multipart()[1]).get("order_id") == probe)
    return sub


def test_an_order_whose_failed_undo_is_retried_or_skipped_fails_with_its_reason(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """§1 states: `failed` has `state_reason` the failing error code; the
    view's `failure` is the step that failed, kept once terminal; an order
    undoing its steps is `inProgress`/`compensating`. When an undo failed
    for good (held/fallout) and an operator retried or skipped it, the order
    ended `failed` with no `state_reason` and no `failure`, and went back to
    `inProgress` without `compensating`. The failed undo's `failure` keeps
    what it undoes as `previous`, and the order fails with it."""
    sim_config.fail = {"capture_payment": (1.0, "payment_declined"),
                       "void_invoice": (1.0, "void_refused")}
    thread = SimThread(sim_config)
    try:
        make_service()
        with Client(eps.intake, timeout=30) as client:
            sub = _subscribed(eps, client, b"web\x00")
            ids = {action: client.submit(retail_order(f"undo-{action}"))["order_id"]
                   for action in ("retry", "skip")}
            declined = {"step": "capture_payment", "error": {
                "code": "payment_declined", "message": "simulated payment_declined",
                "retryable": False}}
            for oid in ids.values():
                view = poll_until(lambda oid=oid: (v := client.get(oid)["order"]).get(
                    "state_reason") == "fallout" and v)
                assert view["failure"]["compensation"] is True
                assert view["failure"]["step"] == "create_invoice"
                assert view["failure"]["previous"] == declined
            control(eps.systems["billing"], void_invoice=[0])  # the undo works now
            for action, oid in ids.items():
                reply = client.request({"type": f"{action}_step", "order_id": oid})
                assert reply["type"] == "operator_accepted", reply
            for view in wait_terminal(client, ids.values(), timeout=20).values():
                assert (view["state"], view["state_reason"]) == ("failed", "payment_declined")
                assert view["failure"] == declined
                resumed = [h for h in view["history"] if h["state"] == "inProgress"][-1]
                assert resumed.get("reason") == "compensating", view["history"]
            events: list[dict[str, Any]] = []

            def resumed_events() -> bool:
                while sub.poll(10):
                    events.append(codec.decode_map(sub.recv_multipart()[1]))
                return {e["order_id"] for e in events if e["type"] == "order_state"
                        and e["previous_state"] == "held" and e["state"] == "inProgress"
                        } == set(ids.values())
            poll_until(resumed_events)
            for event in events:
                if event["type"] == "order_state" and event["previous_state"] == "held":
                    assert event["state_reason"] == "compensating", event
            sub.close()
    finally:
        thread.stop()


def test_an_order_aborted_with_no_failed_step_has_a_failure_of_the_documented_shape(
        make_service: Any, sim_config: Any, eps: Any) -> None:
    """§1: `failure` is {`step`, `error`, `compensation`?, `aborted_by`?}.
    An order aborted while it waited (for stock, here) had no failed step,
    and its `failure` was {`aborted_by`} alone: a client reading
    `failure.step` found no key. Both are there, nil."""
    sim_config.restock_s = 3600.0
    thread = SimThread(sim_config)
    try:
        make_service()
        with Client(eps.intake, timeout=30) as client:
            oid = client.submit(retail_order("abort-wait", items=[
                {"id": "a", "product_id": "SKU-901", "quantity": 10**9}]))["order_id"]
            poll_until(lambda: client.get(oid)["order"].get("state_reason") == "awaiting_stock")
            reply = client.request({"type": "abort_order", "order_id": oid, "operator": "ann"})
            assert reply["type"] == "operator_accepted", reply
            view = wait_terminal(client, [oid], timeout=20)[oid]
            assert (view["state"], view["state_reason"]) == ("failed", "aborted")
            assert view["failure"] == {"step": None, "error": None, "aborted_by": "ann"}
    finally:
        thread.stop()


def test_what_the_page_writes_down_for_sloppy_clients(service: Any, client: Client) -> None:
    """Behaviour a client team could not read off the page before 1.4's
    notes: wrong types inside `order` are `rejected` with the field (the
    `malformed` row named "a field of the wrong type"), a field the page
    does not list is ignored outside `order`, a `delete` item's quantity is
    1 (shown, and compared on resubmission), a wait step's `op`."""
    for bad in ("2", 2.0, True):
        reply = client.submit(retail_order("typed", items=[
            {"id": "a", "product_id": "p", "quantity": bad}]))
        assert reply["type"] == "rejected" and [e["field"] for e in reply["errors"]] == [
            "items[0].quantity"], reply
    reply = client.request({"type": "submit_order", "order": None})
    assert reply["type"] == "rejected" and reply["errors"][0]["field"] == "order"
    listing = client.request({"type": "list_orders", "limt": 1, "colour": "red"})
    assert listing["type"] == "orders"
    telecom = retail_order("del", order_type="telecom", items=[
        {"id": "d", "action": "delete", "service_id": "svc-x", "product_id": "TV"}])
    oid = client.request({"type": "submit_order", "order": telecom, "colour": 1})["order_id"]
    assert client.get(oid)["order"]["items"][0]["quantity"] == 1
    one = dict(telecom, items=[dict(telecom["items"][0], quantity=1)])
    assert client.submit(one)["duplicate"] is True
    two = dict(telecom, items=[dict(telecom["items"][0], quantity=2)])
    assert client.submit(two)["code"] == "conflict"
    retail = client.submit(retail_order("waits"))["order_id"]
    view = wait_terminal(client, [retail], timeout=20)[retail]
    assert {s["name"]: s["op"] for s in view["steps"]}["await_delivery"] == (
        "await:shipment_delivered")


def test_which_replies_carry_the_request_id(make_service: Any, client: Client) -> None:
    """§1: a string or integer `request_id` comes back, nothing else does;
    a reply to a message the service could not read has none."""
    make_service()
    for rid, echoed in (("r", True), (-(2**63), True), (2**64 - 1, True), (True, False),
                        (1.5, False), (None, False), ([1], False), (b"r", False)):
        frame = codec.pack({"type": "order_counts", "request_id": rid})
        reply = client.send_raw(frame)
        assert reply["type"] == "order_counts"
        assert ("request_id" in reply) == echoed and reply.get("request_id", rid) == rid
    assert "request_id" not in client.send_raw(b"\xc1")  # not msgpack
    big = codec.pack({"type": "order_counts", "request_id": "r", "pad": "x" * (1 << 20)})
    assert client.send_raw(big)["code"] == "too_large"
    assert "request_id" not in client.send_raw(big)
