"""Floods of per-command log lines, bounded (``actors.throttle.LogThrottle``)
with nothing lost: a real gateway whose real ZeroMQ domain peer never
answers times out hundreds of commands at once and logs ten lines and one
summary with the exact count, while every order still gets its timeout and
the metric counts every one; business refusals are ``info``, others
``warning``; a domain system replaying events for unknown orders to a real
service gets every event acknowledged and ten lines and a summary.

The throttles' clocks are moved by hand (the summaries' counts are exact);
the loops and sockets are real."""

from __future__ import annotations

import logging
import queue
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from helpers import poll_until
from prometheus_client import CollectorRegistry
from test_edges import HostileDomain, Pusher, event, result, sample

from actors.eventloop import EventLoop
from actors.loop import burst
from actors.metrics import Metrics
from gateways.breaker import Breaker
from gateways.gateway import EXPIRE_PER_TURN, Gateway
from oms.messages import CommandResult, Send

SUMMARY = re.compile(r"^(\d+) more (.*) in ")


class Clock:
    """Monotonic seconds, from now, moved by the test (read on the loop thread)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop("loop").start()
    yield lp
    lp.stop()


def launch(domain: HostileDomain, loop: EventLoop, delivered: queue.Queue[Any],
           breaker: Breaker | None = None) -> tuple[Gateway, Metrics]:
    def deliver(order_id: str, res: CommandResult) -> None:  # on the loop thread
        delivered.put((loop.turns, order_id, res))

    metrics = Metrics(CollectorRegistry())
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint, deliver, metrics,
                        breaker=breaker, loop=loop)
    return gw, metrics


def stop(gw: Gateway) -> None:
    gw.actor_ref.stop(block=True, timeout=5)
    gw.join(5)


def send_all(gw: Gateway, n: int, timeout_s: float) -> None:
    with burst():  # one bundle: the gateway sends them all in one slice
        for i in range(n):
            gw.send(f"O{i:05d}", Send("billing", f"O{i:05d}:inv", "create_invoice",
                                      {"total_minor": 5}, timeout_s))


def records(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if r.name == logger and text in r.getMessage()]


def summaries(caplog: pytest.LogCaptureFixture, logger: str, what: str) -> list[int]:
    found = []
    for r in list(caplog.records):
        m = SUMMARY.match(r.getMessage())
        if r.name == logger and m and m.group(2) == what:
            found.append(int(m.group(1)))
    return found


def test_hundreds_of_timeouts_at_once_log_ten_lines_and_one_exact_summary(
        domain: HostileDomain, loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """A domain system that never answers: 200 commands (under one turn's
    ``EXPIRE_PER_TURN``) time out at once. The first ten are logged with
    their order and command ids; the other 190 only counted, and the count
    leaves at the gateway's tick after the window's end, though nothing
    times out any more. Every order gets its timeout; the metric counts 200."""
    caplog.set_level(logging.INFO, logger="gateways.gateway")
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, loop, delivered)  # the default breaker: it opens on the way
    clock = gw.log.clock = Clock()
    try:
        n = 200
        assert n <= EXPIRE_PER_TURN
        send_all(gw, n, 0.01)
        for _ in range(n):
            domain.received()  # sent, never answered
        got = [delivered.get(timeout=30) for _ in range(n)]
        print("timeouts delivered in loop turns", dict(Counter(t for t, _, _ in got)))
        assert [order_id for _, order_id, _ in got] == [f"O{i:05d}" for i in range(n)]
        assert all(not res.ok and res.error.code == "timeout" for _, _, res in got)
        assert sample(metrics, "oms_gateway_timeouts_total", system="billing") == n
        assert sample(metrics, "oms_step_seconds_count", system="billing", op="create_invoice",
                      outcome="timeout") == n

        lines = records(caplog, "gateways.gateway", "no reply from billing to create_invoice")
        assert [(r.order_id, r.command_id, r.system, r.levelno)  # type: ignore[attr-defined]
                for r in lines] == [(f"O{i:05d}", f"O{i:05d}:inv", "billing", logging.WARNING)
                                    for i in range(10)]
        assert summaries(caplog, "gateways.gateway", "timeouts from billing to create_invoice"
                         ) == []  # the window has not ended (its clock stands still)
        clock.now += 1.0  # no deadline is left: the summary leaves at a tick armed for it
        poll_until(lambda: summaries(caplog, "gateways.gateway",
                                     "timeouts from billing to create_invoice"), timeout=10)
        assert summaries(caplog, "gateways.gateway",
                         "timeouts from billing to create_invoice") == [n - 10]
        summary = records(caplog, "gateways.gateway", "190 more timeouts")[0]
        assert (summary.levelno, summary.system) == (logging.WARNING, "billing")  # type: ignore[attr-defined]
        assert len(records(caplog, "gateways.gateway", "no reply from")) == 10
        assert gw.log.due is None
    finally:
        stop(gw)


def test_thousands_of_timeouts_on_the_real_clock_are_all_logged_or_counted(
        domain: HostileDomain, loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """5,000 commands time out over many turns, on the real clock: however
    many windows that spans, each has at most ten lines, and the lines and
    the summaries' counts add up to 5,000 exactly once the flood is over."""
    caplog.set_level(logging.WARNING, logger="gateways.gateway")
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, loop, delivered, Breaker(threshold=100_000))
    started = time.monotonic()
    try:
        n = 5000
        send_all(gw, n, 0.001)
        got = [delivered.get(timeout=60) for _ in range(n)]
        assert {res.error.code for _, _, res in got} == {"timeout"}
        assert sample(metrics, "oms_gateway_timeouts_total", system="billing") == n
        what = "timeouts from billing to create_invoice"

        def accounted() -> bool:
            lines = records(caplog, "gateways.gateway", "no reply from")
            return len(lines) + sum(summaries(caplog, "gateways.gateway", what)) == n

        poll_until(accounted, timeout=10)
        counts = summaries(caplog, "gateways.gateway", what)
        lines = records(caplog, "gateways.gateway", "no reply from")
        print(f"{n} timeouts in {time.monotonic() - started:.2f} s: {len(lines)} lines, "
              f"summaries {counts}")
        assert len(counts) >= 1 and len(lines) <= 10 * (len(counts) + 1)
        assert len({r.order_id for r in lines}) == len(lines)  # type: ignore[attr-defined]
    finally:
        stop(gw)


