"""Hostile review 11 (b): the wire contract read by a client written from
docs/protocol.md alone; each finding a failing test first (real sockets,
real LMDB, the reference simulators; no mocks, no sleeps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import retail_order
from test_processes_e2e import telecom
from test_security import keys, opts, secure  # noqa: F401 - fixtures (keys: tmp_path/keys)
from test_shards import Sharded
from test_validation import errors_of

from gateways.client import Client, wait_terminal
from oms import codec
from oms.order_rules import MAX_ATTR_BYTES

# -- attributes a domain reply cannot carry back (contract §1 rules, 1.4) ------------------


def _nested(maps: int, leaf: Any) -> dict[str, Any]:
    """``maps`` nested maps, the innermost ``{"x": leaf}``: ``leaf`` is at
    level ``maps + 1`` of an attributes map so made."""
    value: dict[str, Any] = {"x": leaf}
    for n in range(maps - 1):
        value = {f"n{n}": value}
    return value


def _sized(size: int) -> dict[str, Any]:
    """An attributes map whose encoding (``oms.codec``) is exactly ``size`` bytes."""
    attributes = {f"k{i:02d}": "v" * 900 for i in range(size // 910)}
    attributes["pad"] = ""
    attributes["pad"] = "p" * (size - len(codec.pack(attributes)))
    grown = len(codec.pack(attributes))
    if grown != size:  # the string's header grew: give the difference back
        attributes["pad"] = "p" * (len(attributes["pad"]) - (grown - size))
    assert len(codec.pack(attributes)) == size
    return attributes


def test_an_empty_map_or_list_at_the_eighth_level_is_refused() -> None:
    """A reply carries an item's attributes back one level down (provisioning's
    ``previous_attributes``, a deactivate's ``attributes``), and a reply's
    ``data`` may nest 8 levels. The intake counted only the values it found:
    an EMPTY map or list at the attributes' eighth level passed, and its echo
    was 9 levels deep: ``invalid_reply`` for every later modify of the
    service."""
    for inner in ({}, []):
        deep = _nested(7, inner)
        errs = errors_of(retail_order(attributes=deep))
        assert list(errs.values()) == ["nested deeper than 8 levels"], (inner, errs)
    assert errors_of(retail_order(attributes=_nested(7, 1))) == {}
    assert errors_of(retail_order(attributes=_nested(6, {}))) == {}


def test_attributes_larger_than_a_reply_may_carry_back_are_refused() -> None:
    """A success reply's ``data`` is at most 16 KiB encoded; the intake took
    attributes of any size up to the 1 MiB frame, and the echo of one over
    16 KiB failed every later modify of that service as ``invalid_reply``."""
    assert errors_of(retail_order(attributes=_sized(MAX_ATTR_BYTES))) == {}
    errs = errors_of(retail_order(attributes=_sized(MAX_ATTR_BYTES + 1)))
    assert errs == {"attributes": f"at most {MAX_ATTR_BYTES} bytes once encoded"}, errs
    item = dict(retail_order()["items"][0], attributes=_sized(MAX_ATTR_BYTES + 1))
    assert errors_of(retail_order(items=[item])) == {
        "items[0].attributes": f"at most {MAX_ATTR_BYTES} bytes once encoded"}


def test_the_largest_and_deepest_attributes_taken_come_back_in_replies(
        service: Any, client: Client, sim: Any) -> None:
    """Over the wire: attributes at both bounds at once go to provisioning
    and come back in a modify's reply and a delete's reply (with the longest
    product id): both orders complete; one byte or one level more is
    ``rejected`` with the field, and the service answers the next order."""
    product = "P" * 1000
    attributes = _sized(MAX_ATTR_BYTES - 200)
    attributes["deep"] = _nested(5, [1])  # levels: attributes 1, maps 2-6, list 7, 1 at 8
    attributes["pad"] = "p" * (len(attributes["pad"]) + MAX_ATTR_BYTES
                               - len(codec.pack(attributes)))
    assert len(codec.pack(attributes)) == MAX_ATTR_BYTES

    def item(**fields: Any) -> dict[str, Any]:
        return dict({"id": "line", "product_id": product, "quantity": 1}, **fields)

    for bad in (dict(attributes, pad=attributes["pad"] + "p"),
                dict(attributes, deep=_nested(5, [[]]))):
        reply = client.submit(telecom("attr-over", "sub-echo", [item(attributes=bad)]))
        assert reply["type"] == "rejected", reply
        assert [e["field"] for e in reply["errors"]] in (
            ["items[0].attributes"], ["items[0].attributes.deep.n3.n2.n1.n0.x[0]"]), reply
    first = client.submit(telecom("attr-add", "sub-echo", [item(attributes=attributes)]))
    view = wait_terminal(client, [first["order_id"]], timeout=20)[first["order_id"]]
    assert view["state"] == "completed", view
    service_id = view["summary"]["results"]["service_ids"][0]
    for ext, fields in (("attr-mod", {"action": "modify", "attributes": attributes}),
                        ("attr-del", {"action": "delete"})):
        reply = client.submit(telecom(ext, "sub-echo", [item(service_id=service_id, **fields)]))
        assert reply["type"] == "accepted", reply
        oid = reply["order_id"]
        done = wait_terminal(client, [oid], timeout=20)[oid]
        assert done["state"] == "completed", (ext, done.get("state_reason"), done["steps"])


# -- list_orders' cursor as the contract writes it ----------------------------------------


def test_a_cursor_is_o_and_12_to_40_digits_as_the_contract_says(
        service: Any, client: Client) -> None:
    """§1 "Listing orders" said a one-node ``after`` is "``O`` followed by
    digits, at most 64 characters"; the service takes ``O`` and 12 to 40
    digits (``O1`` is ``malformed``, tests/test_listing.py): the page now
    says so. Both ends of the range list the orders below them."""
    ids = [client.submit(retail_order(f"cur-{n}"))["order_id"] for n in range(2)]
    for after in ("O" + "9" * 12, "O" + "9" * 40, ids[1]):
        reply = client.request({"type": "list_orders", "after": after})
        assert reply["type"] == "orders", (after, reply)
        listed = [o["order_id"] for o in reply["orders"]]
        assert listed == [i for i in reversed(ids) if i < after], (after, listed)
    for after in ("O" + "9" * 11, "O" + "9" * 41, "O1", "O", "o" + "1" * 12,
                  "O" + "\u0661" * 12):
        reply = client.request({"type": "list_orders", "after": after})
        assert (reply["type"], reply.get("code")) == ("error", "malformed"), (after, reply)
    contract = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert "`O` followed by 12 to 40 digits" in contract
    assert "at most 64 characters: ids below it" not in contract


# -- cancel_order's operator: checked whatever the order's state ---------------------------


def test_a_bad_operator_in_a_cancel_is_malformed_also_for_a_finished_order(
        service: Any, client: Client, sim: Any) -> None:
    """§1: a bad ``operator`` is ``malformed``. ``cancel_order`` checked it
    only for an unfinished order: for a finished (or archived) one it
    answered ``cancel_rejected``, so the same request got two answers by
    the order's state (``retry_step`` and the others check it first)."""
    order_id = client.submit(retail_order("op-done"))["order_id"]
    assert wait_terminal(client, [order_id], timeout=20)[order_id]["state"] == "completed"
    for operator in ("", "x" * 65, 5):
        reply = client.request({"type": "cancel_order", "order_id": order_id,
                                "operator": operator})
        assert (reply["type"], reply.get("code")) == ("error", "malformed"), (operator, reply)
    fine = client.request({"type": "cancel_order", "order_id": order_id, "operator": "ann"})
    assert fine["type"] == "cancel_rejected", fine


