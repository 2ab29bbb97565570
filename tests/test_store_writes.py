"""The store's writes made cheaper, each pinned to what it replaced.

- The ``active`` set (what recovery reads) when snapshots skip the put into
  it (``SaveOrder.listed``): the store must end exactly as if every active
  snapshot had put it there, whatever happens between the writes; and on
  the crash images of a real service killed with SIGKILL.
- ``record_event`` (one put without overwrite instead of a get and a put):
  the old code's outcomes, in the same store.
- ``next_order_id`` (reads the counter once a transaction).
- A finished order's state for the retention index, carried by its save
  (``SaveOrder.state``) instead of read back out of the record.

Real LMDB, the real store writer, real processes.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lmdb
import pytest
from helpers import Probe
from prometheus_client import CollectorRegistry

from actors.effects import Collect, Tell
from actors.metrics import Metrics
from actors.store_writer import Retire, SaveOrder, StoreWriter
from bench.engine import DATA, _valid
from oms import snapshot
from oms.engine import Engine, new_order
from oms.messages import CommandResult, DomainEvent, Send, Start
from oms.process import builtin_processes
from oms.sample import sample_orders
from storage.records import TS_BYTES, record_digest
from storage.store import MIB, Store

IDS = [f"O{n:012d}" for n in range(1, 7)]


def retail_records(order_id: str, seed: int) -> tuple[list[bytes], bytes]:
    """The snapshots of one retail order run to completion by the engine:
    (the unfinished ones, the finished one)."""
    proc = builtin_processes()["retail"]
    engine = Engine(proc)
    req = next(_valid(r) for r in sample_orders(8, seed=seed) if r["order_type"] == "retail")
    order = new_order(order_id, req, proc, 1.0)
    queue: list[Any] = [Start()]
    records: list[bytes] = []
    while queue:
        turning = engine.handle(order, queue.pop(), 2.0)
        records.append(snapshot.encode(order))
        queue += [CommandResult(fx.command_id, True, DATA.get(fx.op, {}))
                  for fx in turning.effects if isinstance(fx, Send)]
        if order.steps["await_delivery"].wait and not queue:
            queue.append(DomainEvent("e", "shipping", "shipment_delivered", {}))
    assert order.finished
    return records[:-1], records[-1]


def created(store: Store, order_id: str, record: bytes) -> None:
    """The order's create (``Store.create_order`` lists it) without its dedup entry."""
    with store.write() as txn:
        store.put_order(txn, order_id, record, active=True)


def contents(store: Store) -> dict[str, Any]:
    """Every database a snapshot or a retirement writes, with the finish
    times (which differ between two stores written a moment apart) left out."""
    out: dict[str, Any] = {}
    with store.read() as txn:
        for name in ("orders", "active", "inbox", "meta"):
            out[name] = dict(txn.cursor(db=store.db[name]))
        out["done"] = sorted((k[TS_BYTES:], v) for k, v in txn.cursor(db=store.db["done"]))
        out["expiry"] = sorted(k[TS_BYTES:] for k, _v in txn.cursor(db=store.db["expiry"]))
        out["arch"] = sorted(k for k, _v in txn.cursor(db=store.db["arch"]))
    return out


def recovered(store: Store) -> list[bytes]:
    """What recovery would resume: ``scan_active``'s keys (it reads only these)."""
    return [key for key, _ in store.scan_active()]


def retire_all(store: Store) -> Retire:
    """Retention's write for every finished order now indexed (as
    ``actors.retention`` builds it; no archive file, so no lengths)."""
    rows = store.finished_before(1e12, 1000)
    orders = [(key, record_digest(raw), "day", 0, snapshot.record_state(raw), b"")
              for key, raw in rows if raw is not None]
    return Retire({}, orders, [], Collect([]))


