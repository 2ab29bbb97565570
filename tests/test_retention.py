"""Retention (issue 18): finished orders leave the live store for the
archive, stay readable (get_order, ``oms archive``), their external ids stay
duplicates for the dedup window, and a crash while archiving loses and
duplicates nothing. Real LMDB, real sockets, real subprocesses for kill -9."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints
from helpers import debian_tools, poll_until, retail_order

from actors.settings import load_config
from gateways.client import wait_terminal
from oms import snapshot
from oms.config import Config, ConfigError
from oms.sample import sample_orders
from storage import archive
from storage.records import TS_BYTES
from storage.store import Store

TERMINAL = {"completed", "failed", "partial", "cancelled"}


def _submit_all(client: Any, orders: list[dict[str, Any]]) -> dict[str, str]:
    ids = {}
    for req, reply in client.pipeline({"type": "submit_order", "order": o} for o in orders):
        assert reply["type"] == "accepted", reply
        ids[req["order"]["external_id"]] = reply["order_id"]
    return ids


def _archived(client: Any, order_id: str) -> bool:
    reply = client.get(order_id)
    return reply["type"] == "order" and reply["order"].get("archived") is True


def test_finished_orders_leave_the_store_and_stay_readable(make_service: Any, sim: Any,
                                                           client: Any, tmp_path: Path) -> None:
    svc = make_service(retention_s=0.5, retention_interval_s=0.05, retention_batch=7)
    orders = [retail_order(f"ret-{i}") for i in range(30)]
    ids = _submit_all(client, orders)
    finals = wait_terminal(client, ids.values(), timeout=20)
    poll_until(lambda: all(_archived(client, i) for i in ids.values()), timeout=15)
    # gone from the live store, in the archive exactly once
    with svc.store.read() as txn:
        assert all(svc.store.load(txn, i) is None for i in ids.values())
    seen = collections.Counter(r["order"]["order_id"] for p in archive.files(svc.store.path)
                               for r in archive.iter_file(p))
    assert set(seen) == set(ids.values()) and set(seen.values()) == {1}
    # the archived view is the final view
    some = ids["ret-3"]
    view = client.get(some)["order"]
    assert view["state"] == finals[some]["state"] and view["steps"] and view["history"]
    by_ext = client.request({"type": "get_order", "source_system": "web",
                             "external_id": "ret-3"})
    assert by_ext["order"]["order_id"] == some and by_ext["order"]["archived"] is True
    # a resubmission inside the dedup window is a duplicate with the same id and state
    again = client.submit(orders[3])
    assert (again["type"], again["order_id"], again["state"], again["duplicate"]) == (
        "accepted", some, view["state"], True)
    changed = dict(orders[3], attributes={"x": "y"})
    assert client.submit(changed)["code"] == "conflict"
    # cancel of an archived order: rejected with why, not "not found"
    cancel = client.cancel(some)
    assert cancel["type"] == "cancel_rejected" and "archived" in cancel["reason"]
    assert client.get("O999999999999")["code"] == "not_found"
    stats = svc.store.retention_stats()
    assert stats["archived_total"] == 30 and not any(stats["finished_live"].values())
    assert stats["oldest_finished_age_s"] == 0.0
    value = svc.registry.get_sample_value
    assert value("oms_archived_orders_total") == 30
    assert value("oms_store_live_orders", {"state": "completed"}) == 0
    assert value("oms_retention_seconds") == 0.5
    assert value("oms_store_file_bytes") > 0


def test_after_the_dedup_window_an_external_id_is_a_new_order(make_service: Any, sim: Any,
                                                              client: Any) -> None:
    svc = make_service(retention_s=0.2, dedup_window_s=1.0, retention_interval_s=0.05)
    order = retail_order("window-1")
    first = client.submit(order)["order_id"]
    wait_terminal(client, [first], timeout=20)
    poll_until(lambda: _archived(client, first), timeout=10)
    poll_until(lambda: svc.store.retention_stats()["archived_in_window"] == 0, timeout=10)
    assert client.get(first)["code"] == "not_found"  # the archive still has it (oms archive)
    again = client.submit(order)
    assert again["type"] == "accepted" and again["duplicate"] is False
    assert again["order_id"] != first


def test_bad_retention_settings_refuse_to_start(tmp_path: Path) -> None:
    from actors.retention import check_settings

    for over in ({"retention_s": float("nan")}, {"retention_s": -1.0},
                 {"dedup_window_s": float("inf")}, {"retention_batch": 0},
                 {"retention_interval_s": 0.0}):
        cfg = Config()
        for key, value in over.items():
            setattr(cfg, key, value)
        with pytest.raises(ConfigError):
            check_settings(cfg)
    with pytest.raises(ConfigError, match="retention_s must be a number"):
        load_config(None, env={"OMS_RETENTION_S": "soon"})
    assert load_config(None, env={"OMS_RETENTION_S": "0"}).retention_s == 0.0


def test_an_uncommitted_archive_tail_is_cut_and_a_stale_batch_refused(tmp_path: Path) -> None:
    """The crash window between the archive fsync and the LMDB commit."""
    store = Store(tmp_path / "data")
    try:
        path = archive.file_for(store.path, "2026-01-01")
        member = archive.encode_records([{"order": {"order_id": "O1"}, "finished_ts": 1.0,
                                          "archived_ts": 2.0}])
        _offsets, end = archive.append(path, 0, [member])
        # no commit happened: at start, retention cuts what is not committed
        assert archive.repair(store.path, store.archive_lengths()) and path.stat().st_size == 0
        # a batch appended after a base the store no longer has is refused whole
        with store.write() as txn:
            assert store.retire(txn, {"2026-01-01": (5, end + 5)}, [], []) == "stale"
        with store.write() as txn:
            assert store.retire(txn, {"2026-01-01": (0, end)}, [], []) == 0
        assert store.archive_lengths() == {"2026-01-01": end}
        # a committed file that lost bytes is refused, never padded
        with pytest.raises(OSError, match="fewer than the"):
            archive.append(path, end, [member])
        assert path.stat().st_size == 0
    finally:
        store.close()


def _archive_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in archive.files(data))


@pytest.mark.slow
def test_kill_9_while_archiving_loses_and_duplicates_nothing(procs: Any, tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    from gateways.client import Client

    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "0"], "simulate")
    data = tmp_path / "data"
    monkeypatch.setenv("OMS_RETENTION_BATCH", "16")  # many small batches: a wide window
    monkeypatch.setenv("OMS_RETENTION_INTERVAL_S", "0.01")
    args = eps.serve_args(data) + ["--retention-s", "2"]
    runs = iter(range(10))
    svc = procs(args, f"serve-{next(runs)}")
    orders = list(sample_orders(1200, seed=7, source="web", prefix="RK-"))
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        ids = _submit_all(client, orders)
        wait_terminal(client, ids.values(), timeout=60)
    # kill -9 the moment an archive file grows: the batch is written and
    # about to be (or being) synced and committed; three times
    kills = []
    for _ in range(3):
        before = _archive_bytes(data)
        poll_until(lambda b=before: _archive_bytes(data) > b, timeout=20, every=0.001)
        svc.kill()
        kills.append(_archive_bytes(data))
        svc = procs(args, f"serve-{next(runs)}")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        poll_until(lambda: all(r.get("order", {}).get("archived") for _, r in client.pipeline(
            {"type": "get_order", "order_id": i} for i in ids.values())), timeout=30,
            every=0.1)
        again = {req["order"]["external_id"]: r for req, r in client.pipeline(
            {"type": "submit_order", "order": o} for o in orders)}
    assert all(r["duplicate"] and r["order_id"] == ids[e] for e, r in again.items())
    assert svc.terminate() == 0
    # each order exactly once across the live store and the archive
    seen = collections.Counter(r["order"]["order_id"] for p in archive.files(data)
                               for r in archive.iter_file(p))
    assert set(seen) == set(ids.values()), "an order is missing from the archive"
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]
    store = Store(data)
    try:
        with store.read() as txn:
            assert all(store.load(txn, i) is None for i in ids.values())
        assert store.retention_stats()["archived_total"] == len(ids)
    finally:
        store.close()
    # oms archive finds them, by id and by external id
    cli = [sys.executable, "-m", "app.cli", "archive", "--data", str(data)]
    listing = json.loads(subprocess.run(cli + ["list", "--count", "--json"], capture_output=True,
                                        check=True, timeout=30).stdout)
    assert sum(f["orders"] for f in listing) == len(ids)
    some = orders[5]
    found = json.loads(subprocess.run(
        cli + ["find", "--source", "web", "--external-id", some["external_id"], "--json"],
        capture_output=True, check=True, timeout=30).stdout)
    assert found["order"]["order_id"] == ids[some["external_id"]]
    shown = subprocess.run(cli + ["find", ids[some["external_id"]]], capture_output=True,
                           text=True, check=True, timeout=30).stdout
    assert ids[some["external_id"]] in shown and "archived in orders-" in shown
    missing = subprocess.run(cli + ["find", "O000000999999"], capture_output=True, timeout=30,
                             check=False)
    assert missing.returncode == 1
    cuts = sum(p.read_text().count("cut an uncommitted tail") for p in tmp_path.glob("serve-*.log"))
    assert cuts >= 1, "no kill landed between an archive write and its commit"
    print(f"\nretention kill -9: archive bytes at the kills {kills}, {cuts} uncommitted tails "
          f"cut at restart, {len(ids)} orders once each")


def test_orders_finished_before_the_index_existed_are_found_and_archived(
        make_service: Any, sim: Any, client: Any, tmp_path: Path) -> None:
    """A store from before retention: its finished orders have no finish-time
    entry. The first start with retention finds them in bounded scans."""
    svc = make_service(retention_s=0)  # keep: finish the orders, then forget the index
    ids = _submit_all(client, [retail_order(f"old-{i}") for i in range(12)])
    wait_terminal(client, ids.values(), timeout=20)
    poll_until(lambda: sum(svc.store.retention_stats()["finished_live"].values()) == 12)
    svc.stop()
    store = Store(tmp_path / "data")
    try:  # as an older release left it: no done index, no counters
        with store.write() as txn:
            txn.drop(store.db["done"], delete=False)
            for key in [k for k, _ in txn.cursor(db=store.db["meta"])
                        if k.startswith((b"live:", b"backfill"))]:
                txn.delete(key, db=store.db["meta"])
    finally:
        store.close()
    svc = make_service(retention_s=0.5, retention_interval_s=0.05, retention_batch=5)
    poll_until(lambda: all(_archived(client, i) for i in ids.values()), timeout=15)
    stats = svc.store.retention_stats()
    assert stats["archived_total"] == 12 and not any(stats["finished_live"].values())
    seen = collections.Counter(r["order"]["order_id"] for p in archive.files(svc.store.path)
                               for r in archive.iter_file(p))
    assert set(seen) == set(ids.values()) and set(seen.values()) == {1}


def test_an_archive_that_cannot_be_written_keeps_orders_live_until_it_can(
        make_service: Any, sim: Any, client: Any, tmp_path: Path) -> None:
    """A failing archive (here: a file where the archive folder should be, as
    a full or read-only disk would fail it) is contained: counted, logged,
    retried; the orders stay live and readable, the service keeps serving."""
    (tmp_path / "data").mkdir()
    blocker = tmp_path / "data" / "archive"
    blocker.write_text("not a folder")
    svc = make_service(retention_s=0.2, retention_interval_s=0.02)
    ids = _submit_all(client, [retail_order(f"full-{i}") for i in range(5)])
    wait_terminal(client, ids.values(), timeout=20)
    value = svc.registry.get_sample_value
    poll_until(lambda: value("oms_retention_errors_total") >= 2, timeout=10)
    views = [client.get(i)["order"] for i in ids.values()]
    assert all(v["state"] == "completed" and "archived" not in v for v in views)
    assert client.submit(retail_order("full-new"))["type"] == "accepted"
    blocker.unlink()  # the disk is fixed: the next retry archives them
    poll_until(lambda: all(_archived(client, i) for i in ids.values()), timeout=20)


@pytest.mark.slow
def test_soak_reports_the_store_size_over_time(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    run = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--smoke", "--quiet",
                          "--scenario", "soak", "--rate", "200", "--retention-s", "0.5",
                          "--out", str(out)], capture_output=True, text=True, timeout=180,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "store size over the run" in run.stdout
    (report,) = out.glob("*.json")
    store = json.loads(report.read_text())["store_size"]
    assert len(store["samples"]) >= 2 and store["samples"][-1]["data_mb"] > 0
    assert store["archived_orders"] > 0 and store["archive_bytes_per_order"] > 0


def test_retention_0_keeps_finished_orders_live(make_service: Any, sim: Any,
                                                 client: Any) -> None:
    svc = make_service(retention_s=0, retention_interval_s=0.02)
    ids = _submit_all(client, [retail_order(f"keep-{i}") for i in range(4)])
    wait_terminal(client, ids.values(), timeout=20)
    poll_until(lambda: svc.store.retention_stats()["finished_live"].get("completed") == 4)
    stats = svc.store.retention_stats()
    assert stats["archived_total"] == 0 and stats["oldest_finished_age_s"] > 0
    assert not archive.files(svc.store.path)
    assert all("archived" not in client.get(i)["order"] for i in ids.values())


def test_a_finished_order_is_indexed_under_its_records_state(make_service: Any,
                                                            eps: Endpoints,
                                                            client: Any) -> None:
    """A finished order's save carries its state for the retention index
    (``SaveOrder.state``), not read back out of the record: completed,
    failed (a payment refused for good) and cancelled orders through the
    real service; each index entry holds its stored record's state, and the
    live counters count them so."""
    from conftest import SimThread

    from gateways.sim_domain import SimConfig

    sim = SimThread(SimConfig(systems=dict(eps.systems), service_events=eps.domain_events,
                              delivery_s=0.5, seed=5,
                              fail={"capture_payment": (0.4, "card_declined")}))
    try:
        svc = make_service(retention_s=0, retention_interval_s=0.02)
        ids = _submit_all(client, [retail_order(f"state-{i}") for i in range(12)])
        for order_id in list(ids.values())[:3]:  # waiting for delivery, or already failed
            client.cancel(order_id)
        finals = wait_terminal(client, ids.values(), timeout=20)
        states = {final["state"] for final in finals.values()}
        assert {"completed", "failed", "cancelled"} <= states, states
        poll_until(lambda: sum(svc.store.retention_stats()["finished_live"].values()) == 12)
        with svc.store.read() as txn:
            indexed = {bytes(k[TS_BYTES:]).decode(): bytes(v).decode()
                       for k, v in txn.cursor(db=svc.store.db["done"])}
            stored = {i: snapshot.record_state(txn.get(i.encode(), db=svc.store.db["orders"]))
                      for i in ids.values()}
        assert indexed == stored == {i: finals[i]["state"] for i in ids.values()}
        assert svc.store.retention_stats()["finished_live"] == dict(
            collections.Counter(stored.values()))
    finally:
        sim.stop()


def test_oms_serve_refuses_a_negative_retention(tmp_path: Path) -> None:
    eps = Endpoints()
    run = subprocess.run([sys.executable, "-m", "app.cli", *eps.serve_args(tmp_path / "d"),
                          "--retention-s", "-5"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 2 and "retention_s must be a number of seconds" in run.stderr


def test_the_retention_alert_fires_when_behind_and_not_otherwise() -> None:
    promtool = debian_tools(("promtool",), ("prometheus",))["promtool"]
    if promtool is None:
        pytest.skip("Debian's prometheus package (promtool) is not installed and cannot be here")
    rules = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
    run = subprocess.run([promtool, "test", "rules", "alerts_retention_test.yml"], cwd=rules,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def _finished_record(order_id: str, finished_ts: float) -> bytes:
    from oms import snapshot
    from oms.engine import new_order
    from oms.process import builtin_processes
    from oms.states import OrderState
    from oms.validation import validate_order

    req, problems = validate_order(retail_order(f"ext-{order_id}"), ["retail"])
    assert req is not None, problems
    order = new_order(order_id, req, builtin_processes()["retail"], finished_ts)
    order.state, order.updated_ts = OrderState.COMPLETED, finished_ts
    return snapshot.encode(order)


def test_the_backfill_scan_stops_at_the_last_order_of_its_start(tmp_path: Path) -> None:
    """The scan for orders finished before the index existed covers the
    orders there were when the process started, never the ones coming in
    (a fresh store: none at all), however many there are."""
    store = Store(tmp_path / "data")
    try:
        assert store.backfill_scan(0, 10, store.last_order_key()) == (0, b"\xff", [])
        old = [f"O{n:012d}" for n in range(1, 6)]
        with store.write() as txn:  # finished, no finish-time entry: an older release's
            for oid in old:
                txn.put(oid.encode(), _finished_record(oid, 100.0), db=store.db["orders"])
        until = store.last_order_key()
        assert until == old[-1].encode()
        with store.write() as txn:  # came in after the start: never scanned
            for n in range(6, 9):
                oid = f"O{n:012d}"
                txn.put(oid.encode(), _finished_record(oid, 100.0), db=store.db["orders"])
        _since, cursor, found = store.backfill_scan(200_000, 100, until)
        assert cursor == b"\xff" and [k[8:].decode() for k, _ in found] == old
        assert {state for _, state in found} == {"completed"}
        cursor, seen = b"", []
        while cursor != b"\xff":  # in chunks of 2, each recorded as the sweep's commit does
            _since, cursor, found = store.backfill_scan(200_000, 2, until)
            seen += [k[8:].decode() for k, _ in found]
            with store.write() as txn:
                txn.put(b"backfill_at", cursor, db=store.db["meta"])
        assert seen == old and store.backfill_scan(200_000, 2, until) == ()
    finally:
        store.close()
