"""The snapshot record (``oms.snapshot``): version 2 is the ``Order`` itself
as a msgpack array, decoded straight back into the classes; version 1
records, written by earlier releases, still load everywhere a record is
read (recovery, reload, get_order, listing, the retention index, the
archive). ``data/snapshot_v1.msgpack`` holds real version 1 records and
what the release that wrote them said of each order
(``data/make_snapshot_v1.py`` made it, with that release)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from helpers import Driver, ok_domain, retail_order, thawed
from test_engine import RETAIL

from app.recovery import needs_resume
from oms import codec, snapshot
from oms.engine import Engine
from oms.messages import CommandResult, DomainEvent
from oms.model import RECORD_VERSION, Order, RecordVersionError
from oms.states import OrderState, Phase, StepStatus, Target, Undo
from storage.listing import ListFilter
from storage.records import CorruptRecord, decode_order, ext_key
from storage.store import MIB, Store

V1: dict[str, Any] = msgpack.unpackb(
    (Path(__file__).parent / "data" / "snapshot_v1.msgpack").read_bytes(), raw=False)


def _wire(value: Any) -> Any:
    """As a client sees it (tuples become lists, and so on)."""
    return codec.unpack(codec.pack(value))


@pytest.mark.parametrize("name", sorted(V1))
def test_a_version_1_record_loads_as_the_release_that_wrote_it_saw_it(name: str) -> None:
    entry = V1[name]
    raw = entry["record"]
    assert codec.unpack(raw)["v"] == 1  # really the old format
    order = snapshot.decode(raw)
    assert _wire(order.view()) == entry["view"]
    assert str(order.state) == entry["state"]
    assert order.finished == entry["finished"]
    assert needs_resume(order) == entry["needs_resume"]
    assert snapshot.record_state(raw) == entry["state"]
    assert decode_order(b"k", raw) == order
    assert snapshot._from_v1(codec.unpack(raw)) == order  # the unchecked reading agrees
    # enums are enums now (version 1 gave phase, target and undo as strings)
    assert isinstance(order.state, OrderState) and isinstance(order.phase, Phase)
    assert order.target is None or isinstance(order.target, Target)
    for step in [*order.steps.values(), *order.notes]:
        assert isinstance(step.status, StepStatus)
        assert step.comp is None or isinstance(step.comp, Undo)
    # saved again, it is version 2, and reads back the same
    again = snapshot.encode(order)
    assert codec.unpack(again)[0] == RECORD_VERSION == 2
    assert snapshot.decode(again) == order


def test_the_head_of_a_version_1_record_is_what_the_record_says() -> None:
    for entry in V1.values():
        rec, head = codec.unpack(entry["record"]), snapshot.head(entry["record"])
        assert (head.order_id, head.source_system, head.external_id, head.order_type,
                head.customer, head.created_ts, head.state, head.state_reason,
                head.updated_ts) == (rec["id"], rec["src"], rec["ext"], rec["type"],
                                     rec["cust"], rec["cts"], rec["state"], rec["reason"],
                                     rec["uts"])


def test_the_version_1_keys_follow_the_orders_fields() -> None:
    """The typed version 1 decoder hands its fields to ``Order`` by position."""
    assert tuple(snapshot.V1_KEYS) == Order.__struct_fields__
    assert set(snapshot.V1_KEYS.values()) | {"v"} == set(codec.unpack(
        V1["completed"]["record"]))


def test_a_version_1_record_from_before_jeopardy_loads() -> None:
    rec = codec.unpack(V1["completed"]["record"])
    del rec["jep"]  # the first version 1 records had no jeopardy deadlines
    order = snapshot.decode(msgpack.packb(rec, use_bin_type=True))
    assert order.jeopardy == {} and order.state == OrderState.COMPLETED


def test_an_odd_version_1_record_still_loads_as_before() -> None:
    """A value the typed decoder refuses (a map key that is not a string):
    read unchecked, as the release that wrote it read it."""
    rec = codec.unpack(V1["completed"]["record"])
    rec["steps"][0][9] = {1: "int key"}  # the first step's result
    order = snapshot.decode(msgpack.packb(rec, use_bin_type=True))
    assert order.steps["reserve_stock"].result == {1: "int key"}
    assert order.view()["state"] == "completed"


def test_version_1_orders_move_on_and_are_saved_as_version_2() -> None:
    waiting = snapshot.decode(V1["waiting_with_jeopardy"]["record"])
    engine = Engine(RETAIL)
    engine.handle(waiting, DomainEvent("e1", "shipping", "shipment_delivered", {}), 5000.0)
    assert waiting.state == OrderState.COMPLETED
    aborting = snapshot.decode(V1["aborting"]["record"])
    void = aborting.steps["create_invoice"]
    assert void.comp == Undo.RUNNING
    engine.handle(aborting, CommandResult(f"{aborting.order_id}:create_invoice:undo", True,
                                          {}), 5000.0)
    assert void.comp == Undo.DONE and aborting.steps["reserve_stock"].comp == Undo.RUNNING
    for order in (waiting, aborting):
        assert snapshot.decode(snapshot.encode(order)) == thawed(order)


def _orders() -> list[Order]:
    out = [snapshot.decode(e["record"]) for e in V1.values()]
    d = Driver(RETAIL, retail_order("fresh"), ok_domain())
    d.start()
    return [*out, d.order]


def test_version_2_is_the_order_as_an_array_and_reads_back_exactly() -> None:
    for order in _orders():
        raw = snapshot.encode(order)
        rec = codec.unpack(raw)
        assert rec[:3] == [2, order.order_id, order.source_system]
        assert len(rec) == 1 + len(Order.__struct_fields__)
        back = snapshot.decode(raw)
        assert back == thawed(order) and snapshot.encode(back) == raw
        assert back.view() == order.view()
        head = snapshot.head(raw)
        assert (head.order_id, head.state, head.state_reason, head.updated_ts,
                head.created_ts, head.customer) == (
            order.order_id, order.state, order.state_reason, order.updated_ts,
            order.created_ts, order.customer)
        assert snapshot.record_state(raw) == str(order.state)


def test_the_engines_plan_is_not_stored() -> None:
    d = Driver(RETAIL, retail_order("plan"), ok_domain({"create_shipment": None}))
    d.start()
    assert d.order.plan is not None  # the engine made one
    loaded = snapshot.decode(snapshot.encode(d.order))
    assert loaded.plan is None and loaded == thawed(d.order)
    assert snapshot.encode(loaded) == snapshot.encode(d.order)


def test_odd_values_an_order_held_in_memory_still_load() -> None:
    """Values the typed decoder refuses (map keys that are not strings, a
    float where an int was meant): the record is still read, unchecked,
    as version 1 was, rather than the order being lost."""
    order = _orders()[-1]
    order.results[1] = "int key"  # type: ignore[index]
    order.steps["reserve_stock"].result = {b"bytes": 1}  # type: ignore[dict-item]
    order.done_counter = 2.5  # type: ignore[assignment]
    raw = snapshot.encode(order)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(raw, type=Order)
    back = snapshot.decode(raw)
    assert back == thawed(order) and back.results[1] == "int key"
    assert isinstance(back.state, OrderState) and isinstance(back.phase, Phase)


def test_a_later_release_may_append_fields_and_an_earlier_one_may_lack_them() -> None:
    order = _orders()[0]
    rec = codec.unpack(snapshot.encode(order))
    longer = msgpack.packb([*rec, {"new": 1}], use_bin_type=True)
    assert snapshot.decode(longer) == order
    shorter = msgpack.packb(rec[:-1], use_bin_type=True)  # before `jeopardy` existed
    assert snapshot.decode(shorter).jeopardy == {}


@pytest.mark.parametrize("raw", [
    codec.pack({"v": 3, "id": "O1", "state": "completed"}),
    codec.pack({"id": "O1", "state": "completed"}),
    codec.pack([3, "O1", "src"]),
    codec.pack([]),
    codec.pack("completed"),
])
def test_an_unknown_version_is_refused_not_guessed(raw: bytes) -> None:
    with pytest.raises(RecordVersionError):
        snapshot.decode(raw)
    with pytest.raises(RecordVersionError):
        snapshot.head(raw)
    with pytest.raises(CorruptRecord, match="RecordVersionError"):
        decode_order(b"O1", raw)


def test_bytes_that_are_no_record_are_reported_with_their_key() -> None:
    for raw in (b"\xc1garbage", b"", codec.pack([2, "O1"])[:-1]):
        with pytest.raises(CorruptRecord) as err:
            decode_order(b"O9", raw)
        assert err.value.key == b"O9"


def test_listing_filters_read_both_versions_alike() -> None:
    filters = [ListFilter(), ListFilter(state="held"), ListFilter(reason="awaiting_stock"),
               ListFilter(source_system="crm-ui"), ListFilter(external_id="v1-done"),
               ListFilter(customer_id="c-1"), ListFilter(customer_id="c9"),
               ListFilter(created_before=999.0), ListFilter(created_before=1000.0),
               ListFilter(state="held", reason="compensating")]
    for entry in V1.values():
        old, new = entry["record"], snapshot.encode(snapshot.decode(entry["record"]))
        for flt in filters:
            assert flt.matches(snapshot.head(old)) == flt.matches(snapshot.head(new))
    assert sum(ListFilter(state="held").matches(snapshot.head(e["record"]))
               for e in V1.values()) == 2


def _store_with_v1_and_v2(data: Path) -> tuple[Store, dict[str, bytes]]:
    """Every version 1 record of the fixture, and a version 2 copy of each
    under the next ids; the unfinished ones active."""
    store = Store(data, map_size=16 * MIB)
    records: dict[str, bytes] = {}
    with store.write() as txn:
        _put_v1_and_v2(store, txn, records)
    return store, records


def _put_v1_and_v2(store: Store, txn: Any, records: dict[str, bytes]) -> None:
    for n, entry in enumerate(V1.values()):
        order = snapshot.decode(entry["record"])
        copy = msgspec.structs.replace(order, order_id=f"O{n + 101:012d}",
                                       external_id=order.external_id + "-v2")
        for oid, raw, o in ((order.order_id, entry["record"], order),
                            (copy.order_id, snapshot.encode(copy), copy)):
            txn.put(ext_key(o.source_system, o.external_id), codec.pack([oid, b"x" * 16]),
                    db=store.db["ext"])
            store.put_order(txn, oid, raw, active=not entry["finished"])
            records[oid] = raw
    txn.put(b"seq", b"200", db=store.db["meta"])


def test_the_store_reads_both_versions_everywhere(tmp_path: Path) -> None:
    store, records = _store_with_v1_and_v2(tmp_path / "data")
    try:
        scanned = dict(store.scan_active())  # recovery's scan
        assert len(scanned) == 2 * sum(not e["finished"] for e in V1.values())
        assert all(isinstance(o, Order) for o in scanned.values())
        for oid, raw in records.items():
            order = store.get_order(oid)
            assert order is not None and order == snapshot.decode(raw)
        held, _ = store.list_orders(ListFilter(state="held"), 100, None)
        assert len(held) == 4 and {o.state_reason for o in held} == {
            "awaiting_stock", "compensating"}
        one, _ = store.list_orders(ListFilter(source_system="web", external_id="v1-done"),
                                   10, None)
        assert [o.order_id for o in one] == ["O000000000001"]
        # a resubmission of a stored order is a duplicate with its state, either version
        with store.read() as txn:
            for ext in ("v1-cancel", "v1-cancel-v2"):
                dup = store.create_order(txn, "web", ext, b"x" * 16, None)
                assert (dup.kind, dup.state) == ("duplicate", "cancelled")
        # the retention index: finished orders indexed by their state, old ones found
        # by the upgrade scan from their record's updated_ts and state
        _since, _cursor, found = store.backfill_scan(10**15, 100, store.last_order_key())
        states = sorted(state for _key, state in found)
        assert states == sorted(2 * ["completed", "cancelled", "partial"])
        assert all(ms // 1000 > 999 for ms in (int.from_bytes(k[:8], "big")
                                               for k, _ in found))
    finally:
        store.close()


def test_a_service_recovers_an_older_releases_data(make_service: Any, sim: Any,
                                                   eps: Any, tmp_path: Path) -> None:
    """A data folder written by the release before: the service starts on it,
    counts and resumes its orders, serves and lists them, and the orders it
    moves on are saved as version 2."""
    from gateways.client import Client, wait_terminal

    store, _ = _store_with_v1_and_v2(tmp_path / "data")
    store.close()
    svc = make_service()
    with Client(eps.intake) as client:
        for name in ("completed", "cancelled", "telecom_partial",
                     "backordered_with_early_event"):  # finished, or untouched by recovery
            view = V1[name]["view"]
            assert client.get(view["order_id"])["order"] == view
        # resumed: the order backing off its invoice completes
        done = wait_terminal(client, ["O000000000003", "O000000000103"], timeout=30)
        assert {v["state"] for v in done.values()} == {"completed"}
        listed = client.request({"type": "list_orders", "state": "held",
                                 "state_reason": "awaiting_stock"})["orders"]
        assert sorted(o["order_id"] for o in listed) == ["O000000000004", "O000000000104"]
    with svc.store.read() as txn:
        raw = txn.get(b"O000000000003", db=svc.store.db["orders"])
    assert codec.unpack(raw)[0] == 2
