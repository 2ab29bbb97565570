"""What a slice hands over instead of copying (session 9).

The engine appends a message's effects to the list it is given (the order
actor's for its slice) and the actor hands that list, and its consumed
keys, to the writer as they are; the writer takes a ``Bundle`` of writes
bare; a state's or status's string in an event, the history and an item
is the member's own plain string. Here: the edges of each. A handler that
raises after its engine decided something sends none of it (the list the
effects went into leaves with the crashed actor); a bundle of writes, bare
or mixed with other mail, runs each stored write's effects once, in the
order told, and none of a write that failed alone; and every string that
reaches the wire or the record is a plain ``str``, also after a restart
from a record and on the way to a failed order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Endpoints
from helpers import Driver, Probe, ok_domain, poll_until, retail_order
from test_save_path import OnceInvoiced, held_and_unsent

from actors.effects import Collect, Tell
from actors.loop import burst
from oms import snapshot
from oms.engine import Engine, Turning
from oms.errors import DomainError
from oms.messages import CommandResult, Publish, Send, Start
from oms.model import Order
from oms.process import builtin_processes

# -- the engine appends to the list it is given ---------------------------------------


def test_the_engine_appends_to_the_list_it_is_given_and_keeps_what_was_there() -> None:
    proc = builtin_processes()["retail"]
    d = Driver(proc, retail_order("handover-1"), ok_domain())
    engine = Engine(proc)
    earlier = object()  # an effect an earlier message of the slice decided
    slice_effects: list[Any] = [earlier]
    turning = engine.handle(d.order, Start(), 1000.0, slice_effects)
    assert turning.effects is slice_effects
    assert slice_effects[0] is earlier and len(slice_effects) > 1
    assert any(isinstance(fx, Send) for fx in slice_effects[1:])
    # without a list, each message gets its own, as before
    again = engine.handle(d.order, CommandResult("nobody:x", True, {}), 1000.1)
    assert again.effects == [] and again.effects is not slice_effects and again.stale


# -- a handler that raises after its engine decided, in a real service -------------------


class _RaisesAfterDeciding(OnceInvoiced):
    """The message that completes an order's ``create_invoice`` raises *after*
    the engine appended its effects (the ``capture_payment`` command) to the
    actor's list."""

    def misbehave(self, order: Order, turning: Turning) -> None:
        assert any(isinstance(fx, Send) and fx.op == "capture_payment"
                   for fx in turning.effects)  # decided, in the actor's list
        raise RuntimeError("a bug after the engine decided")


def test_a_handler_that_raises_after_deciding_sends_nothing_it_decided(
        make_service: Any, sim: Any, eps: Endpoints) -> None:
    """The order failure rule holds with the effects already in the slice's
    list: the order is reloaded and held as ``internal_error``, and the
    command the crashed message decided never goes out; others complete."""
    held_and_unsent(make_service(), sim, eps, _RaisesAfterDeciding, "raises-after",
                    "RuntimeError")


# -- a bundle of writes, bare or mixed, through the real writer and LMDB ----------------------


def _writer(tmp_path: Path) -> tuple[Any, Any]:
    from prometheus_client import CollectorRegistry

    from actors.metrics import Metrics
    from actors.store_writer import StoreWriter
    from storage.store import MIB, Store

    store = Store(tmp_path / "store", map_size=MIB)
    fatal: list[str] = []
    writer = StoreWriter.launch(store, Metrics(CollectorRegistry()), fatal=fatal.append)
    writer.fatal_calls = fatal
    return writer, store


def _close(writer: Any, store: Any) -> None:
    writer.actor_ref.stop(block=True, timeout=10)
    writer.join(5)
    store.close()


def _stored(store: Any, order_id: str) -> bytes | None:
    with store.read() as txn:
        raw = txn.get(order_id.encode(), db=store.db["orders"])
    return None if raw is None else bytes(raw)


def _saves(ran: list[str], *ids: str) -> list[Any]:
    from actors.store_writer import SaveOrder

    return [SaveOrder(oid, f"record of {oid}".encode(), True, [], [
        Tell(Probe(lambda _m, o=oid: ran.append(o)), "saved")]) for oid in ids]


