"""Crash safety: kill -9 at random moments loses no acknowledged order and
applies no domain command twice. Real processes, loopback only, bounded."""

from __future__ import annotations

import random
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, sim_report

from oms.client import Client, wait_terminal
from oms.sample import sample_orders

pytestmark = pytest.mark.slow
TERMINAL = {"completed", "failed", "partial", "cancelled"}


def fast_retail(folder: Path) -> str:
    """The shipped retail process with a 1 s step timeout (dropped replies
    are noticed sooner)."""
    text = resources.files("oms.processes").joinpath("retail.toml").read_text()
    folder.mkdir()
    (folder / "retail.toml").write_text(text.replace("timeout_s = 5.0", "timeout_s = 1.0"))
    return str(folder)


class Killer(threading.Thread):
    """Kills the service with SIGKILL at random moments and restarts it."""

    def __init__(self, start_service: Any, kills: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.start_service = start_service
        self.service = start_service()
        self.kills, self.done = kills, 0
        self.rng = random.Random(seed)
        self.stopped = threading.Event()

    def run(self) -> None:
        while self.done < self.kills and not self.stopped.wait(self.rng.uniform(0.4, 1.6)):
            self.service.kill()
            self.done += 1
            self.service = self.start_service()


def submit_until_acked(eps: Endpoints, orders: list[dict[str, Any]],
                       deadline: float) -> dict[str, str]:
    acked: dict[str, str] = {}
    while len(acked) < len(orders) and time.monotonic() < deadline:
        todo = [o for o in orders if o["external_id"] not in acked]
        with Client(eps.intake, timeout=2) as client:
            try:
                client.wait_ready(10)
                for req, reply in client.pipeline(
                        ({"type": "submit_order", "order": o} for o in todo), window=64,
                        timeout=2):
                    if reply["type"] == "accepted":
                        acked[req["order"]["external_id"]] = reply["order_id"]
            except TimeoutError:
                continue  # the service died under us: connect again, resubmit the rest
    return acked


def test_kill_9_loses_nothing_and_applies_nothing_twice(procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    procs(eps.simulate_args() + [
        "--delivery-s", "0.3", "--restock-s", "0.5", "--scarce", "30", "--seed", "5",
        "--drop", "reserve_stock=0.03", "--drop", "capture_payment=0.03",
        "--drop", "create_shipment=0.03",
        "--fail", "create_invoice=0.05:unavailable", "--fail", "capture_payment=0.03:unavailable",
        "--fail", "create_shipment=0.05:unavailable"], "simulate")
    processes = fast_retail(tmp_path / "procs")
    runs = iter(range(100))

    def start_service() -> Any:
        return procs(eps.serve_args(tmp_path / "data") + ["--processes", processes],
                     f"serve-{next(runs)}")

    orders = list(sample_orders(2000, seed=21, source="web", prefix="CH-", scarce_ratio=0.05))
    killer = Killer(start_service, kills=6, seed=9)
    killer.start()
    started = time.monotonic()
    acked = submit_until_acked(eps, orders, started + 90)
    assert len(acked) == len(orders)
    killer.join(60)
    assert killer.done >= 5
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views = wait_terminal(client, list(acked.values()), timeout=120)
        assert {v["state"] for v in views.values()} <= TERMINAL
        again = {req["order"]["external_id"]: reply for req, reply in client.pipeline(
            {"type": "submit_order", "order": o} for o in orders)}
    assert all(r["duplicate"] and r["order_id"] == acked[ext] for ext, r in again.items())
    report = sim_report(eps.systems["warehouse"], all=True, per_order=True)
    assert report["applied_twice"] == []
    for oid, view in views.items():
        ops = report["per_order"][oid]["ops"]
        once = ("reserve_stock", "create_invoice", "capture_payment", "create_shipment")
        assert all(ops.get(op, 0) <= 1 for op in once), (oid, ops)
        if view["state"] == "completed":
            assert all(ops.get(op) == 1 for op in once), (oid, ops)
    print(f"\nchaos: {killer.done} kills, {len(acked)} orders acknowledged and finished in "
          f"{time.monotonic() - started:.1f} s, {report['repeats']} repeats answered from "
          f"the domain systems' caches")
    assert killer.service.terminate() == 0


@pytest.mark.slow
def test_a_passivated_orders_jeopardy_deadline_survives_kill_9(procs: Any, tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """The order waits for delivery, leaves memory, the service is killed, and
    the restarted service (which leaves it passivated) still reports it late."""
    import urllib.request

    import zmq
    from conftest import free_port
    from helpers import poll_until, retail_order

    from oms import codec

    eps = Endpoints()
    procs(eps.simulate_args() + ["--delivery-s", "3600"], "simulate")
    folder = tmp_path / "p"
    fast_retail(folder)
    path = folder / "retail.toml"
    path.write_text(path.read_text().replace("[steps.await_delivery]",
                                             "[steps.await_delivery]\nexpected_s = 3.0"))
    monkeypatch.setenv("OMS_PASSIVATE_AFTER_S", "0.1")
    port = free_port()
    args = eps.serve_args(tmp_path / "data") + ["--processes", str(folder),
                                                "--metrics-port", str(port)]
    svc = procs(args, "serve")

    def passivated() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return 'oms_order_actors{kind="passivated"} 1.0' in resp.read().decode()

    with Client(eps.intake) as client:
        client.wait_ready(30)
        oid = client.submit(retail_order("late-1"))["order_id"]
        poll_until(lambda: any(s["name"] == "await_delivery" and s["status"] == "running"
                               for s in client.get(oid)["order"]["steps"]))
    poll_until(passivated)
    svc.kill()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"web")
    sub.connect(eps.events)  # before the restart: subscribed when it binds
    try:
        again = procs(args, "serve-again")
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            if sub.poll(500):
                ev = codec.decode_map(sub.recv_multipart()[1])
                if ev.get("type") == "order_jeopardy" and ev.get("order_id") == oid:
                    seen.append(ev)
    finally:
        sub.close()
    assert seen and seen[0]["step"] == "await_delivery"
    assert "0 orders resumed, 1 waiting (passivated)" in again.log.read_text()
    with Client(eps.intake) as client:
        assert client.get(oid)["order"]["state"] == "inProgress"  # late, not failed
    poll_until(lambda: sim_report(eps.systems["crm"], order_id=oid)["order"].get("notify")
               == 2)  # inProgress, then the jeopardy notice
