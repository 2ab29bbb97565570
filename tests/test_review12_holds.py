"""Session 12 review of ``hold_when.match`` (``oms.holds``): a hostile or
sloppy warehouse's ``stock_reserved``.

- A value names a hold only if it is the same msgpack value: Python's ``==``
  took ``true`` for a reservation ``1``, ``false`` for ``0`` and ``1.0`` for
  ``1``, so an event of another type released an item it did not name.
- An event whose ``data`` is too large to keep (over 16 KiB) had it replaced
  by ``{dropped: why}``, which names nobody: item B's event with a large
  payload released item A, the very release ``match`` exists to prevent.
  Now the value under the holds' ``match`` is kept beside ``dropped``.

The real engine, driven as the order actor drives it (``helpers.Driver``);
the wire tests through the real endpoint and store, the last one across a kill -9
of the service with an event kept early.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Endpoints
from helpers import poll_until
from test_item_holds import MATCHED, both_backordered, held, kit_order, push, replied_by_hand, reply

from gateways.client import Client, wait_terminal
from gateways.sim_domain import SimConfig
from oms import codec, snapshot
from oms.engine import MAX_EARLY_EVENTS
from oms.holds import same
from oms.messages import CommandResult
from oms.untrusted import MAX_DATA_BYTES


def replied_with(value: Any) -> Any:
    """Items a and b held: a's reply has ``value`` as its reservation, b's ``r-b``."""
    d = replied_by_hand("a", "b")
    d.feed(CommandResult("o-1:reserve[a]", True,
                         {"reservation_id": value, "status": "backordered"}))
    reply(d, "b")
    assert held(d, "a", "b") == ["a", "b"]
    return d


@pytest.mark.parametrize("replied, sent", [
    (1, True), (0, False), (1, 1.0), (1, "1"), ([1, 2], [True, 2]), ({"k": 1}, {"k": 1.0}),
    ("r-a", b"r-a"),
])
def test_a_value_of_another_type_names_no_hold(replied: Any, sent: Any) -> None:
    d = replied_with(replied)
    d.event("stock_reserved", {"reservation_id": sent}, system="warehouse")
    assert held(d, "a", "b") == ["a", "b"]  # kept early: it names neither item
    assert [e["data"] for e in d.order.early_events] == [{"reservation_id": sent}]


@pytest.mark.parametrize("value", [7, 2.5, True, "r-7", [1, "x"], {"k": [1, 2]}])
def test_the_same_value_releases_its_hold_after_a_restart_too(value: Any) -> None:
    d = replied_with(value)
    d.order = snapshot.decode(snapshot.encode(d.order))  # (the reply as stored)
    d.event("stock_reserved", {"reservation_id": codec.unpack(codec.pack(value))},
            system="warehouse")
    assert held(d, "a", "b") == ["b"]


def test_same_is_equality_of_the_wire_value() -> None:
    assert same([1, {"a": (2, "x")}], (1, {"a": [2, "x"]}))  # an array either way
    assert not same({"a": 1}, {"a": 1, "b": 2}) and not same([1], [1, 1])
    assert not same(None, 0) and same(None, None)


BIG = "x" * (MAX_DATA_BYTES + 100)


def test_an_event_too_large_to_keep_still_releases_only_the_item_it_names() -> None:
    d = replied_by_hand("a", "b")
    reply(d, "a")
    reply(d, "b")
    d.event("stock_reserved", {"reservation_id": "r-b", "manifest": BIG}, system="warehouse")
    assert held(d, "a", "b") == ["a"]  # not a: the first waiting, before the fix
    assert d.order.steps["reserve[b]"].result == {"reservation_id": "r-b",
                                                 "status": "backordered"}
    d.event("stock_reserved", {"reservation_id": "r-a", "manifest": BIG}, system="warehouse")
    assert d.order.state == "completed"


def test_a_large_early_event_is_kept_with_its_name_for_its_item() -> None:
    d = replied_by_hand("a", "b")
    reply(d, "a")
    d.event("stock_reserved", {"reservation_id": "r-b", "manifest": BIG}, system="warehouse")
    assert held(d, "a", "b") == ["a", "b"]
    [early] = d.order.early_events
    assert early["data"]["reservation_id"] == "r-b" and "dropped" in early["data"]
    assert len(codec.pack(early)) < 1000  # the payload itself is not kept
    reply(d, "b")
    assert held(d, "a", "b") == ["a"] and d.order.early_events == []


def test_a_large_event_whose_name_is_too_large_too_names_nobody() -> None:
    """The value alone over 16 KiB: nothing of it is kept (as before)."""
    d = replied_by_hand("a", "b")
    reply(d, "a")
    d.event("stock_reserved", {"reservation_id": BIG}, system="warehouse")
    assert held(d, "a", "b") == ["b"]  # names nobody: the first waiting one


@pytest.fixture
def sim_config(eps: Any) -> SimConfig:
    """Both kit products out of stock, no restock within the test: the test
    sends ``stock_reserved`` itself (as ``test_item_holds``)."""
    return SimConfig(systems=dict(eps.systems), service_events=eps.domain_events,
                     stock_of={"p-a": 0, "p-b": 0}, restock_s=3600.0, seed=1)


def test_a_flood_of_events_naming_no_hold_logs_one_line_each(
        caplog: pytest.LogCaptureFixture) -> None:
    """Past 16 kept events each new one drops the oldest: one warning an
    event that says both (it was two: a flood of 3,000 over the wire logged
    5,984 lines), the kept ones bounded."""
    d = replied_by_hand("a", "b")
    reply(d, "a")
    n = MAX_EARLY_EVENTS + 10
    with caplog.at_level(logging.WARNING, logger="oms.engine"):
        for i in range(n):
            d.event("stock_reserved", {"reservation_id": f"r-zzz{i}"}, system="warehouse")
    lines = [r.getMessage() for r in caplog.records if r.name == "oms.engine"]
    assert len(lines) == n and all("names none of the steps waiting" in line for line in lines)
    assert sum("1 oldest early event(s) dropped" in line for line in lines) == 10
    assert len(d.order.early_events) == MAX_EARLY_EVENTS and held(d, "a", "b") == ["a", "b"]


def test_over_the_wire_a_large_event_releases_its_own_item(
        tmp_path: Path, make_service: Any, sim: Any, eps: Any, client: Client) -> None:
    oid, steps, rid = both_backordered(tmp_path, make_service, client)
    push(eps.domain_events, oid, rid["b"], manifest="y" * 30_000)  # (under the 64 KiB frame)
    poll_until(lambda: steps()["reserve[b]"]["status"] == "done", timeout=30)
    assert steps()["reserve[a]"]["status"] == "running"
    push(eps.domain_events, oid, rid["a"])
    assert wait_terminal(client, [oid], timeout=30)[oid]["state"] == "completed"


# -- kill -9 with an event kept early -------------------------------------------------


class Warehouse:
    """The warehouse by hand: it answers a ``reserve_stock`` (first sent or
    re-sent after the service's restart) only when the test says so,
    back-ordered with ``r-<item>``."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a killed peer raises
        self.sock.bind(endpoint)

    def answer(self, item: str, timeout: float = 30.0) -> None:
        """Wait for item's command (each other one read is dropped) and
        answer it; one still queued from the killed service is skipped."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            peer, frame = self.sock.recv_multipart()
            cmd = codec.decode_map(frame)
            if not cmd["command_id"].endswith(f"[{item}]"):
                continue
            try:
                self.sock.send_multipart([peer, codec.pack({
                    "type": "result", "command_id": cmd["command_id"], "ok": True,
                    "data": {"reservation_id": f"r-{item}", "status": "backordered"}})])
            except zmq.ZMQError:  # (EHOSTUNREACH: its sender is gone)
                continue
            return
        raise AssertionError(f"no reserve_stock for item {item}")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
def test_an_event_kept_early_survives_kill_9_and_goes_to_its_item(
        procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    folder = tmp_path / "procs"
    folder.mkdir()
    (folder / "kit.toml").write_text(MATCHED)
    others = ",".join(s for s in eps.systems if s != "warehouse")
    procs(eps.simulate_args() + ["--only", others], "simulate")
    warehouse = Warehouse(eps.systems["warehouse"])
    serve = eps.serve_args(tmp_path / "data") + ["--processes", str(folder)]
    svc = procs(serve, "serve")
    try:
        with Client(eps.intake, timeout=20) as client:
            client.wait_ready(30)
            oid = client.submit(kit_order("a", "b"))["order_id"]
            warehouse.answer("a")
            poll_until(lambda: client.get(oid)["order"]["state"] == "held", timeout=30)
            push(eps.domain_events, oid, "r-b")  # before b's reply: kept early (acked)
            svc.kill()
            procs(serve, "serve-again")
            client.wait_ready(30)
            warehouse.answer("b")  # the command re-sent after the restart: b's hold
            # takes its kept event at once; a's hold still waits
            poll_until(lambda: {s["name"]: s["status"] for s in client.get(oid)["order"][
                "steps"]}["reserve[b]"] == "done", timeout=30)
            view = client.get(oid)["order"]
            assert (view["state"], view["state_reason"]) == ("held", "awaiting_stock")
            push(eps.domain_events, oid, "r-a")
            assert wait_terminal(client, [oid], timeout=30)[oid]["state"] == "completed"
    finally:
        warehouse.close()
