"""The order number and the ``live:<state>`` counters are put once a write
transaction, at its end (``Store.write``, ``storage.records.Tally``), not
once an order: the store must end exactly as if every order had put them,
through aborted transactions, retirements in the same transaction, and a
real process killed with SIGKILL between commits.

Real LMDB, real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import poll_until
from prometheus_client import CollectorRegistry

from actors.effects import Collect
from actors.metrics import Metrics
from actors.store_writer import CreateOrder, StoreWriter
from oms import snapshot
from oms.engine import new_order
from oms.model import Order, OrderState
from oms.process import builtin_processes
from oms.sample import sample_orders
from oms.validation import validate_order
from storage.records import TS_BYTES, Tally, bump
from storage.store import Store

ROOT = Path(__file__).resolve().parent.parent


def an_order() -> Order:
    raw = next(iter(sample_orders(1)))
    req, errs = validate_order(raw, ["retail"])
    assert req is not None, errs
    return new_order("O-tmpl", req, builtin_processes()["retail"], time.time())


def meta_counts(store: Store) -> dict[bytes, bytes]:
    with store.read() as txn:
        return {k: v for k, v in txn.cursor(db=store.db["meta"])
                if k == b"seq" or k.startswith(b"live:")}


def done_by_state(store: Store) -> dict[bytes, bytes]:
    """What the counters must say: the finished orders indexed, by state."""
    with store.read() as txn:
        counts = Counter(v for _k, v in txn.cursor(db=store.db["done"]))
        seq = txn.stat(store.db["orders"])["entries"]
    return {b"seq": str(seq).encode(),
            **{b"live:" + state: str(n).encode() for state, n in counts.items()}}


def create(store: Store, txn: Any, order: Order, ext: str, state: OrderState | None) -> str:
    """A new order (finished with ``state``, if given), as the writer stores it."""
    made = store.create_order(txn, "web", ext, b"d" * 16,
                              lambda oid: msgspec.structs.replace(order, order_id=oid))
    assert made.kind == "accepted"
    if state is not None:
        record = snapshot.encode(msgspec.structs.replace(made.order, state=state))
        store.put_order(txn, made.order_id, record, active=False)
    return made.order_id


def test_counters_end_as_if_each_order_put_them(tmp_path: Path) -> None:
    """Orders created and finished in a few transactions, one aborted, one
    retiring finished orders in the same transaction that finishes others:
    ``seq`` is the last number stored, ``live:<state>`` the finished orders
    of that state, and the aborted transaction's numbers are given again."""
    order = an_order()
    store = Store(tmp_path / "s", sync=False)
    try:
        with store.write() as txn:
            ids = [create(store, txn, order, f"a{n}", OrderState.COMPLETED if n % 2 else None)
                   for n in range(5)]
        assert ids[-1] == "O000000000005"
        with pytest.raises(RuntimeError), store.write() as txn:
            create(store, txn, order, "lost", OrderState.CANCELLED)
            raise RuntimeError("the transaction fails: nothing of it is stored")
        assert meta_counts(store) == {b"seq": b"5", b"live:completed": b"2"}
        with store.read() as txn:
            done = [k for k, _v in txn.cursor(db=store.db["done"])]
        with store.write() as txn:
            assert create(store, txn, order, "b", OrderState.CANCELLED) == "O000000000006"
            for key in done[:1]:  # as ``retire`` takes an order out of the count
                txn.delete(key, db=store.db["done"])
                bump(txn, store.db["meta"], b"live:completed", -1)
            create(store, txn, order, "c", OrderState.COMPLETED)
        assert meta_counts(store) == {b"seq": b"7", b"live:completed": b"2",
                                      b"live:cancelled": b"1"}
        with store.write() as txn:  # a duplicate takes no number
            assert store.create_order(txn, "web", "b", b"d" * 16, None).kind == "duplicate"
        assert meta_counts(store)[b"seq"] == b"7"
    finally:
        store.close()


def test_a_tally_keeps_keys_apart_and_drops_an_aborted_transaction(tmp_path: Path) -> None:
    """A key that is a prefix of another is its own counter; deltas of a
    transaction that ended without settling are not put by the next."""
    store = Store(tmp_path / "s", sync=False)
    try:
        tally, meta = Tally(), store.db["meta"]
        with pytest.raises(RuntimeError), store.write() as txn:
            tally.add(txn, b"live:held", 5)
            raise RuntimeError("aborted")
        with store.write() as txn:
            tally.add(txn, b"live:held_x", 1)
            tally.add(txn, b"live:held", 2)
            tally.add(txn, b"live:held", -1)
            tally.settle(txn, meta)
            tally.settle(txn, meta)  # twice: the second puts nothing
        assert meta_counts(store) == {b"live:held": b"1", b"live:held_x": b"1"}
    finally:
        store.close()


CHILD = """
import sys, time
import msgspec
sys.path[:0] = [{tests!r}]
from test_store_tally import an_order, create
from oms.model import OrderState
from storage.store import Store
store, order, n = Store(sys.argv[1]), an_order(), int(sys.argv[2])
for batch in range(10_000):
    with store.write() as txn:
        for _ in range(1 + batch % 7):
            n += 1
            create(store, txn, order, f"k{{n}}", (None, OrderState.COMPLETED,
                                                OrderState.CANCELLED)[n % 3])
    print(n, flush=True)
"""


