"""Recovery at start, with real processes and stores built directly with the
store API (thousands of orders in a second, in states a crash leaves).

- Defect 6: many passivated orders whose jeopardy deadlines passed during
  the downtime, interleaved with orders to resume, in a store bigger than
  the initial map: the service becomes ready and processes new orders (the
  scan held a read slot for the whole scan, the writer's map growth waited
  for it, and the timers thread held a stripe lock waiting for the growth).
- Defect 7: the sequencer's queues are rebuilt before any order resumes, so
  a queue head that finishes early passes its turn on.
"""

from __future__ import annotations

import contextlib
import time
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Endpoints
from helpers import Driver, normalized, ok_domain, poll_until, retail_order
from test_operations import no_restock  # noqa: F401

from actors.settings import load_processes
from gateways.client import Client, wait_terminal
from oms import codec, snapshot
from oms.engine import new_order
from oms.model import Order
from oms.process import ProcessDef
from oms.sample import telecom
from storage.records import ext_key, format_order_id
from storage.store import MIB, Store

pytestmark = pytest.mark.slow
TERMINAL = {"completed", "failed", "partial", "cancelled"}


def driven(proc: ProcessDef, raw: dict[str, Any], order_id: str, domain: Any) -> Order:
    """The order as the engine leaves it after Start with ``domain`` answering
    (None from the domain: the command stays in flight)."""
    d = Driver(proc, raw, domain)
    d.order = new_order(order_id, normalized(raw), proc, 1000.0)
    d.start()
    return d.order


class Builder:
    """Writes order snapshots straight into a data folder, as the writer would."""

    def __init__(self, data: Path) -> None:
        self.store = Store(data, map_size=256 * MIB)
        self.writing = contextlib.ExitStack()
        self.txn = self.writing.enter_context(self.store.write())
        self.seq = 0

    def add(self, order: Order, **over: Any) -> str:
        """Store a copy of ``order`` under the next id, with record fields
        changed by ``over``; returns the id."""
        self.seq += 1
        oid = format_order_id(self.seq)
        copy = msgspec.structs.replace(order, order_id=oid, **over)
        self.txn.put(ext_key(copy.source_system, copy.external_id), codec.pack([oid, b"x" * 16]),
                     db=self.store.db["ext"])
        self.store.put_order(self.txn, oid, snapshot.encode(copy), active=True)
        return oid

    def close(self) -> None:
        self.txn.put(b"seq", str(self.seq).encode(), db=self.store.db["meta"])
        self.writing.close()  # commits
        self.store.close()


def waiting_for_delivery(proc: ProcessDef) -> Order:
    return driven(proc, retail_order("tmpl"), "O-tmpl", ok_domain())


def processes_with_jeopardy(folder: Path) -> str:
    """Retail whose await_delivery expects to be done within 1 s."""
    text = resources.files("oms.processes").joinpath("retail.toml").read_text()
    folder.mkdir()
    (folder / "retail.toml").write_text(text.replace(
        "[steps.await_delivery]", "[steps.await_delivery]\nexpected_s = 1.0"))
    return str(folder)


def serve(procs: Any, eps: Endpoints, data: Path, name: str, extra: list[str] = ()) -> Any:
    return procs(eps.serve_args(data) + list(extra), name)


def test_many_passed_deadlines_and_a_full_map_still_restart(procs: Any, tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    folder = processes_with_jeopardy(tmp_path / "procs")
    proc = load_processes(folder)["retail"]
    waiting = waiting_for_delivery(proc)
    assert waiting.jeopardy, "the template order must have a jeopardy deadline"
    in_flight = driven(proc, retail_order("tmpl2"), "O-tmpl2",
                       ok_domain({"reserve_stock": None}))  # reserve_stock in flight
    past = {k: [time.time() - 3600, False] for k in waiting.jeopardy}
    data = tmp_path / "data"
    build = Builder(data)
    resumed = []
    for n in range(3000):  # passed deadlines interleaved with orders to resume
        if n % 10 == 9:
            resumed.append(build.add(in_flight, external_id=f"fly-{n}"))
        else:
            build.add(waiting, external_id=f"wait-{n}", jeopardy=past,
                      attributes={"pad": "x" * 400})
    build.close()
    size = (data / "data.mdb").stat().st_size
    assert size > 2 * MIB  # bigger than the initial map of the restart below
    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "0.2"], "simulate")
    monkeypatch.setenv("OMS_MAP_SIZE_MB", "1")  # the old open: at the file's size, full
    svc = serve(procs, eps, data, "serve", ["--processes", folder])
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        fresh = client.submit(retail_order("after-restart"))
        assert fresh["type"] == "accepted"
        views = wait_terminal(client, resumed + [fresh["order_id"]], timeout=90)
        assert {v["state"] for v in views.values()} == {"completed"}
        poll_until(lambda: client.request({"type": "order_counts"})["in_flight"] == 2700,
                   timeout=20)  # the finished ones retire; the waiting ones still wait
    assert svc.terminate() == 0


