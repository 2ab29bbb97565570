"""Level 3: the service in-process, the real simulators, real sockets and LMDB.

Bad input of every kind gets the matching reply and the service keeps
serving everyone else.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack
import pytest
import zmq
from helpers import poll_until, retail_order
from prometheus_client import generate_latest

from gateways.client import Client, wait_terminal
from oms import codec


def test_submit_then_get_by_id_and_by_external_id(service: Any, client: Client) -> None:
    reply = client.submit(retail_order("ext-a"))
    assert reply["type"] == "accepted" and reply["duplicate"] is False
    assert reply["state"] == "acknowledged"
    oid = reply["order_id"]
    view = client.get(oid)["order"]
    assert view["external_id"] == "ext-a" and view["customer_id"] == "c-1"
    by_ext = client.request({"type": "get_order", "source_system": "web",
                             "external_id": "ext-a"})
    assert by_ext["order"]["order_id"] == oid
    final = wait_terminal(client, [oid], timeout=20)[oid]
    assert final["state"] == "completed"
    assert {s["name"] for s in final["steps"]} >= {"reserve_stock", "capture_payment"}


def test_resubmission_is_a_duplicate_and_a_changed_payload_a_conflict(
        service: Any, client: Client) -> None:
    first = client.submit(retail_order("ext-b"))
    again = client.submit(retail_order("ext-b"))
    assert again["order_id"] == first["order_id"] and again["duplicate"] is True
    changed = client.submit(retail_order("ext-b", currency="USD"))
    assert changed["type"] == "error" and changed["code"] == "conflict"


def test_rejected_lists_all_field_errors(service: Any, client: Client) -> None:
    bad = retail_order("ext-c")
    bad["items"][0]["quantity"] = -1
    del bad["customer_address"]["country"]
    reply = client.submit(bad)
    assert reply["type"] == "rejected"
    assert {e["field"] for e in reply["errors"]} == {"items[0].quantity",
                                                     "customer_address.country"}


def test_source_system_labels_are_bounded(service: Any, client: Client) -> None:
    """Without CURVE a client names any source system: each name must not
    become a time series for good."""
    limit = service.metrics.source_label.limit
    bad = retail_order("ext-label")
    bad["items"] = []
    for i in range(limit + 20):
        assert client.submit(dict(bad, source_system=f"chan-{i}"))["type"] == "rejected"
    assert client.submit(dict(bad, source_system="x" * 65))["type"] == "rejected"
    text = generate_latest(service.registry).decode()
    sources = set(re.findall(r'oms_orders_received_total\{outcome="rejected",'
                             r'source_system="([^"]*)"\}', text))
    assert len(sources) == limit + 2 and {"other", "invalid", "chan-0"} <= sources
    assert f"chan-{limit}" not in sources


@pytest.mark.parametrize(("frame", "code"), [
    (b"\xc1\xc1", "malformed"),
    (codec.pack([1, 2, 3]), "malformed"),
    (b"\x81\x01\x02", "malformed"),
    (msgpack.packb({"type": msgpack.ExtType(1, b"x")}), "malformed"),
    (codec.pack({"type": "launch_rockets"}), "unknown_type"),
    (codec.pack({"no_type": 1}), "unknown_type"),
    (codec.pack({"type": "get_order", "order_id": "O999"}), "not_found"),
    (codec.pack({"type": "get_order", "order_id": 7}), "malformed"),
    (codec.pack({"type": "list_orders", "limit": 5000}), "malformed"),
    (codec.pack({"type": "list_orders", "state": "lost"}), "malformed"),
    (codec.pack({"type": "cancel_order", "order_id": "O404"}), "not_found"),
    (codec.pack({"type": "get_order", "source_system": "web", "external_id": "nope"}),
     "not_found"),
    (codec.pack({"type": "submit_order", "order": {"pad": "x" * (1024 * 1024)}}),
     "too_large"),
])
def test_bad_frames_get_the_matching_error(service: Any, client: Client, frame: bytes,
                                           code: str) -> None:
    reply = client.send_raw(frame)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["message"]
    assert client.submit(retail_order(f"after-{code}"))["type"] == "accepted"


def test_request_id_is_echoed(service: Any, client: Client) -> None:
    reply = client.send_raw(codec.pack({"type": "nope", "request_id": "abc-1"}))
    assert reply["request_id"] == "abc-1"


def test_req_socket_clients_are_served(service: Any, eps: Any) -> None:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(eps.intake)
    try:
        sock.send(codec.pack({"type": "submit_order", "order": retail_order("ext-req")}))
        assert sock.poll(5000)
        assert codec.decode_map(sock.recv())["type"] == "accepted"
        sock.send(b"garbage")
        assert sock.poll(5000)
        assert codec.decode_map(sock.recv())["code"] == "malformed"
    finally:
        sock.close()


def test_far_oversized_frame_is_cut_off_and_service_lives(service: Any, eps: Any,
                                                          client: Client) -> None:
    big = zmq.Context.instance().socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(eps.intake)
    big.send(b"\x00" * (8 * 1024 * 1024))
    assert not big.poll(500)  # dropped at the socket: no reply, no harm
    big.close()
    assert client.submit(retail_order("after-huge"))["type"] == "accepted"


def test_list_orders_filters_and_pages(service: Any, client: Client) -> None:
    ids = [client.submit(retail_order(f"list-{i}"))["order_id"] for i in range(7)]
    other = client.submit(retail_order("list-x", source_system="store"))["order_id"]
    seen, cursor = [], None
    while True:
        req: dict[str, Any] = {"type": "list_orders", "source_system": "web", "limit": 3}
        if cursor:
            req["after"] = cursor
        page = client.request(req)
        assert page["type"] == "orders" and len(page["orders"]) <= 3
        seen += [o["order_id"] for o in page["orders"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1] and other not in seen  # newest first
    wait_terminal(client, ids, timeout=20)
    done = client.request({"type": "list_orders", "state": "completed", "limit": 1000})
    assert set(ids) <= {o["order_id"] for o in done["orders"]}
    assert "steps" not in done["orders"][0]


def test_cancel_over_the_socket(service: Any, client: Client, sim: Any) -> None:
    oid = client.submit(retail_order("cancel-me", items=[
        {"id": "x", "product_id": "SKU-901", "quantity": 10**7}]))["order_id"]  # back-ordered
    poll_until(lambda: client.get(oid)["order"]["state"] == "held")
    assert client.get(oid)["order"]["state_reason"] == "awaiting_stock"
    reply = client.cancel(oid, "customer asked")
    assert reply["type"] == "cancel_accepted", reply
    final = wait_terminal(client, [oid], timeout=20)[oid]
    assert final["state"] == "cancelled"
    assert client.cancel(oid)["type"] == "cancel_rejected"
    ops = sim.report("warehouse", order_id=oid)["order"]
    assert ops == {"reserve_stock": 1, "release_stock": 1, "notify": 3}  # inProgress, held,
    # cancelled


def test_cancel_by_source_system_and_external_id(service: Any, client: Client, sim: Any) -> None:
    oid = client.submit(retail_order("cancel-ext", items=[
        {"id": "x", "product_id": "SKU-901", "quantity": 10**7}]))["order_id"]  # back-ordered
    poll_until(lambda: client.get(oid)["order"]["state"] == "held")
    reply = client.request({"type": "cancel_order", "source_system": "web",
                            "external_id": "cancel-ext", "reason": "by external id"})
    assert reply["type"] == "cancel_accepted" and reply["order_id"] == oid, reply
    assert wait_terminal(client, [oid], timeout=20)[oid]["state"] == "cancelled"
    missing = client.request({"type": "cancel_order", "source_system": "web",
                              "external_id": "no-such"})
    assert missing["type"] == "error" and missing["code"] == "not_found", missing
    half = client.request({"type": "cancel_order", "source_system": "web"})
    assert half["type"] == "error" and half["code"] == "malformed", half


def test_operator_name_is_optional_and_bounded(service: Any, client: Client) -> None:
    oid = client.submit(retail_order("op-name"))["order_id"]
    wait_terminal(client, [oid], timeout=20)
    for rtype in ("retry_step", "skip_step", "abort_order"):
        unnamed = client.request({"type": rtype, "order_id": oid})
        assert unnamed["type"] == "operator_rejected", unnamed  # refused for its state only
        long = client.request({"type": rtype, "order_id": oid, "operator": "x" * 65})
        assert long["type"] == "error" and long["code"] == "malformed", long
        bad = client.request({"type": rtype, "order_id": oid, "operator": 7})
        assert bad["type"] == "error" and bad["code"] == "malformed", bad


def test_an_internal_reply_is_counted(service: Any, client: Client) -> None:
    """An ``internal`` reply (here: an unreadable record) is counted in
    ``oms_internal_errors_total{component="intake"}``, not only in the
    intake's error codes; the intake goes on serving."""
    store = service.store
    with store.write() as txn:
        txn.put(b"O000000000009", b"\xc1garbage", db=store.db["orders"])
    counter = service.metrics.internal_errors.labels("intake")
    before = counter._value.get()
    reply = client.get("O000000000009")
    assert (reply["type"], reply["code"]) == ("error", "internal"), reply
    assert counter._value.get() == before + 1
    assert client.submit(retail_order("after-internal"))["type"] == "accepted"


