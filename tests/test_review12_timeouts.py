"""Session 12 review of a gateway's bounded expiry (``EXPIRE_PER_TURN``):
replies that arrive for commands already due but not yet timed out (past a
turn's budget) are delivered once, as replies, and never time out after;
an idle gateway whose thousands of commands were all answered has nothing
to wait for, so its loop sleeps (``poll_timeout`` None, not 0). A real
``Gateway`` driven turn by turn on this thread, a real domain ROUTER."""

from __future__ import annotations

import time
from collections import Counter

import zmq
from prometheus_client import CollectorRegistry
from test_edges import HostileDomain, result

from actors.metrics import Metrics
from gateways.breaker import Breaker
from gateways.gateway import EXPIRE_PER_TURN, Gateway, SendCommand
from oms.messages import CommandResult, Send


def driven(domain: HostileDomain, delivered: list[tuple[str, str]]) -> Gateway:
    def deliver(order_id: str, res: CommandResult) -> None:
        delivered.append((order_id, "ok" if res.ok else res.error.code))

    gw = Gateway(zmq.Context.instance(), "billing", domain.endpoint, deliver,
                 Metrics(CollectorRegistry()), breaker=Breaker(threshold=100_000))
    gw.on_start()
    return gw


def send_all(gw: Gateway, domain: HostileDomain, n: int, timeout_s: float) -> bytes:
    for i in range(n):
        gw.on_direct(SendCommand(f"O{i:05d}", Send("billing", f"O{i:05d}:s", "create_invoice",
                                                   {}, timeout_s)))
    peer = b""
    for _ in range(n):
        peer, _frame = domain.received()
    return peer


def test_a_reply_to_a_due_command_past_the_budget_is_delivered_once_not_timed_out(
        domain: HostileDomain) -> None:
    delivered: list[tuple[str, str]] = []
    gw = driven(domain, delivered)
    try:
        n = 3 * EXPIRE_PER_TURN
        peer = send_all(gw, domain, n, 0.05)
        now = time.monotonic() + 10.0  # every deadline has passed
        gw._expire(now, 1)  # the first turn's budget: the first 256 time out
        assert len(delivered) == EXPIRE_PER_TURN
        answered = [f"O{i:05d}" for i in range(EXPIRE_PER_TURN, n, 2)]  # due, not yet expired
        for order_id in answered:
            domain.answer(peer, result(f"{order_id}:s", ok=True, data={}))
        while len(delivered) < EXPIRE_PER_TURN + len(answered):  # (a read: a new turn)
            assert gw.sock is not None and gw.sock.poll(5000)
            gw.on_readable(gw.sock)
        for turn in range(2, 6):
            gw._expire(now, turn)
        outcome = dict(delivered)
        assert len(delivered) == n and len(outcome) == n  # each command once
        assert Counter(outcome.values()) == {"timeout": n - len(answered), "ok": len(answered)}
        assert all(outcome[o] == "ok" for o in answered)
        assert not gw.pending and gw.log.due is not None  # one wake left: the log's summary
        gw.log.flush(ending=True)
        assert gw.poll_timeout() is None
    finally:
        gw.on_stop()


def test_thousands_answered_leave_an_idle_gateway_nothing_to_wait_for(
        domain: HostileDomain) -> None:
    """5,000 commands with a 60 s timeout, all answered: their deadlines
    are stale entries; ``poll_timeout`` drops them a bounded chunk a call
    (0: look again at once) and then says None, so the loop sleeps."""
    delivered: list[tuple[str, str]] = []
    gw = driven(domain, delivered)
    try:
        n = 5000
        peer = send_all(gw, domain, n, 60.0)
        for start in range(0, n, 250):  # (a chunk at a time: the ROUTER's queue holds 1,000)
            for i in range(start, start + 250):
                domain.answer(peer, result(f"O{i:05d}:s", ok=True, data={}))
            while len(delivered) < start + 250:
                assert gw.sock is not None and gw.sock.poll(10_000)
                gw.on_readable(gw.sock)
        waits = []
        while not waits or waits[-1] == 0.0:
            waits.append(gw.poll_timeout())
            assert len(waits) <= n // EXPIRE_PER_TURN + 2
        assert waits[-1] is None and set(waits[:-1]) <= {0.0}
    finally:
        gw.on_stop()