def test_restart_of_a_store_bigger_than_the_initial_map(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build = Builder(data)
    order = waiting_for_delivery(load_processes()["retail"])
    for n in range(1500):
        build.add(order, external_id=f"big-{n}", attributes={"pad": "y" * 2000})
    build.close()
    size = (data / "data.mdb").stat().st_size
    store = Store(data, map_size=1 * MIB)
    try:
        assert store.stats()["map_size"] >= size + MIB  # headroom, not a full map
        assert sum(1 for _ in store.scan_active(chunk=100)) == 1500
    finally:
        store.close()
    capped = Store(data, map_size=1 * MIB, max_map_size=2 * MIB)
    try:
        assert capped.stats()["map_size"] >= size  # a cap below the file: the file wins
    finally:
        capped.close()


def test_a_queue_head_that_finishes_during_recovery_passes_its_turn_on(
        procs: Any, tmp_path: Path) -> None:
    """Per customer: the head's last command is in flight (it finishes at once
    after the restart), three later orders wait for their turn; thousands of
    stored orders after them make the recovery scan long."""
    procs_ = load_processes()
    tel, retail = procs_["telecom"], procs_["retail"]
    data = tmp_path / "data"
    build = Builder(data)
    ids = []
    import random

    rng = random.Random(3)
    for cust in ("sub-1", "sub-2", "sub-3"):
        raw = dict(telecom(0, rng, "web", f"{cust}-"), customer={"id": cust})
        head = driven(tel, raw, "O-head", ok_domain({"create_invoice": None}))
        assert head.state == "inProgress" and head.turn
        ids.append(build.add(head, external_id=f"{cust}-head"))
        for n in range(3):
            later = new_order("O-later", normalized(dict(raw, external_id=f"{cust}-{n}")), tel,
                              1000.0)
            ids.append(build.add(later, external_id=f"{cust}-{n}"))
    filler = waiting_for_delivery(retail)
    for n in range(20000):
        build.add(filler, external_id=f"fill-{n}")
    build.close()
    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "3600"], "simulate")
    svc = serve(procs, eps, data, "serve")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views = wait_terminal(client, ids, timeout=30)
    assert {v["state"] for v in views.values()} <= TERMINAL
    assert svc.terminate() == 0


def test_telecom_queues_cross_a_kill_9(procs: Any, tmp_path: Path) -> None:
    """Three customers, twenty telecom orders each, then thousands of retail
    orders that wait for delivery (a long recovery scan after the queue
    heads), killed mid-flight: after the restart every telecom order ends
    terminal (none waits for a lost turn)."""
    import random

    from oms.sample import sample_orders

    rng = random.Random(7)
    orders = [dict(telecom(n, rng, "web", "TK-"), customer={"id": f"sub-{n % 3}"})
              for n in range(60)]
    eps = Endpoints()
    procs(eps.simulate_args() + ["--latency-ms", "30", "--delivery-s", "3600", "--seed", "3"],
          "simulate")
    data = tmp_path / "data"
    svc = serve(procs, eps, data, "serve")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        ids = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": o} for o in orders)]
        fillers = [r for _q, r in client.pipeline(
            {"type": "submit_order", "order": o}
            for o in sample_orders(4000, seed=2, source="web", prefix="FILL-"))]
        assert all(r["type"] == "accepted" for r in fillers)
        states = [client.get(i)["order"]["state"] for i in ids]
        assert not all(s in TERMINAL for s in states)  # still mid-flight
    svc.kill()
    again = serve(procs, eps, data, "serve-again")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views = wait_terminal(client, ids, timeout=40)
    assert {v["state"] for v in views.values()} <= TERMINAL
    assert again.terminate() == 0


def test_stored_events_are_checked_again_at_recovery() -> None:
    """What recovery reads back from the inbox passes the edge's checks
    again: a system that is not configured (a channel's name), a NaN, a
    wrong shape is not replayed."""
    from actors.domain_events import stored_event
    from oms.messages import DomainEvent

    systems = frozenset({"warehouse", "billing"})
    good = {"event_id": "e1", "system": "warehouse", "order_id": "O1",
            "name": "stock_reserved", "data": {"n": 1}}
    assert stored_event(good, systems) == DomainEvent("e1", "warehouse", "stock_reserved",
                                                      {"n": 1})
    for bad in ({**good, "system": "store"}, {**good, "system": "ware"},
                {**good, "data": {"n": float("nan")}}, {**good, "data": [1]},
                {**good, "name": 7}, {k: v for k, v in good.items() if k != "event_id"},
                {**good, "data": {"x": "y" * (5 << 20)}}, ["not", "a", "map"]):
        assert isinstance(stored_event(bad, systems), str), bad


@pytest.mark.usefixtures("no_restock")
def test_a_forged_stored_event_does_not_release_a_hold_after_a_restart(
        make_service: Any, client: Any, tmp_path: Path) -> None:
    svc = make_service()
    big = [{"id": "a", "product_id": "SKU-901", "quantity": 10**9}]
    forged = client.submit(retail_order("forged-1", items=big))["order_id"]
    honest = client.submit(retail_order("honest-1", items=big))["order_id"]
    for oid in (forged, honest):
        poll_until(lambda o=oid: client.get(o)["order"].get("state_reason") == "awaiting_stock",
                   timeout=20)
    svc.stop()
    store = Store(tmp_path / "data")
    try:
        with store.write() as txn:
            for oid, system, eid in ((forged, "store", "f1"), (forged, "warehouse", "f2"),
                                     (honest, "warehouse", "h1")):
                data = {"qty": float("nan")} if eid == "f2" else {}
                assert store.record_event(txn, oid, system, eid, {
                    "event_id": eid, "system": system, "order_id": oid,
                    "name": "stock_reserved", "data": data}) == "recorded"
    finally:
        store.close()
    svc = make_service()
    poll_until(lambda: client.get(honest)["order"].get("state_reason") != "awaiting_stock",
               timeout=20)  # the honest event was replayed
    view = client.get(forged)["order"]
    assert (view["state"], view["state_reason"]) == ("held", "awaiting_stock"), view
    refused = svc.metrics.domain_events.labels("invalid", "refused_at_recovery")
    assert refused._value.get() == 2