@pytest.mark.parametrize("rtype", ["cancel_order", "retry_step", "skip_step", "abort_order"])
def test_a_reason_that_is_not_a_string_is_malformed(service: Any, client: Client,
                                                    rtype: str) -> None:
    """It was dropped without a word; bad input gets a clear error."""
    oid = client.submit(retail_order(f"reason-{rtype}"))["order_id"]
    reply = client.request({"type": rtype, "order_id": oid, "reason": {"why": 1}})
    assert (reply["type"], reply["code"]) == ("error", "malformed"), reply
    assert "reason" in reply["message"]


def test_a_new_order_is_stored_started_and_answered_acknowledged(
        service: Any, client: Client) -> None:
    """The create's transaction holds the order after its ``Start``
    (``actors.effects.NewOrder``): the first durable snapshot already has
    the first commands running, with no second snapshot for the start;
    the reply still says ``acknowledged`` (contract)."""
    reply = client.submit(retail_order("ext-started"))
    assert reply["type"] == "accepted" and reply["state"] == "acknowledged"
    with service.store.read() as txn:  # durable before the reply
        stored = service.store.load(txn, reply["order_id"])
    assert stored is not None and stored.version == 1
    assert str(stored.state) == "inProgress" and stored.history[0]["state"] == "acknowledged"
    assert str(stored.steps["reserve_stock"].status) == "running"
    final = wait_terminal(client, [reply["order_id"]], timeout=20)[reply["order_id"]]
    assert final["state"] == "completed"