def test_a_bundle_of_writes_is_taken_bare_and_runs_each_stored_write_once_in_order(
        tmp_path: Path) -> None:
    """Snapshots (one with an id LMDB refuses: it fails alone), a barrier and
    a domain event told in one burst reach the writer as one bundle: every
    stored snapshot's effects run once, in the order told, after the
    commit; the refused one's never; the event is recorded."""
    from actors.store_writer import Barrier, RecordEvent

    writer, store = _writer(tmp_path)
    try:
        ran: list[str] = []
        recorded: list[Any] = []
        first, refused, last = _saves(ran, "O000000000001", "", "O000000000002")
        with burst():
            writer.tell(first)
            writer.tell(refused)  # an empty key: BadValsizeError, this write alone
            writer.tell(Barrier([Tell(Probe(lambda _m: ran.append("barrier")), "b")]))
            writer.tell(RecordEvent("O000000000001", "shipping", "ev-1", {}, Collect(recorded)))
            writer.tell(last)
        poll_until(lambda: len(ran) == 3 and recorded, timeout=10)
        assert ran == ["O000000000001", "barrier", "O000000000002"]
        assert recorded == ["recorded"] and writer.fatal_calls == []
        assert _stored(store, "O000000000001") == b"record of O000000000001"
        assert _stored(store, "O000000000002") == b"record of O000000000002"
        assert writer.healthy
    finally:
        _close(writer, store)


def test_a_bundle_that_mixes_writes_with_other_mail_keeps_its_order(tmp_path: Path) -> None:
    """A bundle with a message that is not a write goes the told way (each in
    a ``Told``), as before: the writes are committed and their effects run
    in order, the other message is handled after them, and the writer goes
    on with the next bundle, taken bare."""
    writer, store = _writer(tmp_path)
    try:
        ran: list[str] = []
        a, b, c = _saves(ran, "O000000000011", "O000000000012", "O000000000013")
        with burst():
            writer.tell(a)
            writer.tell("not a write")  # pykka's on_receive: logged, survived
            writer.tell(b)
        poll_until(lambda: len(ran) == 2, timeout=10)
        with burst():
            writer.tell(c)
        poll_until(lambda: len(ran) == 3, timeout=10)
        assert ran == ["O000000000011", "O000000000012", "O000000000013"]
        assert all(_stored(store, o) == f"record of {o}".encode() for o in ran)
        assert writer.alive() and writer.fatal_calls == []
    finally:
        _close(writer, store)


# -- the strings that reach the wire and the record -------------------------------------


def _plain_strings(d: Driver) -> None:
    """Every state, status and previous state in an event, the history and
    the items is an exact ``str`` (the member's own string), never the enum."""
    for fx in d.effects:
        if isinstance(fx, Publish):
            for key in ("state", "status", "previous_state"):
                if key in fx.payload:
                    assert type(fx.payload[key]) is str, (key, fx.payload)
        if isinstance(fx, Send) and fx.system == "crm":
            assert type(fx.args["state"]) is str
    assert all(type(entry["state"]) is str for entry in d.order.history)
    assert all(type(item["state"]) is str for item in d.order.items)


def test_states_reach_events_history_and_items_as_plain_strings_after_a_restart() -> None:
    """Half an order, then its record decoded (its members come back as enum
    members), then the rest: plain strings throughout, and the record of
    the finished order is the same bytes as its decoded order's."""
    proc = builtin_processes()["retail"]
    d = Driver(proc, retail_order("plain-1"), ok_domain({"create_shipment": None}))
    d.start()
    d.order = snapshot.decode(snapshot.encode(d.order))  # a restart from the record
    d.effects.clear()
    pending = next(s for s in d.sent if s.op == "create_shipment")
    d.feed(CommandResult(pending.command_id, True, {"shipment_id": "s1",
                                                    "tracking_number": "T1"}))
    d.event("shipment_delivered", {})
    assert d.order.state == "completed"
    _plain_strings(d)
    record = snapshot.encode(d.order)  # the same bytes as from the decoded (enum) order
    assert snapshot.encode(snapshot.decode(record)) == record


def test_states_are_plain_strings_on_the_way_to_a_failed_order() -> None:
    """A payment refused for good: compensation, items failed, the order
    failed; every string on the way is plain."""
    proc = builtin_processes()["retail"]
    refused = CommandResult("", False, None, DomainError("card_declined", "no", False))
    d = Driver(proc, retail_order("plain-2"), ok_domain({"capture_payment": refused}))
    d.start()
    assert d.order.state == "failed", d.order.state
    assert {item["state"] for item in d.order.items} == {"failed"}
    _plain_strings(d)