def run_and_kill(data: Path, start: int, commits: int) -> int:
    """A real process creating orders in transactions of 1 to 7, killed
    with SIGKILL after ``commits`` commits it reported; returns the last
    number it reported committed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")), str(data), str(start)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        last = start
        for _ in range(commits):
            line = child.stdout.readline()
            assert line, "the child died"
            last = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    return last


@pytest.mark.parametrize("commits", [1, 9, 40])
def test_kill_9_between_commits_leaves_the_counters_exact(tmp_path: Path,
                                                          commits: int) -> None:
    """Killed twice at a moment between or inside commits: each crash image
    has ``seq`` equal to the orders stored (ids 1..seq, none skipped, none
    given twice) and each ``live:<state>`` equal to its finished orders; at
    least every reported commit is there."""
    data = tmp_path / "data"
    start = 0
    for _round in range(2):
        reported = run_and_kill(data, start, commits)
        store = Store(data)
        try:
            counts = meta_counts(store)
            assert counts == done_by_state(store)
            stored = int(counts[b"seq"])
            assert stored >= reported
            with store.read() as txn:
                ids = [k.decode() for k, _v in txn.cursor(db=store.db["orders"])]
                exts = {v for _k, v in txn.cursor(db=store.db["ext"])}
                done = {k[TS_BYTES:] for k, _v in txn.cursor(db=store.db["done"])}
            assert ids == [f"O{n:012d}" for n in range(1, stored + 1)]
            assert len(exts) == stored  # one external id, one order
            assert len(done) == sum(1 for n in range(1, stored + 1) if n % 3)
        finally:
            store.close()
        start = stored  # the child numbers its external ids from there on


def test_the_writer_growing_the_map_mid_batch_gives_each_number_once(tmp_path: Path) -> None:
    """The real store writer, a 1 MiB map that must grow inside batches of
    creates (a transaction aborted at a put, or at its end where the number
    and counters are put, is tried again whole): every create gets its own
    number, ``seq`` is the last, and the counters match the finished ones."""
    store = Store(tmp_path / "data", map_size=1 << 20)
    writer = StoreWriter.launch(store, Metrics(CollectorRegistry()))
    try:
        order = msgspec.structs.replace(an_order(), attributes={"pad": "x" * 20_000})
        created: list[Any] = []
        n = 150

        def build(state: OrderState) -> Any:
            return lambda oid: msgspec.structs.replace(order, order_id=oid, state=state)

        for i in range(n):  # a third of them finished by their Start, as NewOrder may
            state = OrderState.COMPLETED if i % 3 == 0 else order.state
            writer.tell(CreateOrder("web", f"g{i}", b"d" * 16, build(state), Collect(created)))
        assert poll_until(lambda: len(created) == n, timeout=30)
        assert [c.order_id for c in created] == [f"O{k:012d}" for k in range(1, n + 1)]
        assert writer.metrics.store_grows._value.get() >= 1
        assert meta_counts(store) == done_by_state(store) == {
            b"seq": str(n).encode(), b"live:completed": str(n // 3).encode()}
    finally:
        writer.actor_ref.stop()
        store.close()


def test_a_create_whose_build_raises_keeps_its_number_used(tmp_path: Path) -> None:
    """A create that fails alone (its build raises: the writer answers it
    with an error and commits the rest) used its number, as when ``seq``
    was put before the build: the next create takes the one after."""
    store = Store(tmp_path / "data", sync=False)
    writer = StoreWriter.launch(store, Metrics(CollectorRegistry()))
    try:
        order = an_order()
        created: list[Any] = []

        def good(oid: str) -> Order:
            return msgspec.structs.replace(order, order_id=oid)

        def broken(_oid: str) -> Order:
            raise ValueError("poison: the build fails")

        for ext, build in (("p1", good), ("p2", broken), ("p3", good)):
            writer.tell(CreateOrder("web", ext, b"d" * 16, build, Collect(created)))
        assert poll_until(lambda: len(created) == 3, timeout=10)
        assert [(c.kind, c.order_id) for c in created] == [
            ("accepted", "O000000000001"), ("error", ""), ("accepted", "O000000000003")]
        assert meta_counts(store) == {b"seq": b"3"}
    finally:
        writer.actor_ref.stop()
        store.close()


def test_a_damaged_counter_is_counted_again_not_the_writer_failed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A ``live:<state>`` counter that is not a number (a damaged store):
    the batch still commits, the writer goes on, the counter restarts from
    that commit's count and the log says so. (Put at the commit, it must not
    fail the batch: a writer that went down on it would go down again after
    each restart, at the first order that finishes.)"""
    store = Store(tmp_path / "data", sync=False)
    with store.write() as txn:
        txn.put(b"live:completed", b"not-a-number", db=store.db["meta"])
    fatal: list[str] = []
    writer = StoreWriter.launch(store, Metrics(CollectorRegistry()), fatal=fatal.append)
    try:
        order = an_order()
        created: list[Any] = []

        def build(state: OrderState) -> Any:
            return lambda oid: msgspec.structs.replace(order, order_id=oid, state=state)

        writer.tell(CreateOrder("web", "plain", b"d" * 16, build(order.state), Collect(created)))
        writer.tell(CreateOrder("web", "done", b"d" * 16, build(OrderState.COMPLETED),
                                Collect(created)))
        assert poll_until(lambda: len(created) == 2, timeout=10)
        assert fatal == [] and [c.kind for c in created] == ["accepted", "accepted"]
        assert meta_counts(store)[b"live:completed"] == b"1"
        assert "b'live:completed' held b'not-a-number', not a number" in caplog.text
    finally:
        writer.actor_ref.stop()
        store.close()
