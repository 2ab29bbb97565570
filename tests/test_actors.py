"""Level 2: the actor types and the store writer, started in fixtures."""

from __future__ import annotations

import gc
import logging
import math
import sys
import threading
import weakref
from typing import Any

import pykka
import pytest
from helpers import Probe, poll_until
from prometheus_client import CollectorRegistry, Histogram

from actors.effects import Collect, Tell, Wake
from actors.loop import LoopActor, burst
from actors.metrics import LATENCY, Metrics, observe_all
from actors.pool import Dispatcher, PooledActor
from actors.store_writer import Barrier, CreateOrder, SaveOrder, StoreWriter
from oms import codec, snapshot
from storage.store import Store, StoreLocked


class Recorder(PooledActor):
    def __init__(self, dispatcher: Dispatcher, sink: list, done: threading.Event,
                 expect: int) -> None:
        super().__init__(dispatcher)
        self.sink, self.done, self.expect = sink, done, expect
        self.seen: list[int] = []

    def on_receive(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        if message == "get":
            return list(self.seen)
        self.seen.append(message)
        if len(self.seen) == self.expect:
            self.sink.append(self.seen)
            if len(self.sink) == self.expect_actors:
                self.done.set()
        return None


@pytest.fixture
def dispatcher() -> Any:
    d = Dispatcher(workers=2)
    yield d
    d.stop()


def test_ten_thousand_pooled_actors_share_two_threads(dispatcher: Dispatcher) -> None:
    before = threading.active_count()
    sink: list = []
    done = threading.Event()
    Recorder.expect_actors = 10_000  # type: ignore[attr-defined]
    refs = [Recorder.spawn(dispatcher, sink, done, 5) for _ in range(10_000)]
    for n in range(5):
        for ref in refs:
            ref.tell(n)
    assert done.wait(30)
    assert threading.active_count() == before
    assert all(seen == [0, 1, 2, 3, 4] for seen in sink)  # per-actor order kept
    assert pykka.ActorRegistry.get_all() == [] or all(
        not isinstance(r, Recorder) for r in pykka.ActorRegistry.get_all())


class Starter(PooledActor):
    def __init__(self, dispatcher: Dispatcher, log: list[str]) -> None:
        super().__init__(dispatcher)
        self.log = log

    def on_start(self) -> None:
        self.log.append("start")

    def on_receive(self, message: Any) -> Any:
        self.log.append(message)
        return list(self.log)


def test_an_idle_spawned_actor_runs_nothing_until_its_first_message(
        dispatcher: Dispatcher) -> None:
    """``spawn(idle=True)`` (a new order awaiting its first reply): no first
    slice; the first message schedules it, with ``on_start`` first."""
    log: list[str] = []
    ref = Starter.spawn(dispatcher, log, idle=True)
    other = Starter.spawn(dispatcher, [])  # scheduled at once: the queue has moved past
    assert other.ask("ping", timeout=5) == ["start", "ping"]
    assert log == []
    assert ref.ask("hello", timeout=5) == ["start", "hello"]
    ref.stop(timeout=5)


def test_pooled_actor_ask_and_failure(dispatcher: Dispatcher) -> None:
    Recorder.expect_actors = 1  # type: ignore[attr-defined]
    ref = Recorder.spawn(dispatcher, [], threading.Event(), 99)
    ref.tell(1)
    assert ref.ask("get", timeout=5) == [1]
    with pytest.raises(ValueError, match="boom"):
        ref.ask("boom", timeout=5)
    assert ref.ask("get", timeout=5) == [1]  # an ask's exception goes to the asker only


class Counting(LoopActor):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.reached = threading.Event()
        self.target = 0

    def on_receive(self, message: Any) -> Any:
        if message == "count":
            return self.count
        self.count += 1
        if self.count == self.target:
            self.reached.set()
        return None


def test_loop_actor_loses_no_wakeups_under_concurrent_tells() -> None:
    actor = Counting.launch()
    actor.target = 8 * 20_000
    try:
        def hammer() -> None:
            for _ in range(20_000):
                actor.tell(1)

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert actor.reached.wait(20), f"only {actor.count} of {actor.target} handled"
        assert actor.actor_ref.ask("count", timeout=5) == actor.target
    finally:
        actor.actor_ref.stop()


class Exclusive(PooledActor):
    """Counts its messages and notes if two workers ever ran it at once."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.count, self.running, self.overlaps = 0, False, 0
        self.reached = threading.Event()
        self.target = 0

    def on_receive(self, message: Any) -> Any:
        if message == "count":
            return self.count
        if self.running:
            self.overlaps += 1
        self.running = True
        self.count += 1
        if self.count == self.target:
            self.reached.set()
        self.running = False
        return None


def test_a_pooled_actor_runs_on_one_worker_at_a_time_and_loses_no_tells(
        dispatcher: Dispatcher) -> None:
    """The inbox's scheduling token (a test-and-set): with two workers and
    eight threads telling at once, the actor is never queued twice (never
    run on both workers at once) and no message is left behind when a slice
    ends as another lands."""
    actors = [Exclusive(dispatcher) for _ in range(4)]
    for actor in actors:
        actor.target = 8 * 5_000
        actor._start_actor_loop()

    def hammer() -> None:
        for _ in range(5_000):
            for actor in actors:
                actor.actor_ref.tell(1)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes
    try:
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    for actor in actors:
        assert actor.reached.wait(20), f"only {actor.count} of {actor.target} handled"
        assert actor.actor_ref.ask("count", timeout=5) == actor.target
        assert actor.overlaps == 0


class Listing(LoopActor):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.batches = 0

    def on_batch(self, envelopes: list[Any]) -> None:
        self.batches += 1
        super().on_batch(envelopes)

    def on_receive(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        return None


def test_a_burst_delivers_each_actors_tells_once_in_order() -> None:
    a, b, gone = Listing.launch(), Listing.launch(), Listing.launch()
    gone.actor_ref.stop()
    try:
        with burst():
            for n in range(100):
                a.tell(n)
                b.tell(-n)
                if n == 50:
                    a.tell("boom")  # one failing message does not lose the rest
            gone.tell("lost")  # a stopped actor's bundle is dropped, not raised
            assert a.seen == [] and b.seen == []  # nothing left before the burst ended
        assert a.actor_ref.ask("seen", timeout=5) == list(range(100))
        assert b.actor_ref.ask("seen", timeout=5) == [-n for n in range(100)]
        a.tell("after")  # outside a burst: told at once
        assert a.actor_ref.ask("seen", timeout=5)[-1] == "after"
    finally:
        a.actor_ref.stop()
        b.actor_ref.stop()


def test_a_stopped_pooled_actor_is_freed_without_the_cycle_collector(
        dispatcher: Dispatcher) -> None:
    Recorder.expect_actors = 1  # type: ignore[attr-defined]
    ref = Recorder.spawn(dispatcher, [], threading.Event(), 99)
    actor = weakref.ref(ref._actor_weakref())  # type: ignore[misc]
    gc.disable()
    try:
        ref.stop(block=True, timeout=5)
        del ref
        assert poll_until(lambda: actor() is None, timeout=5)
    finally:
        gc.enable()


class BadStart(LoopActor):
    def on_start(self) -> None:
        raise OSError("cannot bind")


def test_launch_reports_a_failing_start() -> None:
    with pytest.raises(OSError, match="cannot bind"):
        BadStart.launch()


# -- the store writer ------------------------------------------------------

@pytest.fixture
def store(tmp_path: Any) -> Any:
    s = Store(tmp_path / "data", map_size=1 << 20)
    yield s
    s.close()


@pytest.fixture
def writer(store: Store) -> Any:
    w = StoreWriter.launch(store, Metrics(CollectorRegistry()))
    yield w
    w.actor_ref.stop()


def _record(order_id: str, size: int = 100) -> bytes:
    from helpers import normalized, retail_order

    from oms.engine import new_order
    from oms.process import builtin_processes

    order = new_order(order_id, normalized(retail_order(ext=order_id)),
                      builtin_processes()["retail"], 1.0)
    order.attributes = {"pad": "x" * size}
    return snapshot.encode(order)


def test_group_commit_reports_each_waiter_after_durable_write(
        store: Store, writer: StoreWriter) -> None:
    created: list[Any] = []
    n = 500

    def build(oid: str) -> Any:

        return snapshot.decode(_record(oid))

    for i in range(n):
        ext = f"e{i % 400}"  # 100 repeats of earlier ids, many within one batch
        writer.tell(CreateOrder("web", ext, codec.digest({"e": ext}), build, Collect(created)))
    assert poll_until(lambda: len(created) == n, timeout=20)
    outcomes = [c.kind for c in created]
    assert outcomes.count("accepted") == 400
    assert outcomes.count("duplicate") == 100
    assert len(store.active_ids()) == 400
    batches = writer.metrics.commit_batch.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < n  # grouped: fewer commits than writes


def test_conflicting_payload_is_a_conflict(store: Store, writer: StoreWriter) -> None:
    created: list[Any] = []

    from oms.model import Order

    def build(oid: str) -> Order:
        return snapshot.decode(_record(oid))

    writer.tell(CreateOrder("web", "x", b"one", build, Collect(created)))
    writer.tell(CreateOrder("web", "x", b"two", build, Collect(created)))
    assert poll_until(lambda: len(created) == 2, timeout=5)
    assert [c.kind for c in created] == ["accepted", "conflict"]


def test_map_grows_when_full_without_losing_writes(store: Store, writer: StoreWriter) -> None:
    done = threading.Event()
    n = 300
    for i in range(n):
        after = (Wake(done),) if i == n - 1 else ()
        writer.tell(SaveOrder(f"O{i:012d}", _record(f"O{i:012d}", 20_000), True, (), after))
    assert done.wait(30)
    assert store.stats()["map_size"] > 1 << 20
    assert len(store.active_ids()) == n
    assert all(store.get_order(f"O{i:012d}") is not None for i in range(n))


def test_barrier_runs_after_earlier_writes(store: Store, writer: StoreWriter) -> None:
    done = threading.Event()
    stored_then: list[Any] = []
    writer.tell(SaveOrder("O000000000001", _record("O000000000001"), True, (), ()))
    probe = Probe(lambda _msg: stored_then.append(store.get_order("O000000000001") is not None))
    writer.tell(Barrier((Tell(probe, "barrier"), Wake(done))))
    assert done.wait(5)
    assert stored_then == [True]


def test_second_store_on_same_folder_is_refused(store: Store) -> None:
    with pytest.raises(StoreLocked, match="in use"):
        Store(store.path)


def test_corrupt_record_is_reported_with_its_key(store: Store) -> None:
    from storage.records import CorruptRecord

    with store.write() as txn:
        txn.put(b"O000000000009", b"\xc1garbage", db=store.db["orders"])
    with pytest.raises(CorruptRecord, match="O000000000009"):
        store.get_order("O000000000009")


def test_a_failing_post_commit_callback_is_counted_and_the_writer_goes_on(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """An effect that raises after a commit is logged, naming the effect and
    its order, and counted in ``oms_internal_errors_total{component="writer"}``
    (it was logged only); the next effects and writes still run."""
    metrics = Metrics(CollectorRegistry())
    writer = StoreWriter.launch(store, metrics)
    done = threading.Event()
    try:
        def boom(_msg: Any) -> None:
            raise RuntimeError("effect bug")

        writer.tell(SaveOrder("O000000000001", _record("O000000000001"), True, (),
                              (Tell(Probe(boom), "note"),)))
        writer.tell(SaveOrder("O000000000002", _record("O000000000002"), True, (),
                              (Wake(done),)))
        with caplog.at_level(logging.ERROR, logger="actors.store_writer"):
            assert done.wait(5)
        assert metrics.internal_errors.labels("writer")._value.get() == 1
        assert "post-commit effect Tell (order O000000000001) failed" in caplog.text
        assert store.get_order("O000000000002") is not None
    finally:
        writer.actor_ref.stop()


def test_a_snapshot_that_cannot_be_stored_runs_no_effect(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot LMDB refuses on its own (a key over 511 bytes) fails alone:
    its effects never run, the writes around it are stored and theirs run."""
    metrics = Metrics(CollectorRegistry())
    writer = StoreWriter.launch(store, metrics)
    bad, good = threading.Event(), threading.Event()
    try:
        with caplog.at_level(logging.ERROR, logger="actors.store_writer"):
            writer.tell(SaveOrder("O000000000001", _record("O000000000001"), True, (), ()))
            writer.tell(SaveOrder("O" * 600, _record("O000000000002"), True, (), (Wake(bad),)))
            writer.tell(SaveOrder("O000000000003", _record("O000000000003"), True, (),
                                  (Wake(good),)))
        assert good.wait(5)
        assert not bad.is_set()
        assert "store write failed for SaveOrder" in caplog.text
        assert store.get_order("O000000000001") is not None
        assert store.get_order("O000000000003") is not None
    finally:
        writer.actor_ref.stop()


# -- the sequencer's preload ------------------------------------------------

def test_the_sequencer_preload_hands_out_turns_in_chunks_and_keeps_the_queues() -> None:
    """Recovery's preload of 900 telecom orders of three customers: the
    queues are complete at once, the turns go out ``PRELOAD_CHUNK`` orders
    a message (no loop turn takes them all); a head that leaves between two
    chunks passes its turn on, and nothing gives a turn to a non-head."""
    from actors.sequencer import PRELOAD_CHUNK, SeqRequest, Sequencer
    from oms.messages import Turn

    turns: list[tuple[str, bool]] = []

    def deliver(order_id: str, msg: Turn) -> bool:
        turns.append((order_id, msg.go))
        return True

    seq = Sequencer.launch(deliver)
    try:
        entries = [(f"c{n % 3}", f"O{n:012d}", n < 3) for n in range(900)]
        assert len(entries) > 3 * PRELOAD_CHUNK
        seq.preload(entries)
        seq.tell(SeqRequest("c1", "O000000000001", False))  # c1's head ends meanwhile
        assert poll_until(lambda: len(turns) >= 900, timeout=10)
        assert seq.actor_ref.ask(SeqRequest("c0", "O000000000000", True), timeout=5) is None
        queues = seq.actor_ref.proxy().queues.get(timeout=5)
        assert [len(queues[k]) for k in ("c0", "c1", "c2")] == [300, 299, 300]
        went = [oid for oid, go in turns if go]
        assert set(went) == {"O000000000000", "O000000000001", "O000000000002",
                             "O000000000004"}  # c1's next one, after its head left
        waited = [oid for oid, go in turns if not go]
        assert len(waited) == len(set(waited)) == 900 - 3  # each non-head told once
        assert turns.index(("O000000000004", True)) > turns.index(("O000000000004", False))
    finally:
        seq.actor_ref.stop()
        seq.join(5)


def test_one_order_whose_turn_cannot_be_delivered_costs_no_other_its_turn() -> None:
    """A delivery that raises during the preload (a store read error while
    loading that order) is survived, counted and logged: the rest of its
    chunk and every later chunk still go out."""
    from actors.sequencer import PRELOAD_CHUNK, Sequencer
    from oms.messages import Turn

    turns: list[str] = []

    def deliver(order_id: str, msg: Turn) -> bool:
        if order_id in ("O000000000005", "O000000000006"):  # a head and a waiter
            raise OSError("simulated store read error")
        turns.append(order_id)
        return True

    seq = Sequencer.launch(deliver)
    try:
        entries = [(f"c{n}", f"O{n:012d}", False) for n in range(6)]  # six heads
        entries += [("c0", f"O{n:012d}", False) for n in range(6, 2 * PRELOAD_CHUNK + 6)]
        seq.preload(entries)
        assert poll_until(lambda: len(turns) >= len(entries) - 2, timeout=10)
        assert "O000000000004" in turns and f"O{2 * PRELOAD_CHUNK + 5:012d}" in turns
    finally:
        seq.actor_ref.stop()
        seq.join(5)


def test_a_reload_puts_the_held_orders_ages_back_in_line() -> None:
    """An actor lost while held only in memory (reloaded at its durable,
    unheld state) leaves no held age behind: ``oldest_held_s`` would grow for
    ever and fire the held-too-long alert; and the other way round."""
    from actors.order_counts import OrderCounts
    from oms.states import OrderState

    counts = OrderCounts()
    counts.counted_raw("inProgress", "O1")
    counts.state_changed(OrderState.IN_PROGRESS, OrderState.HELD, "O1")
    assert counts.oldest_held_age() >= 0 and "O1" in counts.held_since
    counts.recount(OrderState.HELD, OrderState.IN_PROGRESS, "O1")
    assert counts.oldest_held_age() == 0 and counts.snapshot(0)["states"] == {"inProgress": 1}
    counts.recount(OrderState.IN_PROGRESS, OrderState.HELD, "O1")
    assert "O1" in counts.held_since and counts.snapshot(0)["states"] == {"held": 1}


def test_observing_a_batch_gives_the_same_histogram_as_one_by_one() -> None:
    """``observe_all`` (a gateway's replies of one read) against ``observe``:
    the same buckets, count and sum, with values on the bounds, below the
    first, past the last, infinite and NaN."""
    values = [0.0, -1.0, 0.001, 0.0011, 5, 3600, 3601, 1e300, math.inf, 0.0025, 2.5, 0.0025]
    for extra in ([], [math.nan]):
        one, batch = (Histogram("h", "h", ["x"], buckets=LATENCY,
                                registry=CollectorRegistry()).labels("a") for _ in range(2))
        for value in values + extra:
            one.observe(value)
        observe_all(batch, values + extra)
        observe_all(batch, [])

        def samples(child: Any) -> list[tuple[str, Any, float]]:
            return [(s.name, s.labels, s.value) for s in child._child_samples()
                    if s.name != "_created"]

        got, want = samples(batch), samples(one)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        for (name, _, value), (_, _, expected) in zip(got, want, strict=True):
            if name == "_sum" and extra:
                assert math.isnan(value)
            else:
                assert value == pytest.approx(expected), name
