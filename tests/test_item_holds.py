"""A per-item step's holds: which one a domain event releases (contract §3).

Each item of a per-item step with a ``hold_when`` waits for the same event
from the same system. The event goes to the step whose reply the event
names: a value the event's ``data`` shares under the same key with that
step's reply and with no other waiting step's (the ``reservation_id`` of a
``backordered`` reply, as the reference warehouse sends it back in
``stock_reserved``). An event that names none of them, or several, goes to
the first waiting one, as before. Found by the session 10 review: the
first waiting item was released by any item's event and moved on early.
The real engine, driven as the order actor drives it.
"""

from __future__ import annotations

from typing import Any

from helpers import Driver, ok_domain

from oms.messages import CommandResult, Send
from oms.process import parse_process

KIT = '''
[process]
order_type = "retail"  # (a custom retail: the engine alone, no service)
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