@pytest.mark.usefixtures("secure")
def test_with_curve_a_channels_cancel_naming_an_operator_is_unauthorized_in_every_state(
        eps: Any, tmp_path: Path) -> None:
    """§1 "Cancelling" and §6: with CURVE on, a channel's cancel with
    ``operator`` is ``error`` ``unauthorized``. For a finished order it was
    ``cancel_rejected``: a channel could probe with a forged operator name
    and be answered as if it were allowed to."""
    with Client(eps.intake, curve=opts(tmp_path / "keys", "web")) as web:
        order_id = web.submit(retail_order("sec-op-done"))["order_id"]
        assert wait_terminal(web, [order_id], timeout=20)[order_id]["state"] == "completed"
        for req in ({"order_id": order_id}, {"source_system": "web",
                                             "external_id": "sec-op-done"}):
            forged = web.request({"type": "cancel_order", "operator": "operator-bob", **req})
            assert (forged["type"], forged.get("code")) == ("error", "unauthorized"), forged
        plain = web.request({"type": "cancel_order", "order_id": order_id})
        assert plain["type"] == "cancel_rejected", plain


# -- error messages that send the client the wrong way -------------------------------------


def test_malformed_messages_say_what_the_contract_asks(service: Any, client: Client) -> None:
    """A ``malformed`` reply's message is what a client author reads to fix
    the request. An operator request without ``order_id`` was told "give
    order_id, or source_system and external_id", which §5 does not offer
    (giving both is ``malformed`` again); a ``list_orders`` filter string over
    1,000 characters was told it "must be a string"."""
    for action in ("retry_step", "skip_step", "abort_order"):
        reply = client.request({"type": action, "source_system": "web",
                                "external_id": "x"})
        assert reply.get("code") == "malformed", reply
        assert "source_system" not in reply["message"] and "order_id" in reply["message"]
    for name in ("state_reason", "customer_id", "external_id"):
        reply = client.request({"type": "list_orders", name: "x" * 1001})
        assert reply.get("code") == "malformed", reply
        assert "1000 characters" in reply["message"], reply


# -- oms archive on a folder that is no data folder ---------------------------------------