def test_business_refusals_are_info_and_bounded_other_refusals_warnings(
        domain: HostileDomain, loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """30 ``out_of_stock`` refusals (the order's answer, on the order and in
    ``oms_step_seconds``): ten ``info`` lines and a summary of 20. Three
    retryable ``unavailable`` refusals: three warnings. A code the gateway
    does not know is a warning too."""
    caplog.set_level(logging.INFO, logger="gateways.gateway")
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, loop, delivered, Breaker(threshold=100_000))
    clock = gw.log.clock = Clock()
    try:
        n = 34
        send_all(gw, n, 30.0)
        for i in range(n):
            peer, cmd = domain.command()
            code, retryable = (("out_of_stock", False) if i < 30 else
                               ("unavailable", True) if i < 33 else ("mystery", False))
            domain.answer(peer, result(cmd["command_id"], ok=False, error={
                "code": code, "message": "no", "retryable": retryable}))
        got = [delivered.get(timeout=10) for _ in range(n)]
        assert Counter(res.error.code for _, _, res in got) == {
            "out_of_stock": 30, "unavailable": 3, "mystery": 1}
        assert sample(metrics, "oms_step_seconds_count", system="billing", op="create_invoice",
                      outcome="out_of_stock") == 30
        refused = records(caplog, "gateways.gateway", "billing refused create_invoice")
        assert Counter((r.levelno, r.getMessage().split(": ")[1]) for r in refused) == {
            (logging.INFO, "out_of_stock no"): 10, (logging.WARNING, "unavailable no"): 3,
            (logging.WARNING, "mystery no"): 1}
        clock.now += 1.0
        what = "out_of_stock refusals from billing to create_invoice"
        poll_until(lambda: summaries(caplog, "gateways.gateway", what), timeout=10)
        assert summaries(caplog, "gateways.gateway", what) == [20]
        assert records(caplog, "gateways.gateway", "20 more")[0].levelno == logging.INFO
    finally:
        stop(gw)


def test_a_gateway_stopping_logs_the_count_it_held(
        domain: HostileDomain, loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateways.gateway")
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _metrics = launch(domain, loop, delivered, Breaker(threshold=100_000))
    gw.log.clock = Clock()  # stands still: the window never ends by itself
    try:
        send_all(gw, 25, 0.01)
        for _ in range(25):
            delivered.get(timeout=30)
    finally:
        stop(gw)
    assert summaries(caplog, "gateways.gateway", "timeouts from billing to create_invoice"
                     ) == [15]


def test_events_replayed_for_unknown_orders_are_all_acked_and_logged_bounded(
        service: Any, eps: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A domain system replays 300 events for orders this service does not
    have (a backlog after a restore): each is acknowledged and counted; the
    log has ten lines (with their event and order ids) and one summary of
    290, which leaves at the endpoint's tick once its window has ended."""
    caplog.set_level(logging.INFO, logger="actors.domain_events")
    clock = service.domain_events.log.clock = Clock()
    pusher = Pusher(eps.domain_events)
    try:
        n = 300
        sent = [event(f"GONE-{i}", "warehouse", "stock_reserved") for i in range(n)]
        for ev in sent:
            assert pusher.push(ev) == {"type": "ack", "event_id": ev["event_id"]}
    finally:
        pusher.close()
    assert service.metrics.registry.get_sample_value(
        "oms_domain_events_total", {"system": "warehouse", "outcome": "unknown_order"}) == n
    lines = records(caplog, "actors.domain_events", "acknowledged and ignored")
    assert [(r.event_id, r.order_id, r.system) for r in lines] == [  # type: ignore[attr-defined]
        (ev["event_id"], ev["order_id"], "warehouse") for ev in sent[:10]]
    assert lines[0].getMessage() == (f"domain event {sent[0]['event_id']} for unknown order "
                                     "GONE-0 acknowledged and ignored")
    clock.now += 1.0
    what = "events from warehouse for unknown orders acknowledged and ignored"
    poll_until(lambda: summaries(caplog, "actors.domain_events", what), timeout=10)
    assert summaries(caplog, "actors.domain_events", what) == [n - 10]
