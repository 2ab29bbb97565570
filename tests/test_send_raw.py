"""A command carries its step's kept argument bytes (``Send.raw``, from
``oms.model.kept``) and the gateway sends those bytes as they are, instead
of encoding the map again: on the wire nothing differs, byte for byte, and
where there are no kept bytes (a map msgspec cannot encode, a step loaded
from a record, an undo) the map is encoded as before."""

from __future__ import annotations

import msgspec
from conftest import CommandSink
from helpers import Driver, normalized, ok_domain, retail_order
from test_engine import RETAIL

from gateways.gateway import Gateway
from oms import snapshot
from oms.engine import Engine, new_order
from oms.messages import Send, Start
from oms.model import Step

ARGS = {"items": [{"product_id": "p-1", "quantity": 2}], "total_minor": 2**40,
        "note": "ü ✓", "delivery_address": {"line1": "1 Main St", "city": "Berlin"}}


def test_kept_bytes_go_out_exactly_as_the_map_would(wired: tuple[Gateway, CommandSink]) -> None:
    gw, domain = wired
    raw = msgspec.Raw(msgspec.msgpack.encode(ARGS))
    gw.send("O1", Send("billing", "O1:a", "create_invoice", ARGS, 10.0, raw))
    gw.send("O1", Send("billing", "O1:b", "create_invoice", ARGS, 10.0))
    with_raw, with_map = domain.frame(), domain.frame()
    assert with_raw.replace(b"O1:a", b"O1:b") == with_map
    assert msgspec.msgpack.decode(with_raw)["args"] == ARGS


def test_a_step_without_kept_bytes_gives_its_command_none() -> None:
    """A map msgspec cannot encode is kept as the map (``oms.model.kept``):
    its command has no bytes and the gateway encodes the map, as before."""
    assert Step("k", "k", "s", "op", args={"a": object()}).kept_args() is None
    assert Step("k", "k", "s", "op", args=None).kept_args() is None


def test_the_engine_hands_each_command_its_steps_kept_bytes() -> None:
    """Launches and CRM notes carry the step's own bytes; a resend after a
    reload (its arguments decoded from the record) and an undo carry none."""
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    turning = Engine(RETAIL).handle(order, Start(), 2.0)
    sends = [fx for fx in turning.effects if type(fx) is Send]
    assert len(sends) == 2
    for send in sends:
        assert send.raw is not None and bytes(send.raw) == msgspec.msgpack.encode(send.args)
    assert sends[1].raw is order.steps["reserve_stock"].args
    assert sends[0].raw is order.notes[0].args
    reloaded = snapshot.decode(snapshot.encode(order))
    assert reloaded.steps["reserve_stock"].kept_args() is None  # a map again, once loaded


def test_a_whole_order_sends_the_same_maps_with_or_without_kept_bytes() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain())
    d.start()
    d.event("shipment_delivered", {})
    assert d.order.state == "completed"
    assert d.sent and all(
        s.raw is None or bytes(s.raw) == msgspec.msgpack.encode(s.args) for s in d.sent)
    assert any(s.raw is not None for s in d.sent)