@pytest.mark.parametrize("seed", range(12))
def test_listed_snapshots_leave_the_store_as_if_each_had_listed_its_order(
        tmp_path: Path, seed: int, monkeypatch: Any) -> None:
    """Two stores get the same random writes for six orders: active
    snapshots, finished ones, finished orders active again, snapshots that
    fail alone (a bad record: nothing written; a bad inbox key: after the
    puts) and retention retiring every finished order, some of them active
    again meanwhile. One store gets ``listed`` as the order actor sets it
    (its last snapshot sent was active, whether or not it was stored) and a
    finished snapshot's state with it; the other never skips and reads the
    state from the record. After every commit both hold the same orders, the
    same active set (what recovery resumes), index and counters. (The
    finish-time index reads a clock that both stores see alike: an order
    finished twice in one millisecond has one entry.)"""
    import storage.retention_index

    clock = [1_000.0]
    monkeypatch.setattr(storage.retention_index, "time", SimpleNamespace(time=lambda: clock[0]))
    rng = random.Random(seed)
    runs = {oid: retail_records(oid, seed * 10 + n) for n, oid in enumerate(IDS)}
    stores = [Store(tmp_path / name, sync=False) for name in ("listed", "unlisted")]
    writers = [StoreWriter(s, Metrics(CollectorRegistry()), fatal=pytest.fail) for s in stores]
    try:
        for oid, (steps, _done) in runs.items():
            for store in stores:
                created(store, oid, steps[0])
        listed = dict.fromkeys(IDS, True)  # the actor's flag: created active
        skipped = 0
        for _ in range(60):
            clock[0] += 1.0
            batch: list[SaveOrder | None] = []
            for _ in range(rng.randint(1, 5)):
                if rng.random() < 0.08:
                    batch.append(None)  # a retention sweep (built per store below)
                    continue
                oid = rng.choice(IDS)
                steps, done = runs[oid]
                active = rng.random() < 0.7
                record: Any = rng.choice(steps) if active else done
                consumed: tuple[bytes, ...] = ()
                fault = rng.random()
                if fault < 0.06:
                    record = 1234  # fails alone before anything of it is written
                elif fault < 0.12:
                    consumed = (b"",)  # fails alone after its puts (an empty key)
                # a finished save carries its state, as the actor sends it (the
                # other store reads it back out of the record: ``keep`` below)
                state = None if active or record == 1234 else snapshot.record_state(record)
                batch.append(SaveOrder(oid, record, active, consumed, (), None, listed[oid],
                                       state))
                skipped += active and listed[oid]
                listed[oid] = active  # the actor does not learn of a failure
            for store, writer, keep in zip(stores, writers, (True, False), strict=True):
                work = [retire_all(store) if m is None else m if keep
                        else m._replace(listed=False, state=None) for m in batch]
                writer.commit(work)
                assert writer.healthy
            assert contents(stores[0]) == contents(stores[1])
            assert recovered(stores[0]) == recovered(stores[1])
        assert skipped > 20  # the puts skipped were many
        assert stores[0].unlisted  # and the overrides were needed
    finally:
        for store in stores:
            store.close()


def test_a_snapshot_that_failed_alone_does_not_leave_its_order_unlisted(
        tmp_path: Path) -> None:
    """A finished order active again: the snapshot that lists it fails alone
    (nothing of it written), its next snapshot says ``listed``. The order is
    listed all the same, so recovery resumes it."""
    steps, done = retail_records(IDS[0], 1)
    store = Store(tmp_path / "s", sync=False)
    try:
        writer = StoreWriter(store, Metrics(CollectorRegistry()), fatal=pytest.fail)
        created(store, IDS[0], steps[0])
        writer.commit([SaveOrder(IDS[0], done, False, (), (), None, True)])
        assert recovered(store) == []
        writer.commit([SaveOrder(IDS[0], 1234, True, (), (), None, False)])  # type: ignore[arg-type]
        writer.commit([SaveOrder(IDS[0], steps[1], True, (), (), None, True)])
        assert recovered(store) == [IDS[0].encode()]
        assert store.get_order(IDS[0]) == snapshot.decode(steps[1])
    finally:
        store.close()


