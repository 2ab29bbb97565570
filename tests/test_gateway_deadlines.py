"""A gateway's step timeouts (kept in one FIFO queue per timeout value),
over real ZeroMQ sockets: they fire in deadline order across timeout values,
once for a re-sent command, never for an answered one, and a delivery that
fails does not lose the other timeouts due at the same tick."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from helpers import failing_deliverer
from prometheus_client import CollectorRegistry
from test_edges import HostileDomain, result, sample

from actors.metrics import Metrics
from gateways.breaker import Breaker
from gateways.gateway import Gateway, SendCommand
from oms.messages import CommandResult, Send


@pytest.fixture
def domain() -> Iterator[HostileDomain]:
    d = HostileDomain()
    yield d
    d.close()


def launch(domain: HostileDomain, delivered: queue.Queue[Any],
           fail_for: str = "") -> tuple[Gateway, Metrics]:
    def deliver(order_id: str, res: CommandResult) -> None:
        if order_id == fail_for:
            raise RuntimeError("this order's delivery fails")
        delivered.put((order_id, res))

    metrics = Metrics(CollectorRegistry())
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint, deliver, metrics,
                        breaker=Breaker(threshold=1000))
    return gw, metrics


def send(gw: Gateway, domain: HostileDomain, order_id: str, timeout_s: float,
         cid: str | None = None) -> bytes:
    gw.send(order_id, Send("billing", cid or f"{order_id}:step", "create_invoice",
                           {"total_minor": 5}, timeout_s))
    peer, _ = domain.command()
    return peer


def stop(gw: Gateway) -> None:
    gw.actor_ref.stop(block=True, timeout=5)
    gw.join(5)


def test_timeouts_of_different_values_fire_in_deadline_order(domain: HostileDomain) -> None:
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, delivered)
    try:
        for order_id, timeout_s in (("SLOW", 3.0), ("FAST", 0.05), ("MID", 1.5)):
            send(gw, domain, order_id, timeout_s)
        got = [delivered.get(timeout=10) for _ in range(3)]
        assert [order_id for order_id, _ in got] == ["FAST", "MID", "SLOW"]
        assert all(res.error.code == "timeout" and res.error.retryable for _, res in got)
        assert sample(metrics, "oms_gateway_timeouts_total", system="billing") == 3
        assert gw.poll_timeout() is None  # nothing left to wait for
    finally:
        stop(gw)


def test_a_resent_command_times_out_once_and_an_answered_one_never(
        domain: HostileDomain) -> None:
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, delivered)
    try:
        send(gw, domain, "RESENT", 0.2)
        send(gw, domain, "RESENT", 0.2)  # the same command_id again: a retry
        peer = send(gw, domain, "ANSWERED", 0.05)
        domain.answer(peer, result("ANSWERED:step", ok=True, data={}))
        assert delivered.get(timeout=5)[0] == "ANSWERED"
        send(gw, domain, "LAST", 0.5)
        assert [delivered.get(timeout=10)[0] for _ in range(2)] == ["RESENT", "LAST"]
        assert delivered.empty()  # the first send's deadline and the answered one's: dropped
        assert sample(metrics, "oms_gateway_timeouts_total", system="billing") == 2
        assert sample(metrics, "oms_gateway_retries_total", system="billing") == 1
    finally:
        stop(gw)


def test_a_failing_delivery_of_a_timeout_loses_no_other_timeout(
        domain: HostileDomain) -> None:
    """Driven on this thread (not launched), so both deadlines are due at
    one tick: the first delivery raises (the loop survives that), the next
    tick still times out the other command."""
    delivered, deliver = failing_deliverer()

    metrics = Metrics(CollectorRegistry())
    gw = Gateway(zmq.Context.instance(), "billing", domain.endpoint, deliver, metrics)
    gw.on_start()
    try:
        for order_id, timeout_s in (("BAD", 0.05), ("O2", 0.05), ("O3", 7.0)):
            gw.on_direct(SendCommand(order_id, Send("billing", f"{order_id}:step",
                                                    "create_invoice", {}, timeout_s)))
        now = time.monotonic() + 1.0  # BAD's and O2's deadlines passed, not O3's
        with pytest.raises(RuntimeError):
            gw._expire(now)
        assert delivered.empty() and set(gw.pending) == {"O2:step", "O3:step"}
        gw._expire(now)
        order_id, res = delivered.get_nowait()
        assert (order_id, res.error.code) == ("O2", "timeout")
        assert set(gw.pending) == {"O3:step"} and 6000 < (gw.poll_timeout() or 0) <= 7000
    finally:
        gw.on_stop()
