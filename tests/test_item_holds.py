"""A per-item step's holds: which one a domain event releases (contract §3,
``oms.holds``).

Each item of a per-item step with a ``hold_when`` waits for the same event
from the same system. Without ``match`` the event goes to the step whose
reply the event names: a value the event's ``data`` shares under the same
key with that step's reply and with no other waiting step's (the
``reservation_id`` of a ``backordered`` reply, as the reference warehouse
sends it back in ``stock_reserved``). An event that names none of them, or
several, goes to the first waiting one, as before. Found by the session 10
review: the first waiting item was released by any item's event and moved on
early.

With ``match = "reservation_id"`` (the shipped retail declares it) an event
releases only a step whose reply has its ``reservation_id``, or any when it
has none; one naming another is kept early for the step whose reply will
carry it. Found by an earlier review, closed in session 12: an event for
item B that came before B's reply went to the one waiting item A (and A, as
it replied, took B's early event), so A went on before its stock was
reserved and B was left to A's event, or to none. The real engine, driven
as the order actor drives it; the last test over the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import Driver, ok_domain, poll_until, retail_order

from app.processes_cli import render_process
from gateways.client import Client, wait_terminal
from gateways.sim_domain import SimConfig
from oms import codec, snapshot
from oms.engine import MAX_EARLY_EVENTS
from oms.holds import Hold
from oms.messages import CommandResult, Send
from oms.process import ProcessError, builtin_processes, parse_process

KIT = '''
[process]
order_type = "retail"  # (a custom retail: a service given it runs it instead of its own)
failure_policy = "compensate"
[steps.reserve.hold_when]
field = "status"
equals = "backordered"
reason = "awaiting_stock"
until_event = "stock_reserved"
[steps.reserve.per_item.add]
system = "warehouse"
op = "reserve_stock"
args = { items = [{ product_id = "$item.product_id", quantity = "$item.quantity" }] }
[steps.ship]
after = ["reserve"]
[steps.ship.per_item.add]
system = "shipping"
op = "create_shipment"
args = { items = [{ product_id = "$item.product_id", quantity = "$item.quantity" }] }
'''


def kit_order(*ids: str) -> dict[str, Any]:
    return {"source_system": "web", "external_id": "kit-1", "order_type": "retail",
            "customer": {"id": "c-1"},
            "customer_address": {"line1": "1 Main St", "city": "Berlin",
                                 "postal_code": "10115", "country": "DE"},
            "items": [{"id": i, "product_id": f"p-{i}", "quantity": 1} for i in ids]}


def backordered(ids: list[str]) -> Any:
    """Every reservation back-ordered, each with its own id (``r-<item>``)."""
    base = ok_domain()

    def reply(cmd: Send) -> CommandResult | None:
        if cmd.op != "reserve_stock":
            return base(cmd)
        item = cmd.command_id.rsplit("[", 1)[1].rstrip("]")
        ids.append(item)
        return CommandResult(cmd.command_id, True, {"reservation_id": f"r-{item}",
                                                    "status": "backordered"})
    return reply


def statuses(d: Driver) -> dict[str, str]:
    return {key: str(step.status) for key, step in d.order.steps.items()}


def started(*items: str) -> Driver:
    proc = parse_process(KIT, "kit.toml")
    reserved: list[str] = []
    d = Driver(proc, kit_order(*items), backordered(reserved))
    d.start()
    assert sorted(reserved) == sorted(items)
    assert d.order.state == "held" and d.order.state_reason == "awaiting_stock"
    return d


def test_the_event_releases_the_item_whose_reservation_it_names() -> None:
    d = started("a", "b", "c")
    d.event("stock_reserved", {"reservation_id": "r-b"}, system="warehouse")
    assert [statuses(d)[f"reserve[{i}]"] for i in "abc"] == ["running", "done", "running"]
    assert d.order.state == "held"  # two items still wait for stock
    d.event("stock_reserved", {"reservation_id": "r-c", "status": "reserved"},
            system="warehouse")
    assert [statuses(d)[f"reserve[{i}]"] for i in "abc"] == ["running", "done", "done"]
    assert not [s for s in d.sent if s.op == "create_shipment"]  # (after every item)
    d.event("stock_reserved", {"reservation_id": "r-a"}, system="warehouse")
    assert d.order.state == "completed", statuses(d)
    assert sorted(s.command_id for s in d.sent if s.op == "create_shipment") == [
        "o-1:ship[a]", "o-1:ship[b]", "o-1:ship[c]"]


def test_an_event_that_names_no_waiting_item_releases_the_first_as_before() -> None:
    """No distinguishing value (none at all, a value every reply has, or an
    unknown reservation): the first waiting item, as before this rule."""
    d = started("a", "b", "c")
    for data in ({}, {"status": "backordered"}, {"reservation_id": "r-zzz"}):
        d.event("stock_reserved", data, system="warehouse")
    assert [statuses(d)[f"reserve[{i}]"] for i in "abc"] == ["done", "done", "done"]
    assert d.order.state == "completed", statuses(d)


def test_the_event_of_a_released_item_goes_to_none_of_the_others() -> None:
    """An item's event again after its hold ended: no waiting step has its
    value, so it goes to the first waiting one: as before; the order ends."""
    d = started("a", "b")
    d.event("stock_reserved", {"reservation_id": "r-b"}, system="warehouse")
    d.event("stock_reserved", {"reservation_id": "r-a"}, system="warehouse")
    assert d.order.state == "completed", statuses(d)


# -- a declared match (session 12): an event never releases another item -----

MATCHED = KIT.replace('until_event = "stock_reserved"\n',
                      'until_event = "stock_reserved"\nmatch = "reservation_id"\n')


def replied_by_hand(*items: str, text: str = MATCHED) -> Driver:
    """Reservations sent, no reply yet: ``reply`` feeds each (back-ordered)."""
    base = ok_domain()
    d = Driver(parse_process(text, "kit.toml"), kit_order(*items),
               lambda cmd: None if cmd.op == "reserve_stock" else base(cmd))
    d.start()
    assert sorted(s.command_id for s in d.sent) == sorted(f"o-1:reserve[{i}]" for i in items)
    return d


def reply(d: Driver, item: str) -> None:
    d.feed(CommandResult(f"o-1:reserve[{item}]", True,
                         {"reservation_id": f"r-{item}", "status": "backordered"}))


def stock(d: Driver, item: str, **more: Any) -> None:
    d.event("stock_reserved", {"reservation_id": f"r-{item}", **more}, system="warehouse")


def held(d: Driver, *items: str) -> list[str]:
    """Which of ``items`` are held (their reserve step still running)."""
    return [i for i in items if statuses(d)[f"reserve[{i}]"] == "running"]


def test_an_event_before_its_items_reply_waits_for_it_not_for_the_waiting_item() -> None:
    d = replied_by_hand("a", "b")
    reply(d, "a")
    stock(d, "b")  # b's stock, before b's reply: a waits, b does not yet
    assert held(d, "a", "b") == ["a", "b"] and d.order.state == "held"
    assert [e["data"] for e in d.order.early_events] == [{"reservation_id": "r-b"}]
    d.order = snapshot.decode(snapshot.encode(d.order))  # (a restart: all of it is stored)
    reply(d, "b")  # b takes its early event as its hold begins
    assert held(d, "a", "b") == ["a"] and d.order.early_events == []
    assert (d.order.state, d.order.state_reason) == ("held", "awaiting_stock")
    assert not [s for s in d.sent if s.op == "create_shipment"]
    stock(d, "a")
    assert d.order.state == "completed", statuses(d)


@pytest.mark.parametrize("events", ["ab", "ba"])
@pytest.mark.parametrize("replies", ["ab", "ba"])
def test_events_before_both_replies_go_to_their_own_items(events: str, replies: str) -> None:
    d = replied_by_hand("a", "b")
    for item in events:
        stock(d, item)
    assert len(d.order.early_events) == 2
    first, second = replies
    reply(d, first)
    assert held(d, "a", "b") == [second]
    assert d.order.early_events == [{"system": "warehouse", "name": "stock_reserved",
                                     "data": {"reservation_id": f"r-{second}"}}]
    reply(d, second)
    assert d.order.state == "completed", statuses(d)


@pytest.mark.parametrize("events", ["ab", "ba"])
def test_events_after_both_replies_go_to_their_own_items(events: str) -> None:
    d = replied_by_hand("a", "b")
    reply(d, "a")
    reply(d, "b")
    first, second = events
    stock(d, first, status="reserved")  # (a status unlike the reply's: names nobody)
    assert held(d, "a", "b") == [second]
    stock(d, second)
    assert d.order.state == "completed", statuses(d)


def test_an_event_naming_nobody_still_releases_a_waiting_item() -> None:
    """No reservation id (or a null one): any waiting item, as before match."""
    d = replied_by_hand("a", "b")
    reply(d, "a")
    d.event("stock_reserved", {"status": "available"}, system="warehouse")
    assert held(d, "a", "b") == ["b"]
    reply(d, "b")
    d.event("stock_reserved", {"reservation_id": None}, system="warehouse")
    assert d.order.state == "completed", statuses(d)


def test_a_hold_takes_the_early_event_naming_it_before_one_naming_nobody() -> None:
    d = replied_by_hand("a", "b")
    d.event("stock_reserved", {}, system="warehouse")
    stock(d, "a")
    reply(d, "a")  # r-a, though the event naming nobody came first
    assert [e["data"] for e in d.order.early_events] == [{}]
    reply(d, "b")
    assert d.order.state == "completed", statuses(d)


def test_events_naming_unknown_reservations_are_kept_bounded_and_release_nothing() -> None:
    d = replied_by_hand("a", "b")
    reply(d, "a")
    for n in range(MAX_EARLY_EVENTS + 4):
        d.event("stock_reserved", {"reservation_id": f"r-zzz{n}"}, system="warehouse")
    reply(d, "b")
    assert held(d, "a", "b") == ["a", "b"] and d.order.state == "held"
    early = [e["data"]["reservation_id"] for e in d.order.early_events]
    assert early == [f"r-zzz{n}" for n in range(4, MAX_EARLY_EVENTS + 4)]  # oldest dropped
    stock(d, "b")
    stock(d, "a")
    assert d.order.state == "completed", statuses(d)
    assert len(d.order.early_events) == MAX_EARLY_EVENTS  # never applied to an item


def test_without_match_an_early_event_goes_to_the_first_hold_as_before() -> None:
    """A definition that declares no match keeps the old rule (pinned)."""
    d = replied_by_hand("a", "b", text=KIT)
    stock(d, "b")
    reply(d, "a")
    assert held(d, "a", "b") == ["b"]


def test_the_retail_hold_is_released_by_its_own_reservation_or_an_event_naming_none() -> None:
    retail = builtin_processes()["retail"]
    assert retail.step("reserve_stock").hold == Hold(
        "status", "backordered", "awaiting_stock", "stock_reserved", None, "reservation_id")
    for data in ({"reservation_id": "r-9"}, {}):
        d = Driver(retail, retail_order(), ok_domain({"reserve_stock": CommandResult(
            "", True, {"reservation_id": "r-9", "status": "backordered"})}))
        d.start()
        d.event("stock_reserved", {"reservation_id": "r-8"}, system="warehouse")
        assert (d.order.state, d.order.state_reason) == ("held", "awaiting_stock")
        d.event("stock_reserved", data, system="warehouse")
        assert d.order.state == "inProgress" and "create_invoice" in d.ops()


@pytest.mark.parametrize("match, problem", [
    ('"status"', "must be another field than `field`"),
    ("5", "must be a non-empty string"),
    ('""', "must be a non-empty string"),
    ('["reservation_id"]', "must be a non-empty string"),
])
def test_a_match_that_cannot_name_a_hold_is_refused_at_load(match: str, problem: str) -> None:
    with pytest.raises(ProcessError, match=rf"steps\.reserve\.hold_when\.match: {problem}"):
        parse_process(MATCHED.replace('"reservation_id"', match), "kit.toml")


def test_show_says_what_a_holds_event_must_name() -> None:
    text = render_process(builtin_processes()["retail"])
    assert ("until stock_reserved with the same reservation_id (or none), without a time "
            "limit") in text
    assert "with the same" not in render_process(parse_process(KIT, "kit.toml"))


# -- over the wire: the service loads the match, the warehouse is simulated ----

@pytest.fixture
def sim_config(eps: Any) -> SimConfig:
    """Both kit products out of stock; the simulated warehouse sends no
    ``stock_reserved`` itself (an hour away): the test does, by hand."""
    return SimConfig(systems=dict(eps.systems), service_events=eps.domain_events,
                     stock_of={"p-a": 0, "p-b": 0}, restock_s=3600.0, seed=1)


def push(ep: str, order_id: str, reservation_id: str, **more: Any) -> None:
    """One ``stock_reserved`` from the warehouse, as a DEALER pushes it (acked);
    ``more``: more of its ``data``."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    try:
        ev = {"type": "event", "event_id": f"ev-{reservation_id}", "system": "warehouse",
              "order_id": order_id, "name": "stock_reserved",
              "data": {"reservation_id": reservation_id, **more}}
        sock.send(codec.pack(ev))
        assert sock.poll(10_000), "no answer to a domain event"
        assert codec.decode_map(sock.recv()) == {"type": "ack", "event_id": ev["event_id"]}
    finally:
        sock.close()