def test_a_full_map_holds_the_snapshot_that_lists_an_order_and_stores_it_first(
        tmp_path: Path) -> None:
    """The map at its cap: the snapshot that lists a finished order again
    (``listed`` False) cannot be committed and is held; the order's next
    snapshot (``listed``) is held behind it; nothing runs and nothing is
    stored. Once the cap is raised both are stored in order, each effect runs
    after its commit, and the order is in the active set."""
    steps, done = retail_records(IDS[0], 2)
    store = Store(tmp_path / "s", map_size=MIB, max_map_size=MIB, sync=False)
    ran: list[str] = []
    try:
        writer = StoreWriter(store, Metrics(CollectorRegistry()), fatal=pytest.fail)
        created(store, IDS[0], steps[0])
        writer.commit([SaveOrder(IDS[0], done, False, (), (), None, True)])
        blob = steps[1] * (2 * MIB // len(steps[1]) + 1)  # more than the map holds
        writer.commit([SaveOrder(IDS[0], blob, True, (), (Tell(Probe(ran.append), "one"),),
                                 None, False)])
        assert not writer.healthy and ran == []
        writer.commit([SaveOrder(IDS[0], steps[2], True, (), (Tell(Probe(ran.append), "two"),),
                                 None, True)])
        assert not writer.healthy and ran == [] and len(writer.held) == 2
        assert recovered(store) == [] and store.get_order(IDS[0]) == snapshot.decode(done)
        store.max_map_size = 0  # room again
        writer.commit([])
        assert writer.healthy and ran == ["one", "two"] and writer.held == []
        assert recovered(store) == [IDS[0].encode()]
        assert store.get_order(IDS[0]) == snapshot.decode(steps[2])
        assert writer.metrics.store_commit_errors._value.get() == 2  # refused, StoreFull
    finally:
        store.close()


def crash_image_is_exact(data: Path) -> tuple[int, int]:
    """Open a dead service's data folder: every order whose record is not
    finished is in the active set (recovery resumes it) and nothing else is.
    Returns (orders, active)."""
    store = Store(data)
    try:
        with store.read() as txn:
            active = set(txn.cursor(db=store.db["active"]).iternext(values=False))
            unfinished = {key for key, raw in txn.cursor(db=store.db["orders"])
                          if not snapshot.decode(raw).finished}
            orders = txn.stat(store.db["orders"])["entries"]
        assert active == unfinished, (sorted(active - unfinished)[:5],
                                      sorted(unfinished - active)[:5])
        return orders, len(active)
    finally:
        store.close()


@pytest.mark.slow
def test_kill_9_between_snapshots_leaves_the_active_set_exact(
        procs: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A real service killed with SIGKILL three times between orders'
    snapshots: while orders are held in fallout and passivated (their
    actors reload them from the store), right after an operator retried,
    skipped or aborted them (and their replies are on the way), and in the
    middle of a second wave of orders waiting for delivery. On each crash
    image the active set is exactly the unfinished orders; after the last
    restart every order ends terminal, no command is applied twice (but
    the retried payments), and a clean
    stop leaves the active set empty."""
    from conftest import Endpoints, sim_report
    from helpers import poll_until, retail_order
    from test_operations import control, hold_policy

    from gateways.client import Client, wait_terminal

    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "0.4", "--seed", "3"], "simulate")
    monkeypatch.setenv("OMS_PASSIVATE_AFTER_S", "0.05")
    data = tmp_path / "data"
    args = eps.serve_args(data) + ["--processes", hold_policy(tmp_path / "procs")]
    runs = iter(range(10))

    def restart(svc: Any) -> tuple[Any, tuple[int, int]]:
        svc.kill()
        image = crash_image_is_exact(data)
        return procs(args, f"serve-{next(runs)}"), image

    svc = procs(args, f"serve-{next(runs)}")
    control(eps.systems["billing"], capture_payment=[1.0, "payment_declined"])
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        held = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": retail_order(f"held-{n}")} for n in range(30))]
        poll_until(lambda: all(client.get(i)["order"].get("state_reason") == "fallout"
                               for i in held), timeout=30)
    svc, image = restart(svc)
    assert image == (30, 30)  # all held, all listed
    control(eps.systems["billing"], capture_payment=[0.0, "payment_declined"])
    actions = ("retry_step", "skip_step", "abort_order")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        replies = [r["type"] for _q, r in client.pipeline(
            {"type": actions[n % 3], "order_id": oid, "operator": "op"}
            for n, oid in enumerate(held))]
        assert set(replies) == {"operator_accepted"}
    svc, image = restart(svc)  # their snapshots and commands are under way
    assert image[0] == 30
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        wave = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": retail_order(f"wave-{n}")} for n in range(60))]
        poll_until(lambda: any(s["name"] == "await_delivery" and s["status"] == "running"
                               for s in client.get(wave[-1])["order"]["steps"]), timeout=30)
    svc, image = restart(svc)  # many wait for delivery, some finished
    assert image[0] == 90 and image[1] >= 1
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views = wait_terminal(client, held + wave, timeout=60)
    states = [views[i]["state"] for i in held]
    assert states.count("failed") == 10 and set(states) == {"completed", "failed"}
    assert {views[i]["state"] for i in wave} == {"completed"}
    retried = set(held[::3])  # a declined payment, then the operator's retry: two
    twice = sim_report(eps.systems["warehouse"], all=True)["applied_twice"]
    assert [t for t in twice if (t["order_id"], t["op"]) not in {
        (oid, "capture_payment") for oid in retried}] == []
    assert len(twice) <= len(retried)
    assert svc.terminate() == 0
    assert crash_image_is_exact(data) == (90, 0)


def old_record_event(store: Store, txn: Any, order_id: str, system: str, event_id: str,
                     event: dict[str, Any]) -> str:
    """``Store.record_event`` as it was before it put without overwrite (a
    get, then the active check, then two puts): the reference."""
    from oms import codec
    from storage.records import event_key, usable_order_id

    if not usable_order_id(order_id):
        return "unknown_order"
    key = event_key(order_id, system, event_id)
    if txn.get(key, db=store.db["events"]) is not None:
        return "duplicate"
    if txn.get(order_id.encode(), db=store.db["active"]) is None:
        known = txn.get(order_id.encode(), db=store.db["orders"]) is not None or (
            txn.get(order_id.encode(), db=store.db["arch"]) is not None)
        return "finished_order" if known else "unknown_order"
    txn.put(key, b"", db=store.db["events"])
    txn.put(key, codec.pack(event), db=store.db["inbox"])
    return "recorded"


@pytest.mark.parametrize("seed", range(4))
def test_record_event_answers_as_before_in_every_case(tmp_path: Path, seed: int) -> None:
    """Random domain events (repeated, for active, finished, archived,
    unknown orders and unusable ids, with the key given or not), orders
    finishing and retired in between: ``record_event`` gives the outcome
    the old code gave, in the same store contents."""
    from storage.records import event_key

    rng = random.Random(seed)
    runs = {oid: retail_records(oid, seed * 10 + n) for n, oid in enumerate(IDS[:4])}
    stores = [Store(tmp_path / name, sync=False) for name in ("new", "old")]
    writers = [StoreWriter(s, Metrics(CollectorRegistry()), fatal=pytest.fail) for s in stores]
    try:
        for oid, (steps, _done) in runs.items():
            for store in stores:
                created(store, oid, steps[0])
        seen: list[tuple[str, str, str]] = []
        outcomes: set[str] = set()
        for _ in range(200):
            roll = rng.random()
            if roll < 0.04:  # an order finishes
                oid = rng.choice(list(runs))
                for writer in writers:
                    writer.commit([SaveOrder(oid, runs[oid][1], False, (), ())])
                continue
            if roll < 0.06:  # retention
                for store, writer in zip(stores, writers, strict=True):
                    writer.commit([retire_all(store)])
                continue
            if seen and roll < 0.35:
                oid, system, eid = rng.choice(seen)  # a repeat
            else:
                oid = rng.choice([*IDS, "", "O" * 65])
                system, eid = rng.choice(["shipping", "warehouse"]), f"ev-{rng.randrange(99)}"
                seen.append((oid, system, eid))
            event = {"event_id": eid, "system": system, "order_id": oid, "name": "n",
                     "data": {}}
            key = event_key(oid, system, eid) if oid and rng.random() < 0.5 else b""
            with stores[0].write() as txn:
                new = stores[0].record_event(txn, oid, system, eid, event, key)
            with stores[1].write() as txn:
                old = old_record_event(stores[1], txn, oid, system, eid, event)
            assert new == old, (oid, system, eid)
            outcomes.add(new)
            assert contents(stores[0]) == contents(stores[1])
            for name in ("events", "inbox"):
                with stores[0].read() as a, stores[1].read() as b:
                    assert dict(a.cursor(db=stores[0].db[name])) == dict(
                        b.cursor(db=stores[1].db[name]))
        assert outcomes == {"recorded", "duplicate", "finished_order", "unknown_order"}
    finally:
        for store in stores:
            store.close()


def test_order_numbers_are_read_once_a_transaction_and_never_reused(tmp_path: Path) -> None:
    """Creates in one transaction take consecutive numbers; an aborted
    transaction's numbers are given out again (nothing of it was stored);
    a reopened store goes on from the last committed number."""
    store = Store(tmp_path / "s", sync=False)
    try:
        with store.write() as txn:
            assert [store.next_order_id(txn) for _ in range(3)] == [
                "O000000000001", "O000000000002", "O000000000003"]
        with pytest.raises(lmdb.MapFullError), store.write() as txn:
            assert [store.next_order_id(txn) for _ in range(2)] == [
                "O000000000004", "O000000000005"]
            raise lmdb.MapFullError("a failed commit")
        with store.write() as txn:
            assert store.next_order_id(txn) == "O000000000004"
            assert store.next_order_id(txn, vshard=7) == "O000000000507"  # a shard's id
    finally:
        store.close()
    store = Store(tmp_path / "s", sync=False)
    try:
        with store.write() as txn:
            assert store.next_order_id(txn) == "O000000000006"
    finally:
        store.close()
