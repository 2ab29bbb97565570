"""A gateway's step timeouts (kept in one FIFO queue per timeout value),
over real ZeroMQ sockets: they fire in deadline order across timeout values,
once for a re-sent command, never for an answered one, and a delivery that
fails does not lose the other timeouts due at the same tick. Thousands due
at once time out at most ``EXPIRE_PER_TURN`` a loop turn, in the turns that
follow, none twice, none lost, in deadline order."""

from __future__ import annotations

import queue
import time
from collections import Counter
from typing import Any

import pytest
import zmq
from helpers import failing_deliverer
from prometheus_client import CollectorRegistry
from test_edges import HostileDomain, result, sample

from actors.eventloop import EventLoop
from actors.loop import burst
from actors.metrics import Metrics
from gateways.breaker import Breaker
from gateways.gateway import EXPIRE_PER_TURN, Gateway, SendCommand
from oms.messages import CommandResult, Send


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
            gw._expire(now, 1)
        assert delivered.empty() and set(gw.pending) == {"O2:step", "O3:step"}
        gw._expire(now, 1)
        order_id, res = delivered.get_nowait()
        assert (order_id, res.error.code) == ("O2", "timeout")
        assert set(gw.pending) == {"O3:step"} and 6000 < (gw.poll_timeout() or 0) <= 7000
    finally:
        gw.on_stop()


def command(i: int, timeout_s: float) -> SendCommand:
    return SendCommand(f"O{i:05d}", Send("billing", f"O{i:05d}:step", "create_invoice", {},
                                         timeout_s))


def test_thousands_due_at_once_time_out_a_bounded_chunk_a_turn(
        domain: HostileDomain) -> None:
    """Driven on this thread, turn by turn: 5,000 commands over three timeout
    values (500 of them re-sent, so their first deadlines are stale) all due
    at once. Each turn takes at most ``EXPIRE_PER_TURN`` deadlines, however
    often it ticks; every command times out once, in deadline order across
    the queues; then ``poll_timeout`` has nothing left to wait for."""
    delivered: list[tuple[int, str, str]] = []
    turn = 0
    metrics = Metrics(CollectorRegistry())
    gw = Gateway(zmq.Context.instance(), "billing", domain.endpoint,
                 lambda order_id, res: delivered.append((turn, order_id, res.error.code)),
                 metrics, breaker=Breaker(threshold=1000))
    gw.on_start()
    try:
        n = 5000
        for i in range(n):
            gw.on_direct(command(i, (7.0, 3.0, 5.0)[i % 3]))
        for i in range(0, n, 10):
            gw.on_direct(command(i, 1.0))  # a retry: its first deadline goes stale
        expected = [p.order_id for _, p in sorted(gw.pending.items(),
                                                  key=lambda kv: (kv[1].deadline, kv[0]))]
        now = time.monotonic() + 60.0  # every deadline has passed
        while gw.pending and turn < 100:
            turn += 1
            for _ in range(3):  # a turn ticks after each slice and read: one budget
                gw._expire(now, turn)
        assert gw.log.due is not None  # one wake left: the summary of the timeouts not logged
        gw.log.flush(ending=True)
        assert gw.poll_timeout() is None  # nothing left to wait for
        per_turn = Counter(t for t, _, _ in delivered)
        assert max(per_turn.values()) == EXPIRE_PER_TURN
        assert len(per_turn) == turn and turn <= (n + n // 10) // EXPIRE_PER_TURN + 1
        assert [order_id for _, order_id, _ in delivered] == expected  # each once, in order
        assert {code for _, _, code in delivered} == {"timeout"}
        assert sample(metrics, "oms_gateway_timeouts_total", system="billing") == n
    finally:
        gw.on_stop()


def test_many_stale_deadlines_are_dropped_a_bounded_chunk_a_poll(
        domain: HostileDomain) -> None:
    """2,000 commands re-sent: the 2,000 first deadlines in front are stale.
    ``poll_timeout`` drops at most ``EXPIRE_PER_TURN`` of them a call and
    answers 0 (look again next turn) until it reaches a live one."""
    gw = Gateway(zmq.Context.instance(), "billing", domain.endpoint, lambda *_: None,
                 Metrics(CollectorRegistry()), breaker=Breaker(threshold=1000))
    gw.on_start()
    try:
        for _ in range(2):
            for i in range(2000):
                gw.on_direct(command(i, 30.0))
        waits = [gw.poll_timeout() for _ in range(-(-2000 // EXPIRE_PER_TURN))]
        assert waits[:-1] == [0.0] * (len(waits) - 1)
        assert 25_000 < (waits[-1] or 0) <= 30_000
    finally:
        gw.on_stop()


def test_a_launched_gateway_times_out_thousands_over_consecutive_turns(
        domain: HostileDomain) -> None:
    """On a real event loop: 5,000 commands told in one bundle (one slice),
    each with a 1 ms timeout, so thousands are overdue at the slice's tick.
    The loop turn of each delivery is recorded: at most ``EXPIRE_PER_TURN``
    a turn, in consecutive turns (the rest is due at once, not after a
    poll's idle wait), each command once, in send (= deadline) order."""
    delivered: queue.Queue[tuple[int, str, str]] = queue.Queue()
    loop = EventLoop("loop").start()

    def deliver(order_id: str, res: CommandResult) -> None:  # on the loop thread
        delivered.put((loop.turns, order_id, res.error.code if res.error else "ok"))

    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint, deliver,
                        Metrics(CollectorRegistry()), breaker=Breaker(threshold=1000),
                        loop=loop)
    try:
        n = 5000
        with burst():  # one bundle: the gateway sends all 5,000 in one slice
            for i in range(n):
                gw.send(*command(i, 0.001))
        got = [delivered.get(timeout=60) for _ in range(n)]
        turns = Counter(t for t, _, _ in got)
        assert max(turns.values()) == EXPIRE_PER_TURN  # thousands were due at one tick
        assert sorted(turns) == list(range(min(turns), max(turns) + 1))
        assert [order_id for _, order_id, _ in got] == [f"O{i:05d}" for i in range(n)]
        assert {code for _, _, code in got} == {"timeout"} and delivered.empty()
    finally:
        stop(gw)
        loop.stop()
