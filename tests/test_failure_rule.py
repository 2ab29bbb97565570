"""The one failure rule (docs/architecture.md, "Failure rule"): an order
whose handler raises goes to fallout; a service thread survives one bad
message or the process exits non-zero; timers, the metrics port and the
start-up warnings that keep the service honest."""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from actors.timers import TimerService
from oms.messages import TimerFired
from oms.metrics import Metrics


# -- timers (defect 15, and defect 4's timer side) ---------------------------

class WallClock:
    """A wall clock the test can step; passed to TimerService as its clock."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _timers(clock: Any = time.time) -> tuple[TimerService, queue.Queue, Metrics]:
    fired: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    timers = TimerService(lambda oid, msg: fired.put((oid, msg)), metrics, clock=clock)
    return timers, fired, metrics


def test_a_backward_wall_clock_step_does_not_delay_an_armed_timer() -> None:
    clock = WallClock()
    timers, fired, _ = _timers(clock)
    try:
        timers.schedule(clock() + 0.3, "o-1", ("retry", "s", 1))
        clock.offset = -3600.0  # the wall clock steps back an hour after arming
        started = time.monotonic()
        assert fired.get(timeout=5) == ("o-1", TimerFired(("retry", "s", 1)))
        assert time.monotonic() - started < 5  # not an hour
        # a deadline armed after the step is read against the stepped clock
        timers.schedule(clock() + 0.1, "o-2", ("retry", "s", 1))
        assert fired.get(timeout=5)[0] == "o-2"
    finally:
        timers.stop()


def test_a_forward_wall_clock_step_does_not_fire_timers_early() -> None:
    clock = WallClock()
    timers, fired, _ = _timers(clock)
    try:
        timers.schedule(clock() + 30, "o-late", ("retry", "s", 1))
        clock.offset = 3600.0
        timers.schedule(clock() + 0.05, "o-soon", ("retry", "s", 1))
        assert fired.get(timeout=5)[0] == "o-soon"
        assert fired.empty() and len(timers) == 1
    finally:
        timers.stop()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -5.0, 0, 1e300, "soon", None, True])
def test_a_bad_deadline_is_refused_and_never_poisons_the_heap(bad: Any) -> None:
    timers, fired, metrics = _timers()
    try:
        timers.schedule(bad, "o-bad", ("retry", "s", 1))
        timers.schedule(time.time() + 0.05, "o-good", ("retry", "s", 1))
        got = {fired.get(timeout=5)[0], fired.get(timeout=5)[0]}
        assert got == {"o-bad", "o-good"}  # the bad one is armed 1 s out, still fires
        assert metrics.bad_deadlines._value.get() == 1
        assert timers.alive() and len(timers) == 0
        # and the thread is idle, not spinning: it waits on its condition
        cpu = time.process_time()
        timers.schedule(time.time() + 0.2, "o-3", ("retry", "s", 1))
        assert fired.get(timeout=5)[0] == "o-3"
        assert time.process_time() - cpu < 0.15
    finally:
        timers.stop()


def test_a_failing_delivery_does_not_end_the_timers_thread() -> None:
    fired: queue.Queue = queue.Queue()
    metrics = Metrics(CollectorRegistry())

    def deliver(order_id: str, msg: Any) -> None:
        if order_id == "poison":
            raise RuntimeError("delivery failed")
        fired.put(order_id)

    timers = TimerService(deliver, metrics)
    try:
        timers.schedule(time.time(), "poison", ("retry", "s", 1))
        timers.schedule(time.time() + 0.05, "ok", ("retry", "s", 1))
        assert fired.get(timeout=5) == "ok"
        assert timers.alive()
        assert metrics.internal_errors.labels("timers")._value.get() == 1
    finally:
        timers.stop()


# -- the metrics port (defect 17) --------------------------------------------

def test_idle_connections_do_not_make_threads_and_metrics_still_answer() -> None:
    import socket
    import urllib.request

    from actors.http import WORKERS, HttpServer
    from conftest import free_port

    registry = CollectorRegistry()
    Metrics(registry)
    port = free_port()
    server = HttpServer("127.0.0.1", port, registry, lambda: True)
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # half a request on a few: they hold a worker only until the read timeout
        for sock in idle[:2]:
            sock.sendall(b"GET /metr")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"oms_internal_errors_total" in resp.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            assert resp.read() == b"ready\n"
        assert threading.active_count() <= before  # the pool was there from the start
        assert server.alive() and len(server.server.threads) == WORKERS
    finally:
        for sock in idle:
            sock.close()
        server.stop()


# -- CURVE off on a non-loopback address (defect 20) -------------------------

def test_a_warning_when_listening_beyond_loopback_without_curve(
        make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from conftest import free_port

    with caplog.at_level(logging.WARNING, logger="actors.service"):
        make_service(intake=f"tcp://0.0.0.0:{free_port()}")
    warnings = [r.getMessage() for r in caplog.records if "CURVE is off" in r.getMessage()]
    assert len(warnings) == 1 and "tcp://0.0.0.0:" in warnings[0]
    assert "forge domain events" in warnings[0]


def test_no_warning_on_loopback(make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="actors.service"):
        make_service()
    assert not [r for r in caplog.records if "CURVE is off" in r.getMessage()]