def test_oms_archive_on_a_folder_that_is_no_data_folder_says_so(
        tmp_path: Path, capsys: Any) -> None:
    """``oms archive`` reads the data folder directly, by default
    ``./oms-data``. Run from the wrong directory, or with a mistyped
    ``--data``, it answered "0 files" (exit 0) and "no such order in the
    archive": an operator was told an order is not archived when the
    archive was never looked at. Now a clear error, exit 2; a real data
    folder with nothing archived yet still lists 0 files."""
    from app.cli import main

    for wrong in (tmp_path / "nope", tmp_path / "file", tmp_path / "empty"):
        if wrong.name == "file":
            wrong.write_text("x")
        elif wrong.name == "empty":
            wrong.mkdir()
        for args in (["list"], ["find", "O000000000001"]):
            assert main(["archive", "--data", str(wrong), *args]) == 2, (wrong, args)
            err = capsys.readouterr().err
            assert f"{wrong} is not an oms data folder" in err, err
    real = tmp_path / "data"
    real.mkdir()
    (real / "data.mdb").write_bytes(b"")
    assert main(["archive", "--data", str(real), "list"]) == 0
    assert "0 files" in capsys.readouterr().out
    assert main(["archive", "--data", str(real), "find", "O000000000001"]) == 1
    assert "no such order in the archive" in capsys.readouterr().err


# -- nil for an optional field ------------------------------------------------------------


def test_an_optional_request_field_sent_as_nil_is_the_same_as_left_out(
        service: Any, client: Client) -> None:
    """Clients in other languages often write an absent optional field as
    nil. The intake took nil as "left out" for most optional fields
    (``delivery_address``, ``attributes``, ``customer.name``, ``reason``,
    ``operator``, ``after``...) but refused it for the ones with a default:
    ``order_type`` ("unknown order type None"), ``currency``, an item's
    ``action`` and ``list_orders``' ``limit``. Now the default applies, and
    the order is the same payload as one that leaves them out."""
    order = retail_order("nil-1")
    accepted = client.submit(order)
    assert accepted["type"] == "accepted", accepted
    nils = dict(retail_order("nil-1"), order_type=None, currency=None,
                items=[dict(i, action=None) for i in order["items"]])
    again = client.submit(nils)
    assert (again["type"], again.get("order_id"), again.get("duplicate")) == (
        "accepted", accepted["order_id"], True), again
    listed = client.request({"type": "list_orders", "limit": None})
    assert listed["type"] == "orders" and listed["orders"], listed


@pytest.mark.slow
def test_behind_the_sharded_front_a_nil_limit_is_the_default_too(
        procs: Any, tmp_path: Path) -> None:
    """The front merges the shards' pages up to ``limit``: it must read a
    nil ``limit`` as the shards do (100), not compare a page with nil."""
    s = Sharded(procs, tmp_path)
    with s.client(timeout=30) as client:
        ids = {client.submit(retail_order(f"nil-front-{n}", customer={"id": f"c-{n}"}))[
            "order_id"] for n in range(4)}
        listed = client.request({"type": "list_orders", "limit": None})
        assert listed["type"] == "orders", listed
        assert {o["order_id"] for o in listed["orders"]} == ids and listed["next"] is None
        assert client.request({"type": "order_counts"})["type"] == "order_counts"


# -- the metrics port serves what docs/metrics.md and docs/operations.md name ---------------


def test_the_metrics_port_answers_404_outside_its_three_paths() -> None:
    """``/metrics``, ``/readyz`` and ``/healthz`` are documented; every other
    path (``/``, ``/nope``, ``/metrics/../etc/passwd``) was answered 200 with
    the metrics, so a typo in a probe's path (``/ready``) looked healthy."""
    from prometheus_client import CollectorRegistry, Counter

    from actors.http import health_app

    registry = CollectorRegistry()
    Counter("oms_probe_total", "a probe", registry=registry).inc()
    app = health_app(registry, ready=lambda: True)

    def get(path: str) -> tuple[str, bytes]:
        status: list[str] = []
        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
                            lambda s, headers: status.append(s)))
        return status[0], body

    assert get("/metrics")[0].startswith("200") and b"oms_probe_total" in get("/metrics")[1]
    assert get("/readyz") == ("200 OK", b"ready\n") and get("/healthz") == ("200 OK", b"ok\n")
    for path in ("/", "/nope", "/ready", "/metrics/../etc/passwd", "/metricsx"):
        status, body = get(path)
        assert status.startswith("404") and b"oms_probe_total" not in body, (path, status)
        assert b"/metrics" in body, body


def test_a_key_given_twice_counts_its_last_value(service: Any, eps: Any) -> None:
    """The encoding section now says what a map holding a key twice means
    (written down, not changed): the last value counts, here over a raw
    DEALER, whichever decoder reads the frame."""
    import zmq

    frame = (b"\x83\xa4type\xa9get_order\xa4type\xacorder_counts"
             b"\xaarequest_id\xa3dup")
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(eps.intake)
    try:
        dealer.send(frame)
        assert dealer.poll(10_000), "no reply"
        reply = codec.unpack(dealer.recv())
    finally:
        dealer.close()
    assert reply["type"] == "order_counts" and reply["request_id"] == "dup", reply
