"""Hostile review 11 (a): sequencing under kill -9 with a hold policy,
customers whose ids are prefixes of each other, and operators who act twice
at once. Real processes (the service, the simulators), loopback only."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, free_port, sim_report
from helpers import poll_until, retail_order
from test_chaos import Killer, stuck_summary, submit_until_acked, wait_all_terminal
from test_shards import Sharded
from test_store_full import fill, readyz, tmpfs

from bench.faults import sequencing_overlaps
from gateways.client import Client
from oms.sample import sample_orders

pytestmark = pytest.mark.slow


def held_processes(folder: Path) -> str:
    """The shipped telecom definition, failures held, 1 s step timeout."""
    folder.mkdir()
    text = resources.files("oms.processes").joinpath("telecom.toml").read_text()
    text = text.replace("timeout_s = 5.0", "timeout_s = 1.0").replace(
        'failure_policy = "compensate"', 'failure_policy = "hold"')
    (folder / "telecom.toml").write_text(text)
    return str(folder)


class Operators(threading.Thread):
    """Act on held orders (retry, skip or abort: each asked twice at once from
    two connections), cancel or abort pending ones; until stopped."""

    def __init__(self, intake: str, order_ids: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.intake, self.order_ids = intake, order_ids
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self.answers: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                with Client(self.intake, timeout=2) as one, Client(self.intake, timeout=2) as two:
                    while not self.stopped.is_set():
                        self.act(one, two)
            except TimeoutError:
                continue

    def act(self, one: Client, two: Client) -> None:
        oid = self.rng.choice(self.order_ids)
        view = one.get(oid).get("order") or {}
        state = view.get("state")
        if state == "held":
            kind = self.rng.choice(["retry_step", "retry_step", "skip_step", "abort_order"])
        elif state == "pending" and self.rng.random() < 0.01:
            kind = self.rng.choice(["cancel_order", "abort_order"])
        else:
            return
        req = {"type": kind, "order_id": oid, "operator": "rev11", "reason": "rev11"}
        results: list[str] = []

        def ask(client: Client) -> None:
            try:
                results.append(client.request(req)["type"])
            except TimeoutError:
                results.append("timeout")  # killed under us
        other = threading.Thread(target=ask, args=(two,))
        other.start()
        ask(one)
        other.join()
        for r in results:
            self.answers[f"{kind}:{r}"] += 1


def test_kill_9_with_held_orders_of_prefix_customers_and_doubled_operator_actions(
        procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    procs(eps.simulate_args() + [
        "--seed", "7", "--latency-ms", "10",
        "--drop", "activate_service=0.05", "--drop", "modify_service=0.05",
        "--drop", "create_invoice=0.05",
        "--fail", "activate_service=0.15:product_unavailable",
        "--fail", "create_invoice=0.08:rejected"], "simulate")
    orders = list(sample_orders(400, seed=5, source="web", prefix="R11-", telecom_ratio=1.0))
    customers = ["cust-1", "cust-10", "cust-100"]
    for n, order in enumerate(orders):
        order["customer"] = {"id": customers[n % 3]}
    processes = held_processes(tmp_path / "procs")
    runs = iter(range(100))

    def start_service() -> Any:
        return procs(eps.serve_args(tmp_path / "data") + ["--processes", processes],
                     f"serve-{next(runs)}")
    killer = Killer(start_service, kills=5, seed=int(os.environ.get("R11_SEED", "13")))
    acked = submit_until_acked(eps, orders, time.monotonic() + 60)
    assert len(acked) == len(orders)
    ops = Operators(eps.intake, list(acked.values()), seed=4)
    ops.start()
    killer.start()
    killer.join(60)
    assert killer.done == 5
    with Client(eps.intake, timeout=10) as client:
        client.wait_ready(30)
        views, stuck = wait_all_terminal(client, list(acked.values()), timeout=90)
    ops.stopped.set()
    ops.join(30)
    report = sim_report(eps.systems["provisioning"], all=True, per_order=True)
    print(f"\nrev11: {len(acked)} orders, asked {dict(ops.answers)}, "
          f"states {Counter(v['state'] for v in views.values())}")
    customer_of = {acked[o["external_id"]]: o["customer"]["id"] for o in orders}
    assert not stuck, stuck_summary(stuck)
    # a command the domain refused for good and an operator retried is sent
    # again as a new logical command: the simulator counts both
    retried = {oid for oid, v in views.items()
               if any(h.get("action") == "retry" for h in v.get("history") or [])}
    twice = [t for t in report["applied_twice"] if t["order_id"] not in retried]
    assert twice == [], twice[:5]
    assert sequencing_overlaps(views, customer_of) == []
    assert killer.service.terminate() == 0


def test_the_sharded_front_on_a_full_disk_refuses_submits_and_keeps_running(
        procs: Any, tmp_path: Path) -> None:
    """A full disk under the sharded service (its front's dedup index and the
    shards' stores on one file system). Before: the front's dedup index
    commit raised ``lmdb.DiskError`` out of the front's loop, so the front
    died at each round with a new submit (exit 1, restarted by the
    supervisor, dead again at the next): each such submit and whatever else
    the front held got no reply at all, and /readyz stopped answering. Now
    a submit the index cannot record is answered ``unavailable`` (nothing
    taken, as a single node answers), reads still work, /readyz says not
    ready, and it takes orders again once space returns. A front restarted
    meanwhile (kill -9) serves too: before, it exited at start, unable to
    write its ready file, again and again until space returned."""
    port = free_port()
    with tmpfs(tmp_path / "data", 24) as data:
        s = Sharded(procs, tmp_path, serve_args=("--metrics-port", str(port)))
        poll_until(lambda: readyz(port) == 200, timeout=30)
        with s.client(timeout=10) as client:
            first = client.submit(retail_order("before-full"))
            assert first["type"] == "accepted", first
            filler = fill(data)
            for n in range(3):
                reply = client.submit(retail_order(f"while-full-{n}", customer={"id": f"c{n}"}))
                assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
            assert client.get(first["order_id"])["type"] == "order"
            poll_until(lambda: readyz(port) == 503, timeout=15)
            assert client.request({"type": "order_counts"})["writable"] is False
            os.kill(int((s.data / "front" / "ready").read_text().split()[1]), signal.SIGKILL)
            client.wait_ready(30)  # restarted by the supervisor, on the full disk
            assert client.get(first["order_id"])["type"] == "order"
            reply = client.submit(retail_order("while-full-0", customer={"id": "c0"}))
            assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
            poll_until(lambda: readyz(port) == 503, timeout=15)
            filler.unlink()  # space returns
            poll_until(lambda: readyz(port) == 200, timeout=30)
            again = client.submit(retail_order("while-full-0", customer={"id": "c0"}))
            assert again["type"] == "accepted" and not again.get("duplicate"), again
            assert client.request({"type": "order_counts"})["writable"] is True
        log = (tmp_path / "serve.log").read_text()
        assert "front exited with code -9" in log
        assert "front exited with code 1" not in log
        assert s.svc.terminate() == 0  # before the tmpfs goes


def test_an_event_timeout_names_the_event_that_did_not_come() -> None:
    """The failure an operator reads in the fallout block said ``no None
    event in time``: the step's ``wait`` was cleared before the message was
    written."""
    from helpers import Driver, ok_domain
    from test_engine import _retail_text

    from oms.process import parse_process

    text = _retail_text().replace(
        'wait_event = { name = "shipment_delivered", system = "shipping" }',
        'wait_event = { name = "shipment_delivered", system = "shipping", timeout_s = 30 }')
    d = Driver(parse_process(text, "retail-wait.toml"), retail_order(), ok_domain())
    d.start()
    d.fire_timers()
    error = d.order.steps["await_delivery"].error
    assert error["code"] == "event_timeout"
    assert error["message"] == "no shipment_delivered event in time", error


def test_a_channel_subscribed_before_a_shard_moved_still_gets_every_shards_events(
        procs: Any, tmp_path: Path) -> None:
    """With CURVE off the front's events go through ``zmq.proxy`` (an XSUB
    connected to every shard, the front's XPUB); subscriptions travel
    upstream once, when a channel subscribes. When a shard moved (Ray
    rewrites ``front.json``), the front restarted the proxy with a new XSUB
    that had none of them: every channel already subscribed got no event
    from any shard again until it reconnected."""
    import json

    import zmq
    from test_shards import wait_subscribed

    s = Sharded(procs, tmp_path)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"moved\x00")
    sub.connect(s.eps.events)
    try:
        with s.client(timeout=10) as client:
            wait_subscribed(client, sub, s.data, "moved")
            front_file = s.data / "front.json"
            cfg = json.loads(front_file.read_text())
            shard = cfg["shards"][1]  # the same shard, under another name: a move
            for key in ("intake", "events", "domain_events"):  # the same socket files
                shard[key] = shard[key].replace("/run/", "/run/./")
            assert shard != json.loads(front_file.read_text())["shards"][1]
            front_file.write_text(json.dumps(cfg))
            poll_until(lambda: "shard 1 moved" in (tmp_path / "serve.log").read_text(),
                       timeout=15)
            while sub.poll(200):
                sub.recv_multipart()  # what was on its way before the move
            wait_subscribed(client, sub, s.data, "moved")  # events from both shards again
    finally:
        sub.close(0)
    assert s.svc.terminate() == 0