def test_an_order_whose_start_raises_is_accepted_and_held(
        make_service: Any, sim: Any, client: Client) -> None:
    """Poison that validation lets through and the engine's ``Start``
    raises on: the create stores it unstarted, its actor runs ``Start``,
    and the order failure rule holds it as fallout; the next order runs."""
    import dataclasses

    from oms.engine import Engine

    svc = make_service()
    good = svc.octx.engines["retail"]
    svc.octx.engines["retail"] = Engine(dataclasses.replace(good.proc, expected_s="soon"))
    poison = client.submit(retail_order("ext-poison"))
    assert poison["type"] == "accepted" and poison["state"] == "acknowledged"
    view = poll_until(lambda: (o := client.get(poison["order_id"])["order"])["state"] == "held"
                      and o)
    svc.octx.engines["retail"] = good
    assert view["state_reason"] == "internal_error"
    assert view["failure"]["error"]["message"].startswith("TypeError:")
    after = client.submit(retail_order("ext-after-poison"))["order_id"]
    assert wait_terminal(client, [after], timeout=20)[after]["state"] == "completed"


def test_generated_orders_get_the_full_walks_answer_over_the_socket(
        service: Any, client: Client) -> None:
    """Valid, near-valid and poisoned orders (``test_validation_fast``'s
    generator) through the real intake: a valid one is accepted (the fast
    path), any other gets exactly the errors the full walk names."""
    import random

    from test_validation_fast import bases, mutate

    from oms.validation import validate_full

    rng = random.Random(15)
    accepted = rejected = 0
    for i in range(60):
        for order in bases(rng):
            for _ in range(rng.choice([0, 1, 2])):
                mutate(order, rng)
            ext = order.get("external_id")
            if isinstance(ext, str) and ext.strip():
                order["external_id"] = f"fz{i}-{ext}"  # each order its own (no duplicate)
            try:
                decoded = msgpack.unpackb(msgpack.packb(order))  # as the intake decodes it
            except ValueError:  # an int key: a malformed frame (test_bad_frames_...)
                continue
            reply = client.submit(order)
            expected, errs = validate_full(decoded, tuple(service.octx.engines))
            if expected is None:
                assert reply == {"type": "rejected", "request_id": reply.get("request_id"),
                                 "errors": [e.to_wire() for e in errs]}
                rejected += 1
            else:
                assert reply["type"] == "accepted" and reply["duplicate"] is False, reply
                accepted += 1
    assert accepted > 20 and rejected > 20
