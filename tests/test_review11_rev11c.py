"""Hostile review 11 (c): bounded loop turns for background jobs over many
orders (the passivation sweep, retention), with the real service, its real
loop and LMDB, and the real simulators on loopback."""

from __future__ import annotations

import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints
from helpers import poll_until, retail_order

from actors import retention as retention_module
from actors import router as router_module
from actors import runtime
from actors.order_counts import OrderCounts
from bench.ports import free_port
from gateways.client import Client, wait_terminal
from oms.states import OrderState
from storage import archive


class TurnProbe:
    """Samples a value once per loop turn (a call that queues itself again
    for the next turn) until stopped."""

    def __init__(self, loop: Any, sample: Any) -> None:
        self.loop, self.sample = loop, sample
        self.values: list[Any] = []
        self.stopped = False

    def start(self) -> None:
        self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.values.append(self.sample())
        if not self.stopped:
            self.loop.call_soon(self._tick)


@pytest.fixture
def long_delivery(sim_config: Any) -> Any:
    sim_config.delivery_s = 3600.0  # retail orders wait for shipment_delivered
    return sim_config


def test_the_passivation_sweep_rests_idle_orders_a_bounded_chunk_a_turn(
        long_delivery: Any, sim: Any, make_service: Any, eps: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Orders that went idle together do not all leave memory in one loop
    turn: the sweep nudges at most ``SWEEP_CHUNK`` of them a turn and goes on
    in the next (it used to tell every due actor ``Rest`` at once, so one
    turn ran a slice for each: 16,000 idle orders took one turn of 0.1 to
    0.25 s, and the turn grew with the number of waiting orders)."""
    monkeypatch.setattr(router_module, "SWEEP_CHUNK", 16)
    svc = make_service(passivate_after_s=1.0)
    with Client(eps.intake, timeout=10) as c:
        for _req, rep in c.pipeline({"type": "submit_order", "order": retail_order(f"sw-{n}")}
                                   for n in range(120)):
            assert rep["type"] == "accepted", rep
    router = svc.router
    # every order reaches its wait for delivery (shipped) and is still in memory
    assert poll_until(lambda: len(router.idle) == 120, 20), len(router.idle)
    probe = TurnProbe(svc.loop, lambda: router.snapshot()["live"])
    probe.start()
    try:
        assert poll_until(lambda: router.snapshot()["live"] == 0, 20)
        assert poll_until(lambda: len(probe.values) > 2 and probe.values[-1] == 0, 5)
    finally:
        probe.stopped = True
    drops = [a - b for a, b in zip(probe.values, probe.values[1:], strict=False) if a > b]
    assert sum(drops) == 120, probe.values
    assert max(drops) <= 16, drops  # a chunk a turn
    assert len(drops) >= 120 // 16
    assert router.snapshot()["passivated"] == 120
    assert svc.supervisor.dead == [] and svc.is_ready()


GEN1_PROBE = """
import gc, sys
from actors.runtime import tune_gc
tune_gc()
largest = [0]
def probe(phase, info):
    if phase == "start" and info["generation"] == 1:
        largest[0] = max(largest[0], len(gc.get_objects(0)) + len(gc.get_objects(1)))
gc.callbacks.append(probe)
kept = []
for n in range(100_000):  # orders in memory: each some twenty objects that stay
    kept.append({"id": str(n), "items": [[str(n), n, [n]] for _ in range(9)]})
gc.callbacks.remove(probe)
print(largest[0], len(kept))
"""


def test_a_middle_collection_pass_examines_a_bounded_number_of_objects() -> None:
    """The collector's middle pass (generation 1) stops every thread, the
    loop too, and examines every object that survived the young passes since
    the last one: with ``tune_gc``'s thresholds (50,000, 20, 100) that was up
    to twenty young passes' worth, a million objects while tens of thousands
    of orders were in memory: a loop turn of 0.44 s (30,000 orders reloaded
    by a burst of cancels, measured with ``gc.callbacks``). It may examine
    what three young passes leave (some 0.08 s at that rate)."""
    out = subprocess.run([sys.executable, "-c", GEN1_PROBE], capture_output=True, text=True,
                         timeout=120, check=True, cwd=Path(__file__).parent.parent)
    largest, kept = map(int, out.stdout.split())
    assert kept == 100_000
    young = runtime.GC_THRESHOLDS[0]
    assert 0 < largest <= 5 * young, largest  # never twenty young passes' worth


def test_a_large_retention_batch_is_retired_in_parts_of_bounded_size(
        make_service: Any, sim: Any, eps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store writer deletes a retention batch in one transaction, on the
    loop: a batch of 10,000 (the largest ``retention_batch``) made loop turns
    of 0.1 to 0.25 s. A batch is archived and committed in parts of at most
    ``RETIRE_PART`` orders, and still moves every order exactly once."""
    monkeypatch.setattr(retention_module, "RETIRE_PART", 8)
    svc = make_service(retention_s=1000.0, retention_interval_s=3600.0, retention_batch=30)
    with Client(eps.intake, timeout=10) as c:
        ids = [rep["order_id"] for _r, rep in c.pipeline(
            {"type": "submit_order", "order": retail_order(f"rp-{n}")} for n in range(40))]
        wait_terminal(c, ids, timeout=30)
        # terminal as the orders answer; in the retention index once the last saves commit
        poll_until(lambda: sum(svc.store.retention_stats()["finished_live"].values()) == 40)
        commits = svc.registry.get_sample_value("oms_retention_batch_seconds_count")
        moved = svc.retention.sweep(now=time.time() + 2000)
        assert moved == 30, (moved, svc.store.retention_stats())  # one batch
        after = svc.registry.get_sample_value("oms_retention_batch_seconds_count")
        assert after == commits + 4, (commits, after)  # 8 + 8 + 8 + 6
        assert svc.retention.sweep(now=time.time() + 2000) == 10
        assert svc.retention.sweep(now=time.time() + 2000) == 0
        views = [c.get(i) for i in ids]
    assert all(v["type"] == "order" and v["order"]["archived"] for v in views)
    seen = Counter(r["order"]["order_id"] for p in archive.files(svc.store.path)
                   for r in archive.iter_file(p))
    assert set(seen) == set(ids) and set(seen.values()) == {1}


def _metric(port: int, sample: str) -> float:
    """One sample of the service's /metrics, by its name and labels as printed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no {sample} in /metrics")


def test_recovery_runs_under_the_services_collector_thresholds(procs: Any,
                                                                tmp_path: Path) -> None:
    """Recovery runs while the loop serves (resumed orders send, replies and
    events come in), with every resumed order in memory. It ran before
    ``tune_gc``, under CPython's default thresholds: full collections every
    few tens of thousands of allocations, each over every recovered order,
    stopping the loop (30,000 orders: some 2,000 passes, full ones of 0.1 to
    0.55 s, loop turns of up to 1 s). The service's thresholds apply from
    before its start."""
    eps = Endpoints()  # no domain system answers: every order keeps a command out
    args = eps.serve_args(tmp_path / "data")
    port = free_port()
    args[args.index("--metrics-port") + 1] = str(port)
    svc = procs(args, "serve-0")
    with Client(eps.intake, timeout=10) as c:
        c.wait_ready(30)
        for _r, rep in c.pipeline({"type": "submit_order", "order": retail_order(f"gc-{n}")}
                                  for n in range(3000)):
            assert rep["type"] == "accepted", rep
    svc.kill()
    procs(args, "serve-1")
    with Client(eps.intake, timeout=10) as c:
        c.wait_ready(60)
    assert _metric(port, "oms_recovered_orders") == 3000
    full = _metric(port, 'python_gc_collections_total{generation="2"}')
    assert full == 1, full  # tune_gc's own collect only; none over the recovered orders


class Compared(float):
    """A wall-clock time that counts how often it is compared."""

    count = 0

    def __lt__(self, other: object) -> bool:
        Compared.count += 1
        return float.__lt__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        Compared.count += 1
        return float.__gt__(self, other)  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        Compared.count += 1
        return float.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        Compared.count += 1
        return float.__ne__(self, other)

    __hash__ = float.__hash__


def test_order_counts_finds_the_oldest_held_order_without_a_pass_over_all_of_them() -> None:
    """``order_counts`` is answered on the loop, and read at every scrape
    under the counts' lock: it took the oldest held order with ``min`` over
    every held order's time (40,000 held: 1 to 2 ms a request, so 256
    pipelined requests made one loop turn of 0.48 s). The oldest is kept in
    order (a heap), so a request compares a few times, not once per held
    order; and it is always the true oldest while orders are held and let go."""
    counts = OrderCounts()
    rng = random.Random(11)
    base = time.time() - 10_000
    held: dict[str, float] = {}
    for n in range(5_000):
        order_id = f"O{n:012d}"
        held[order_id] = since = Compared(base + rng.random() * 5_000)
        counts.counted_raw("held", order_id, since)
    Compared.count = 0
    for _ in range(100):
        counts.snapshot(0)
        counts.oldest_held_age()
    assert Compared.count < 1_000, Compared.count  # was 200 passes of 5,000
    for step in range(20_000):  # held and let go, in any order: the oldest stays true
        order_id = f"O{rng.randrange(6_000):012d}"
        if order_id in held:
            del held[order_id]
            counts.state_changed(OrderState.HELD, OrderState.IN_PROGRESS, order_id)
        else:
            counts.counted_raw("inProgress", order_id)
            counts.state_changed(OrderState.IN_PROGRESS, OrderState.HELD, order_id)
            held[order_id] = counts.held_since[order_id]
        if step % 97 == 0:
            oldest = min(held.values(), default=None)
            expected = 0.0 if oldest is None else time.time() - oldest
            assert abs(counts.oldest_held_age() - expected) < 5.0
    assert counts.held_since == held
    assert len(counts._oldest) <= 2 * len(held) + 1024  # let-go entries do not pile up


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
