"""A store that cannot write: a real full disk (a small tmpfs as the data
folder, when the tests run as root) and a map at its ``max_map_size_mb`` cap.

Nothing uncommitted is acknowledged or acted on; every waiter gets an error
reply; the service says it is not ready; once space returns it carries on
and the orders that were mid-flight finish, each command applied once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SimThread, free_port
from helpers import poll_until, retail_order

from gateways.client import Client, wait_terminal
from oms.sample import sample_orders

pytestmark = pytest.mark.slow
PAD = {f"k{n}": "p" * 900 for n in range(5)}  # every order needs fresh pages


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                           str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the file system under ``folder``."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(chunk)
    return filler


def submit_until_refused(client: Client, prefix: str, limit: int = 3000
                         ) -> tuple[list[str], list[dict[str, Any]]]:
    """Pipelines orders until the store refuses some; the accepted ids and the
    refusals (at most ``limit`` orders)."""
    accepted, refused = [], []
    for start in range(0, limit, 200):
        batch = [retail_order(f"{prefix}{n}", attributes={"pad": PAD})
                 for n in range(start, start + 200)]
        for _q, r in client.pipeline({"type": "submit_order", "order": o} for o in batch):
            if r["type"] == "accepted":
                accepted.append(r["order_id"])
            else:
                refused.append(r)
        if refused:
            break
    return accepted, refused


def commit_errors(svc: Any) -> float:
    return svc.registry.get_sample_value("oms_store_commit_errors_total") or 0.0


def test_a_full_disk_refuses_clearly_then_carries_on(make_service: Any, sim_config: Any,
                                                    eps: Any, tmp_path: Path) -> None:
    sim_config.latency_ms = 20.0  # orders are mid-flight when the disk fills
    sim_config.delivery_s = 0.5
    data = tmp_path / "data"
    with tmpfs(data, 24):
        sim = SimThread(sim_config)
        try:
            svc = make_service(data=str(data / "store"), map_size_mb=1)
            with Client(eps.intake, timeout=20) as client:
                flying = [r["order_id"] for _q, r in client.pipeline(
                    {"type": "submit_order", "order": o}
                    for o in sample_orders(30, seed=4, source="web", prefix="FLY-"))]
                filler = fill(data)
                accepted, refused = submit_until_refused(client, "FULL-")
                assert refused, "the full disk never refused an order"
                assert {(r["type"], r["code"]) for r in refused} == {("error", "unavailable")}
                assert "retry later" in refused[0]["message"]
                assert not svc.store_writable and commit_errors(svc) >= 1
                assert svc.registry.get_sample_value("oms_store_write_failing") == 1
                again = client.submit(retail_order("while-full"))  # refused at the door
                assert again["type"] == "error" and again["code"] == "unavailable"
                cancel = client.request({"type": "cancel_order", "order_id": flying[-1]})
                assert cancel["type"] == "error" and cancel["code"] == "unavailable"
                # reads still work, and nothing refused was stored
                assert client.get(flying[0])["type"] == "order"
                filler.unlink()  # space returns
                poll_until(lambda: svc.store_writable, timeout=10)
                assert client.submit(retail_order("after-full"))["type"] == "accepted"
                views = wait_terminal(client, flying + accepted, timeout=60)
                assert {v["state"] for v in views.values()} == {"completed"}
                for n in range(len(accepted), len(accepted) + 5):
                    ext = f"FULL-{n}"  # refused ones were not taken: not found, can be resent
                    found = client.request({"type": "get_order", "source_system": "web",
                                            "external_id": ext})
                    if found["type"] == "error":
                        assert found["code"] == "not_found"
            report = sim.report(all=True)
            assert report["applied_twice"] == []
            svc.stop()  # before the tmpfs goes
        finally:
            sim.stop()


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_map_at_its_cap_refuses_then_a_restart_with_a_higher_cap_recovers(
        make_service: Any, sim: Any, eps: Any) -> None:
    port = free_port()
    svc = make_service(map_size_mb=1, max_map_size_mb=2, metrics_port=port)
    assert readyz(port) == 200
    with Client(eps.intake, timeout=20) as client:
        accepted, refused = submit_until_refused(client, "CAP-")
        assert accepted and refused
        assert refused[0]["code"] == "unavailable"
        assert not svc.store_writable
        assert readyz(port) == 503
        svc.stop()  # held snapshots never committed: recovery restarts them
        make_service(map_size_mb=1, max_map_size_mb=0)
        client.wait_ready(30)
        views = wait_terminal(client, accepted, timeout=60)
        assert {v["state"] for v in views.values()} == {"completed"}
        assert client.submit(retail_order("after-cap"))["type"] == "accepted"


def test_the_writer_runs_no_effect_of_a_snapshot_until_it_is_durable(tmp_path: Path) -> None:
    """The writer alone, on a real full disk: the snapshot's callbacks do not
    run while its commit fails, a domain event in the failed batch gets
    "error", nothing ends the process; once space returns the same snapshot
    is committed and only then its callbacks run."""
    from helpers import Probe

    from actors.effects import Collect, Tell
    from actors.store_writer import RecordEvent, SaveOrder

    with full_disk_writer(tmp_path) as (store, writer, filler, fatal):
        ran: list[str] = []
        events: list[str] = []
        record = b"r" * 300_000  # needs fresh pages
        ids = [f"O00000000000{n}" for n in range(1, 6)]
        for oid in ids:
            writer.tell(SaveOrder(oid, record, True, (),
                                  (Tell(Probe(lambda _m, o=oid: ran.append(o)), "saved"),)))
        writer.tell(RecordEvent(ids[0], "shipping", "ev-1", {}, Collect(events)))
        poll_until(lambda: not writer.healthy and events, timeout=10)
        assert ran == [] and events == ["error"] and fatal == []
        assert store.get_order(ids[0]) is None  # nothing stored
        filler.unlink()
        poll_until(lambda: writer.healthy and len(ran) == 5, timeout=10)
        assert ran == ids and fatal == []  # in order, each after its commit
        with store.read() as txn:
            assert all(txn.get(o.encode(), db=store.db["orders"]) == record for o in ids)


@contextlib.contextmanager
def full_disk_writer(tmp_path: Path) -> Iterator[tuple[Any, Any, Path, list[str]]]:
    """A real ``StoreWriter`` on a store in an 8 MB tmpfs that ``filler``
    (unlink it to free the space) has filled: (store, writer, filler, the
    writer's fatal reports). Held writes are retried two per transaction."""
    from prometheus_client import CollectorRegistry

    from actors.metrics import Metrics
    from actors.store_writer import StoreWriter
    from storage.store import MIB, Store

    with tmpfs(tmp_path / "disk", 8) as disk:
        store = Store(disk / "store", map_size=MIB)
        fatal: list[str] = []
        writer = StoreWriter.launch(store, Metrics(CollectorRegistry()), fatal=fatal.append)
        try:
            writer.batch_limit = 2
            yield store, writer, fill(disk), fatal
        finally:
            writer.actor_ref.stop(block=True, timeout=10)
            writer.join(5)
            store.close()


class HeldWaitingOrder:
    """A retail order whose snapshot that makes it wait (for delivery) is
    held by a full disk: ``step`` reads its durable view, ``in_memory`` its
    live actor's order (None once it left), ``release`` gives the space back."""

    def __init__(self, svc: Any, client: Client, oid: str, release: Any) -> None:
        self.svc, self.client, self.oid, self.release = svc, client, oid, release

    def step(self, name: str) -> str:
        view = self.client.get(self.oid)["order"]  # the durable view
        return next(s["status"] for s in view["steps"] if s["name"] == name)

    def in_memory(self) -> Any:
        ref = self.svc.router._live.get(self.oid)
        actor = ref._actor_weakref() if ref is not None else None
        return actor.order if actor is not None else None


@contextlib.contextmanager
def waiting_order_on_a_full_disk(make_service: Any, sim_config: Any, eps: Any,
                                 tmp_path: Path, name: str) -> Iterator[HeldWaitingOrder]:
    """The reply that makes an order wait (for delivery) comes while the
    disk is full, and a reader holds every page freed since the order
    began, so no commit fits: its snapshot is held until ``release``."""
    sim_config.latency_ms = 1500.0  # create_shipment's reply comes after the disk filled
    sim_config.delivery_s = 3600.0  # then it waits
    data = tmp_path / "data"
    with tmpfs(data, 24):
        sim = SimThread(sim_config)
        try:
            svc = make_service(data=str(data / "store"), map_size_mb=64,
                               passivate_after_s=0.05)  # the map never fills first
            reader = svc.store.env.begin()  # no page freed from now on is written again
            with Client(eps.intake, timeout=30) as client:
                oid = client.submit(retail_order(name, attributes={"pad": PAD}))["order_id"]
                held = HeldWaitingOrder(svc, client, oid, None)
                poll_until(lambda: held.step("create_shipment") == "running", timeout=30)
                filler = fill(data)  # so every commit needs pages the disk cannot give
                crumbs = data / "crumbs"  # and the last pages ``fill``'s chunks left
                with open(crumbs, "wb", buffering=0) as out, contextlib.suppress(OSError):
                    while True:
                        out.write(b"\0" * 4096)
                released = []

                def release() -> None:
                    if not released:
                        released.append(True)
                        reader.abort()
                        filler.unlink()
                        crumbs.unlink()

                held.release = release
                try:
                    poll_until(lambda: held.in_memory() is not None and held.in_memory().steps[
                        "await_delivery"].status == "running", timeout=10)
                    yield held
                finally:
                    release()
            svc.stop()  # before the tmpfs goes
        finally:
            sim.stop()


def test_a_waiting_order_leaves_memory_only_once_its_snapshot_is_durable(
        make_service: Any, sim_config: Any, eps: Any, tmp_path: Path) -> None:
    """A waiting order's held snapshot (``waiting_order_on_a_full_disk``):
    the order is marked idle but not confirmed. Through a second of failed
    commits and twenty sweeps it stays in memory (leaving would lose the
    state the store does not have); once space returns the snapshot is
    committed and it leaves memory, its stored view the newest."""
    with waiting_order_on_a_full_disk(make_service, sim_config, eps, tmp_path,
                                      "wait-full") as held:
        svc, oid = held.svc, held.oid
        poll_until(lambda: commit_errors(svc) >= 3, timeout=10)  # a second, held
        assert oid in svc.router.live_ids()
        assert svc.router.snapshot()["passivated"] == 0
        assert held.step("create_shipment") == "running"  # the store has the old state
        held.release()
        poll_until(lambda: svc.router.snapshot()["passivated"] == 1, timeout=10)
        assert oid not in svc.router.live_ids()
        assert (held.step("create_shipment"), held.step("await_delivery")) == (
            "done", "running")
