"""Shards on Ray (docs/scaling.md): a fake 3-node cluster on this machine,
bound to 127.0.0.1; and the fencing epoch that keeps a stale copy from
writing (real processes, no Ray needed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import Endpoints, sim_report
from helpers import poll_until, retail_order

from gateways.client import Client, wait_terminal
from storage.store import FENCED_EXIT

TERMINAL = {"completed", "failed", "partial", "cancelled"}


def set_epoch(folder: Path, epoch: int) -> None:
    """What a newer copy of the shard does at its start (without our flock)."""
    env = lmdb.open(str(folder), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"epoch", str(epoch).encode())
    env.close()


@pytest.mark.slow
def test_a_stale_copy_never_writes_after_a_newer_epoch(procs: Any, tmp_path: Path,
                                                       monkeypatch: Any) -> None:
    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "0.05"], "simulate")
    data = tmp_path / "data"
    monkeypatch.setenv("OMS_EPOCH", "3")
    old = procs(eps.serve_args(data), "serve-epoch-3")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(20)
        first = client.submit(retail_order("f-1"))["order_id"]
        wait_terminal(client, [first], timeout=20)
        set_epoch(data, 4)  # a newer copy took over the folder
        try:
            reply = client.request({"type": "submit_order", "order": retail_order("f-2")},
                                   timeout=3)
        except TimeoutError:
            reply = None
        assert reply is None or reply["type"] != "accepted"  # never acknowledged
    assert old.p.wait(10) == FENCED_EXIT
    assert "fenced" in old.log.read_text()
    again = procs(eps.serve_args(data), "serve-epoch-3-again")  # a stale start
    assert again.p.wait(20) == 2
    assert "belongs to epoch 4" in again.log.read_text()
    monkeypatch.setenv("OMS_EPOCH", "5")
    newer = procs(eps.serve_args(data), "serve-epoch-5")
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(20)
        assert client.request({"type": "get_order", "source_system": "web",
                               "external_id": "f-2"})["code"] == "not_found"
        assert client.get(first)["order"]["state"] == "completed"
    assert newer.terminate() == 0


@pytest.fixture
def cluster(monkeypatch: Any) -> Any:
    # the fencing test above runs without Ray; these skip cleanly where it is missing
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'oms[ray]')")
    # every address Ray picks is the loopback one (no other interface is used)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray._private.ray_constants as rc
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(rc, "ENABLE_RAY_CLUSTER", False)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1",
            "object_store_memory": 80 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={
        **node, "include_dashboard": False, "resources": {"oms_front": 1},
        # a removed node is noticed in about 1.5 s (default: about 15 s)
        "_system_config": {"health_check_period_ms": 500,
                           "health_check_failure_threshold": 3}})
    workers = [c.add_node(**node) for _ in range(2)]
    c.connect(namespace="oms")
    yield c, workers
    try:
        from shards import ray_cluster

        ray_cluster.down()
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_shard_moves_when_its_node_is_removed_under_load(cluster: Any, procs: Any,
                                                           tmp_path: Path) -> None:
    from bench.ports import free_block
    from oms.config import Config
    from shards import ray_cluster

    c, workers = cluster
    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "0.05", "--seed", "2"], "simulate")
    cfg = Config(data=str(tmp_path / "data"), intake=eps.intake, events=eps.events,
                 domain_events=eps.domain_events, metrics_port=0, systems=dict(eps.systems),
                 shards=2, shard_base_port=free_block(8), log_level="warning")
    placed = ray_cluster.up(cfg, front_resources={"oms_front": 1})
    nodes = [s["node"] for s in placed["shards"]]
    assert nodes[0] != nodes[1]  # SPREAD
    by_id = {w.node_id: w for w in workers}
    victim = next(k for k, n in enumerate(nodes) if n in by_id)  # not on the head node
    orders = [retail_order(f"ray-{n}", customer={"id": f"rc-{n}"}) for n in range(300)]
    acked: dict[str, str] = {}
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(60)
        poll_until((tmp_path / "data" / "front" / "ready").exists, timeout=30)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set() and len(acked) < len(orders):
                todo = [o for o in orders if o["external_id"] not in acked]
                with Client(eps.intake, timeout=3) as c2:
                    try:
                        for req, reply in c2.pipeline(
                                ({"type": "submit_order", "order": o} for o in todo),
                                window=16, timeout=3):
                            if reply["type"] == "accepted":
                                acked[req["order"]["external_id"]] = reply["order_id"]
                    except TimeoutError:
                        continue

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        poll_until(lambda: len(acked) >= 60, timeout=30)
        removed = time.monotonic()
        c.remove_node(by_id[nodes[victim]], allow_graceful=False)

        def moved() -> dict[str, Any] | None:
            try:
                where = ray_cluster.status(timeout=2)["shards"][victim]
            except Exception:  # noqa: BLE001 - Ray raises many kinds while an actor moves
                return None
            return where if where["node"] != nodes[victim] and where["pid"] else None

        where = poll_until(moved, timeout=60, every=0.2)
        with Client(where["intake"], timeout=1) as direct:
            poll_until(lambda: _answers(direct), timeout=60, every=0.1)
        recovered = time.monotonic() - removed
        loader.join(60)
        stop.set()
        assert len(acked) == len(orders)
        views = wait_terminal(client, list(acked.values()), timeout=60)
        assert {v["state"] for v in views.values()} == {"completed"}
    assert where["epoch"] >= 2  # the moved copy took a new fencing epoch
    assert sim_report(eps.systems["warehouse"], all=True)["applied_twice"] == []
    print(f"\nray: shard {victim} moved from node {nodes[victim][:8]} to {where['node'][:8]} "
          f"and answered {recovered:.1f} s after its node was removed; {len(acked)} orders "
          "acknowledged and completed")


def _answers(client: Client) -> bool:
    try:
        client.request({"type": "get_order", "order_id": "-"}, timeout=0.5)
        return True
    except TimeoutError:
        return False

