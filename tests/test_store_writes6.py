"""The store writer's snapshots (session 6): what ``StoreWriter._apply``
stores for a snapshot (an inline put of a plain one was built, then
reverted for ``Store.put_order``'s own call) is what ``put_order`` stores
in a bare transaction. Pinned (random batches with poison
writes, ids that are prefixes of others, the same order twice in a batch,
retention between), on a full map, and on the crash images of a real writer
process killed with SIGKILL in the middle of its commits.

Real LMDB, the real store writer, real processes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import Probe
from prometheus_client import CollectorRegistry
from test_store_writes import contents, recovered, retail_records, retire_all

from actors.effects import Tell
from actors.metrics import Metrics
from actors.store_writer import SaveOrder, StoreWriter
from oms import codec, snapshot
from storage.records import ext_key, record_digest
from storage.store import MIB, Store

# ids that are prefixes of one another, one of ours, and two that are not
# ours: an empty one (LMDB refuses the key) and one with a lone surrogate
# (it has no UTF-8 form)
PREFIXES = ["O000000000001", "O0000000000012", "O00000000000", "O0000000000013"]
POISON = ["", "O\ud800"]


def reference_commit(store: Store, work: list[SaveOrder], ran: list[Any]) -> None:
    """What the writer did before: ``put_order`` for every snapshot, each
    failing alone (then its order's next snapshots list it again), effects
    of the stored ones after the commit, in order."""
    stored = []
    with store.write() as txn:
        for msg in work:
            if not isinstance(msg, SaveOrder):
                store.retire(txn, msg.lengths, msg.orders, msg.expired, msg.backfill)
                continue
            try:
                store.put_order(txn, msg.order_id, msg.record, msg.active, msg.consumed,
                                msg.listed)
            except Exception:  # noqa: BLE001 - as the writer: this write alone failed
                store.unlisted.add(msg.order_id.encode(errors="surrogatepass"))
                continue
            stored.append(msg)
    for msg in stored:
        ran.extend(e.message for e in msg.effects)


@pytest.mark.parametrize("seed", range(10))
def test_a_plain_snapshot_stores_what_put_order_stored(tmp_path: Path, seed: int,
                                                       monkeypatch: Any) -> None:
    """Random batches through the writer and through ``put_order`` in a
    bare transaction: snapshots with ``listed`` as the actor sets it, some
    finishing, some consuming an inbox key, some with a record that is not
    bytes, the same order more than once in a batch, ids that are prefixes
    of one another, an empty id and one with a lone surrogate, retention
    retiring every finished order. After every commit both stores hold the
    same orders, active set, index and counters, and the same effects ran
    (the finish-time index reads a clock both stores see alike)."""
    import storage.retention_index

    clock = [1_000.0]
    monkeypatch.setattr(storage.retention_index, "time", SimpleNamespace(time=lambda: clock[0]))
    rng = random.Random(seed)
    ids = PREFIXES + POISON
    runs = {oid: retail_records(PREFIXES[0], seed * 10 + n) for n, oid in enumerate(ids)}
    stores = [Store(tmp_path / name, sync=False) for name in ("writer", "reference")]
    writer = StoreWriter(stores[0], Metrics(CollectorRegistry()), fatal=pytest.fail)
    ran: list[list[Any]] = [[], []]
    listed = dict.fromkeys(ids, False)
    plain = 0
    try:
        for round_ in range(100):
            # the first 70 rounds without writes that fail alone and without
            # retention: either may leave an order in ``Store.unlisted``, and
            # then the writer puts every snapshot the long way (``put_order``)
            poison = round_ >= 70
            clock[0] += 1.0
            events = [oid.encode(errors="surrogatepass") + b"\x00e" for oid in PREFIXES
                      if rng.random() < 0.3]
            for store in stores:  # domain events recorded, for snapshots to consume
                with store.write() as txn:
                    for key in events:
                        txn.put(key, b"event", db=store.db["inbox"])
            batch: list[Any] = []
            for _ in range(rng.randint(1, 8)):
                if poison and rng.random() < 0.1:
                    batch.append(None)  # retention (built per store)
                    continue
                oid = rng.choice(ids if poison else PREFIXES)
                steps, done = runs[oid]
                active = rng.random() < 0.8
                record: Any = rng.choice(steps) if active else done
                if poison and rng.random() < 0.1:
                    record = 1234  # not bytes: fails alone
                consumed = (oid.encode(errors="surrogatepass") + b"\x00e",) if (
                    rng.random() < 0.2) else ()
                tag = f"{oid!r}-{len(ran[0])}-{rng.random()}"
                msg = SaveOrder(oid, record, active, consumed,
                                (Tell(Probe(ran[0].append), tag),), None, listed[oid])
                plain += active and listed[oid] and not stores[0].unlisted
                listed[oid] = active
                batch.append(msg)
            writer.commit([retire_all(stores[0]) if m is None else m for m in batch])
            assert writer.healthy
            reference_commit(stores[1], [retire_all(stores[1]) if m is None else m
                                         for m in batch], ran[1])
            assert contents(stores[0]) == contents(stores[1])
            assert recovered(stores[0]) == recovered(stores[1])
            assert ran[0] == ran[1]
            assert stores[0].unlisted == stores[1].unlisted
        assert plain > 100
    finally:
        for store in stores:
            store.close()


def test_plain_snapshots_on_a_full_map_are_held_and_stored_in_order(tmp_path: Path) -> None:
    """The map at its cap: a plain snapshot too big for it fails the commit;
    it and the plain snapshots after it (of the same order and another) are
    held, nothing of them stored, no effect run. Once the cap is raised
    they are stored in order (the last one of an order wins) and each
    effect runs once."""
    (steps, _), (other, _) = (retail_records(oid, n) for n, oid in enumerate(PREFIXES[:2]))
    store = Store(tmp_path / "s", map_size=MIB, max_map_size=MIB, sync=False)
    ran: list[str] = []
    try:
        writer = StoreWriter(store, Metrics(CollectorRegistry()), fatal=pytest.fail)
        writer.commit([SaveOrder(PREFIXES[0], steps[0], True, (), ()),
                       SaveOrder(PREFIXES[1], other[0], True, (), ())])
        blob = steps[1] * (2 * MIB // len(steps[1]) + 1)

        def save(oid: str, record: bytes, tag: str) -> SaveOrder:
            return SaveOrder(oid, record, True, (), (Tell(Probe(ran.append), tag),), None, True)

        writer.commit([save(PREFIXES[0], blob, "big"), save(PREFIXES[1], other[1], "o1")])
        writer.commit([save(PREFIXES[0], steps[2], "s2")])
        assert not writer.healthy and ran == [] and len(writer.held) == 3
        assert store.get_order(PREFIXES[0]) == snapshot.decode(steps[0])
        assert store.get_order(PREFIXES[1]) == snapshot.decode(other[0])
        store.max_map_size = 0  # room again
        writer.commit([])
        assert writer.healthy and ran == ["big", "o1", "s2"] and writer.held == []
        assert store.get_order(PREFIXES[0]) == snapshot.decode(steps[2])
        assert store.get_order(PREFIXES[1]) == snapshot.decode(other[1])
        assert recovered(store) == [PREFIXES[0].encode(), PREFIXES[1].encode()]
    finally:
        store.close()


CHILD = r"""
import sys
sys.path[:0] = sys.argv[3:]
from prometheus_client import CollectorRegistry
from actors.metrics import Metrics
from actors.store_writer import SaveOrder, StoreWriter
from storage.store import Store
from test_store_writes import retail_records

ORDERS = 40
steps, done = retail_records("O000000000001", 5)
store = Store(sys.argv[1], sync=True)
writer = StoreWriter(store, Metrics(CollectorRegistry()), fatal=lambda why: sys.exit(why))
ids = [f"O{n:012d}" for n in range(1, ORDERS + 1)]
start = int(sys.argv[2])
if start == 0:
    writer.commit([SaveOrder(oid, steps[0], True, (), ()) for oid in ids])
for k in range(start + 1, start + 10_000):
    # commit k: the order k % ORDERS finishes, the one finished by commit
    # k - 1 is active again (not listed), the rest get plain snapshots (their
    # records cycle through the order's); the first order twice
    work = []
    for n, oid in enumerate(ids):
        if n == k % ORDERS:
            work.append(SaveOrder(oid, done, False, (), ()))
        else:
            listed = n != (k - 1) % ORDERS
            work.append(SaveOrder(oid, steps[k % len(steps)], True, (), (), None, listed))
    writer.commit(work + [SaveOrder(ids[0], work[0].record, work[0].active, (), ())])
    assert writer.healthy
    print(k, flush=True)
"""


def crash_image(data: Path) -> dict[bytes, bytes]:
    """A killed writer's data folder, opened as recovery opens it: the
    active set is exactly the orders whose record is not finished."""
    store = Store(data, sync=False)
    try:
        with store.read() as txn:
            records = dict(txn.cursor(db=store.db["orders"]))
            active = set(txn.cursor(db=store.db["active"]).iternext(values=False))
        assert active == {k for k, raw in records.items() if not snapshot.decode(raw).finished}
        return records
    finally:
        store.close()


def expected(k: int, steps: list[bytes], done: bytes, orders: int) -> dict[bytes, bytes]:
    """The store after commit ``k`` of the child (as it writes them)."""
    out = {}
    for n in range(orders):
        oid = f"O{n + 1:012d}".encode()
        if k == 0:
            out[oid] = steps[0]
        elif n == k % orders:
            out[oid] = done
        else:
            out[oid] = steps[k % len(steps)]
    return out


@pytest.mark.slow
def test_kill_9_in_the_middle_of_commits_loses_nothing_and_applies_nothing_twice(
        tmp_path: Path) -> None:
    """A real writer process commits batches of plain snapshots (and one
    finishing, one listing again) with ``sync`` on, printing each batch's
    number once its commit returned; it is killed with SIGKILL at six
    points, each time in the middle of the next batches. Every crash image
    holds exactly the last acknowledged batch or the one after it, whole
    (never a mix, never an older one), with the active set exactly the
    unfinished orders; the writer restarted on it goes on."""
    steps, done = retail_records("O000000000001", 5)
    data = tmp_path / "data"
    here = Path(__file__).resolve().parent
    paths = [str(here.parent), str(here)]
    rng = random.Random(6)
    acked = 0
    for kill in range(6):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(acked), *paths],
                                 stdout=subprocess.PIPE, text=True,
                                 env=os.environ | {"PYTHONPATH": os.pathsep.join(paths)})
        assert child.stdout is not None
        goal = acked + rng.randint(1, 12)
        while acked < goal:
            line = child.stdout.readline()
            assert line, f"the writer ended early (kill {kill}): {child.wait()}"
            acked = int(line)
        child.send_signal(signal.SIGKILL)  # somewhere in the batches after ``acked``
        child.wait()
        for line in child.stdout:  # acknowledged before it died (not read yet)
            acked = int(line)
        child.stdout.close()
        image = crash_image(data)
        later = expected(acked + 1, steps, done, 40)
        assert image in (expected(acked, steps, done, 40), later), kill
        if image == later:
            acked += 1  # committed, not yet acknowledged: the next start goes on from it


def test_a_create_stores_what_put_order_stored(tmp_path: Path) -> None:
    """``create_order`` leaves the store as ``put_order`` of the new order's
    record would (the order finished by its start too: then also indexed as
    finished), for new orders, a repeat and a conflict, with ids from the
    same counter: the reference for any shortcut in it."""
    import msgspec

    steps, done = retail_records(PREFIXES[0], 3)
    stores = [Store(tmp_path / name, sync=False) for name in ("create", "reference")]

    def build(record: bytes) -> Any:
        return lambda oid: msgspec.structs.replace(snapshot.decode(record), order_id=oid)

    try:
        creates = [("a", steps[0]), ("b", done), ("a", steps[0]), ("a", steps[1]), ("c", steps[2])]
        got = []
        with stores[0].write() as txn:
            for ext, record in creates:
                digest = record_digest(record) if ext != "a" else b"d" * 16
                created = stores[0].create_order(txn, "web", ext, digest, build(record))
                got.append((created.kind, created.order_id, created.state))
        assert [kind for kind, _, _ in got] == [
            "accepted", "accepted", "duplicate", "duplicate", "accepted"]
        with stores[1].write() as txn:  # the same through ``put_order``
            for (kind, order_id, _), (ext, record) in zip(got, creates, strict=True):
                if kind != "accepted":
                    continue
                assert stores[1].next_order_id(txn) == order_id
                order = build(record)(order_id)
                digest = record_digest(record) if ext != "a" else b"d" * 16
                txn.put(ext_key("web", ext), codec.pack([order_id, digest]),
                        db=stores[1].db["ext"])
                stores[1].put_order(txn, order_id, snapshot.encode(order), active=True)
                if order.finished:
                    stores[1].put_order(txn, order_id, snapshot.encode(order), active=False)
        assert contents(stores[0]) == contents(stores[1])
        for name in ("ext",):
            with stores[0].read() as a, stores[1].read() as b:
                assert dict(a.cursor(db=stores[0].db[name])) == dict(
                    b.cursor(db=stores[1].db[name]))
        assert recovered(stores[0]) == [b"O000000000001", b"O000000000003"]
    finally:
        for store in stores:
            store.close()