def both_backordered(tmp_path: Path, make_service: Any, client: Client) -> tuple[
        str, Callable[[], dict[str, dict[str, Any]]], dict[str, str]]:
    """A service on the kit process (``MATCHED``) and a kit order of items
    a and b, both back-ordered: its id, its steps (read now), each item's
    reservation id."""
    folder = tmp_path / "procs"
    folder.mkdir()
    (folder / "kit.toml").write_text(MATCHED)
    make_service(processes=str(folder))
    oid = client.submit(kit_order("a", "b"))["order_id"]

    def steps() -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in client.get(oid)["order"]["steps"]}

    waiting = poll_until(lambda: all(  # both back-ordered, each with its own reservation
        steps()[f"reserve[{i}]"].get("result", {}).get("status") == "backordered"
        for i in "ab") and steps(), timeout=30)
    return oid, steps, {i: waiting[f"reserve[{i}]"]["result"]["reservation_id"] for i in "ab"}


def test_over_the_wire_each_items_event_releases_only_that_item(
        tmp_path: Path, make_service: Any, sim: Any, eps: Any, client: Client) -> None:
    oid, steps, rid = both_backordered(tmp_path, make_service, client)
    assert rid["a"] != rid["b"]
    push(eps.domain_events, oid, "res-unknown")  # names no item: kept, releases none
    push(eps.domain_events, oid, rid["b"])
    poll_until(lambda: steps()["reserve[b]"]["status"] == "done", timeout=30)
    view = client.get(oid)["order"]
    assert (view["state"], view["state_reason"]) == ("held", "awaiting_stock")
    assert {s["name"]: s["status"] for s in view["steps"]}["reserve[a]"] == "running"
    push(eps.domain_events, oid, rid["a"])
    assert wait_terminal(client, [oid], timeout=30)[oid]["state"] == "completed"
