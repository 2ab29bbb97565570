"""Retention (issue 18): finished orders leave the live store for the
archive, stay readable (get_order, ``oms archive``), their external ids stay
duplicates for the dedup window, and a crash while archiving loses and
duplicates nothing. Real LMDB, real sockets, real subprocesses for kill -9."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints
from helpers import poll_until, retail_order

from oms import archive, codec
from oms.client import wait_terminal
from oms.config import Config, ConfigError
from oms.sample import sample_orders
from oms.store import Store

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
        Config.load(None, env={"OMS_RETENTION_S": "soon"})
    assert Config.load(None, env={"OMS_RETENTION_S": "0"}).retention_s == 0.0


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
    finally:
        store.close()
