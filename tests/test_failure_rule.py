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
from test_operations import no_restock  # noqa: F401

from actors.metrics import Metrics
from actors.timers import TimerService
from oms.engine import Engine
from oms.messages import TimerFired, Turn

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

    from conftest import free_port

    from actors.http import WORKERS, HttpServer

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


def test_clients_that_trickle_bytes_do_not_hold_the_workers() -> None:
    """Each of more clients than workers sends its request a byte at a
    time, each byte well inside the per-read timeout, and never ends it:
    once the request deadline passes they are let go, and /readyz answers
    (before, a trickling client kept its worker for as long as it went on,
    and four of them starved every scrape and readiness probe)."""
    import socket
    import urllib.request

    from conftest import free_port

    from actors.http import WORKERS, HttpServer

    registry = CollectorRegistry()
    Metrics(registry)
    port = free_port()
    server = HttpServer("127.0.0.1", port, registry, lambda: True, request_deadline_s=1.0)
    stop = threading.Event()
    closed: list[int] = []

    def trickle() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
                sock.sendall(bytes([byte]))
                if stop.wait(0.2):  # the hostile client's pace, not a synchronisation
                    return
        except OSError:  # the server let it go
            closed.append(1)
        finally:
            sock.close()

    slow = [threading.Thread(target=trickle, daemon=True) for _ in range(WORKERS + 2)]
    try:
        for thread in slow:
            thread.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as resp:
            assert resp.read() == b"ready\n"
        assert server.alive()
    finally:
        stop.set()
        for thread in slow:
            thread.join(10)
        server.stop()


# -- CURVE off on a non-loopback address (defect 20) -------------------------

def test_a_warning_when_listening_beyond_loopback_without_curve(
        make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from conftest import free_port

    with caplog.at_level(logging.WARNING, logger="app.service"):
        make_service(intake=f"tcp://0.0.0.0:{free_port()}")
    warnings = [r.getMessage() for r in caplog.records if "CURVE is off" in r.getMessage()]
    assert len(warnings) == 1 and "tcp://0.0.0.0:" in warnings[0]
    assert "forge domain events" in warnings[0]


def test_no_warning_on_loopback(make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="app.service"):
        make_service()
    assert not [r for r in caplog.records if "CURVE is off" in r.getMessage()]


# -- a poison order (rule 1, defect 1) ---------------------------------------

def _telecom(ext: str, customer: str) -> dict[str, Any]:
    return {"source_system": "crm-ui", "external_id": ext, "order_type": "telecom",
            "customer": {"id": customer},
            "customer_address": {"line1": "1 Way", "city": "Oslo", "postal_code": "0150",
                                 "country": "NO"},
            "items": [{"id": "fiber", "product_id": "FIBER", "quantity": 1,
                       "unit_price_minor": 4000}]}


def test_a_poison_order_goes_to_fallout_and_blocks_no_other_order(
        make_service: Any, sim: Any, eps: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A definition the loader would refuse (expected_s not a number) makes
    the real engine raise in ``expect`` when the order starts."""
    import dataclasses
    import logging

    from helpers import poll_until, retail_order

    from gateways.client import Client
    from oms.engine import Engine

    svc = make_service(max_in_flight=2)
    good = svc.octx.engines["telecom"]
    bad = Engine(dataclasses.replace(good.proc, expected_s="soon"))
    with Client(eps.intake, timeout=10) as client, caplog.at_level(logging.ERROR):
        svc.octx.engines["telecom"] = bad
        poison = client.submit(_telecom("poison-1", "cust-9"))["order_id"]
        queued = client.submit(_telecom("poison-2", "cust-9"))["order_id"]  # same customer
        view = poll_until(lambda: (o := client.get(poison)["order"])["state"] == "held" and o)
        svc.octx.engines["telecom"] = good  # the definition is fixed
        assert view["state_reason"] == "internal_error"
        assert view["failure"]["error"]["code"] == "internal_error"
        assert view["failure"]["error"]["message"].startswith("TypeError:")
        logged = [r for r in caplog.records if poison in r.getMessage() and r.exc_info]
        assert logged and "internal_error" in logged[0].getMessage()
        # its admission slot is released: with --max-in-flight 2, two more orders get in
        # (the queued order may still be taking its "wait" turn: counts settle)
        counts = poll_until(lambda: (c := client.request({"type": "order_counts"}))[
            "counts"] == {"held": 1, "pending": 1} and c)  # as in the store
        assert counts["in_flight"] == 1  # the queued telecom order only
        retail = [client.submit(retail_order(f"after-{i}"))["order_id"] for i in range(1)]
        poll_until(lambda: client.get(retail[0])["order"]["state"] == "completed")
        # its sequencing turn is kept: the customer's next order still waits
        assert client.get(queued)["order"]["state"] == "pending"
        # the waiting order's actor leaves memory, so it comes back with the fixed definition
        poll_until(lambda: queued not in svc.router.live_ids())
        reply = client.request({"type": "abort_order", "order_id": poison,
                                "operator": "ops", "reason": "bad definition"})
        assert reply["type"] == "operator_accepted", reply
        poll_until(lambda: client.get(poison)["order"]["state"] == "failed")
        poll_until(lambda: client.get(queued)["order"]["state"] == "completed")
        assert svc.metrics.order_crashes._value.get() == 1


BACKORDERED = [{"id": "a", "product_id": "SKU-901", "quantity": 10**9}]


@pytest.mark.usefixtures("no_restock")
def test_a_dead_actor_in_the_live_set_kills_no_thread(make_service: Any, eps: Any) -> None:
    """Defect 1: a stopped order actor left in the router's live set made the
    next timer raise ActorDeadError and end the timers thread. The actor is
    made dead the way pykka's failure handling leaves one (its stop flag
    set, nothing else) while it is idle and durable: held for stock that
    only the event below brings (the simulator never restocks here)."""
    from helpers import poll_until, retail_order

    from gateways.client import Client
    from oms.messages import DomainEvent

    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        oid = client.submit(retail_order("dead-1", items=BACKORDERED))["order_id"]
        poll_until(lambda: client.get(oid)["order"]["state"] == "held"
                   and oid in svc.router.idle)
        ref = svc.router._live[oid]
        ref._actor_weakref().actor_stopped.set()
        assert not ref.is_alive() and svc.router._live.get(oid) is ref
        svc.timers.schedule(time.time(), oid, ("retry", "nothing", 99))  # a stale timer
        assert svc.router.deliver(oid, TimerFired(("retry", "nothing", 98))) is True
        assert svc.router.deliver(oid, DomainEvent("ev-dead-1", "warehouse", "stock_reserved",
                                                   {})) is True
        poll_until(lambda: client.get(oid)["order"]["state"] == "completed")
        assert svc.dead_components() == [] and svc.is_ready()
        assert svc.metrics.internal_errors.labels("router")._value.get() >= 1


@pytest.mark.usefixtures("no_restock")
def test_a_stopped_order_actor_loses_no_message(make_service: Any, eps: Any) -> None:
    """An order actor stopped by pykka's ``ActorRef.stop`` used to lose what
    it had not made durable: the messages handled in the stopping slice (no
    snapshot saved) and the tells queued behind the stop (pykka's teardown
    drops them). Either loss left an order held for stock waiting forever
    for a ``stock_reserved`` it had been given. One loop call builds both slices,
    so nothing else runs between them: order A's is [event, stop], order B's
    is [stop, event]."""
    from helpers import poll_until, retail_order

    from gateways.client import Client
    from oms.messages import DomainEvent

    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        ids = [client.submit(retail_order(f"stopped-{n}", items=BACKORDERED))["order_id"]
               for n in ("a", "b")]
        for oid in ids:
            poll_until(lambda oid=oid: client.get(oid)["order"]["state"] == "held"
                       and oid in svc.router.idle)  # held for stock; never restocked here
        stopping: list[Any] = []
        built = threading.Event()

        def build_slices() -> None:  # runs on the loop thread: one call, no turn between
            a, b = ids
            assert svc.router.deliver(a, DomainEvent("ev-stopped-a", "warehouse",
                                                     "stock_reserved", {})) is True
            stopping.append(svc.router._live[a].stop(block=False))  # behind the event
            stopping.append(svc.router._live[b].stop(block=False))
            assert svc.router.deliver(b, DomainEvent("ev-stopped-b", "warehouse",
                                                     "stock_reserved", {})) is True
            built.set()

        svc.loop.call_soon(build_slices)
        assert built.wait(5)
        assert [f.get(timeout=5) for f in stopping] == [True, True]
        for oid in ids:
            # only the event given above can complete it: it was kept, not lost
            poll_until(lambda oid=oid: client.get(oid)["order"]["state"] == "completed",
                       timeout=10)
    assert svc.metrics.internal_errors.labels("router")._value.get() == 2
    assert svc.dead_components() == [] and svc.is_ready()


# -- a component that dies takes the process down (rule 1, second half) -------

def test_a_dead_component_is_not_ready_and_exits_70(eps: Any, tmp_path: Any) -> None:
    import urllib.error
    import urllib.request

    from conftest import free_port
    from helpers import poll_until

    from app.service import Service
    from oms.config import Config

    exits: list[int] = []
    port = free_port()
    cfg = Config(data=str(tmp_path / "data"), intake=eps.intake, events=eps.events,
                 domain_events=eps.domain_events, metrics_port=port, systems=dict(eps.systems))
    svc = Service(cfg, exit=exits.append)  # the exit function is a parameter, like a clock
    svc.start()
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        assert urllib.request.urlopen(url, timeout=5).read() == b"ready\n"
        svc.sequencer.actor_ref.stop()  # the sequencer's loop ends while the service runs
        poll_until(lambda: exits == [70])
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 503 and b"dead: sequencer" in err.value.read()
        assert not svc.is_ready()
    finally:
        svc.stop()


KILL_A_COMPONENT = """
import sys, threading, time, urllib.request
import pykka
from app.cli import main

def kill_sequencer():
    while True:  # poll until ready, then stop the sequencer actor (pykka's own stop)
        try:
            if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.05)  # the poll interval of this readiness poll
    pykka.ActorRegistry.get_by_class_name("Sequencer")[0].stop(block=False)

threading.Thread(target=kill_sequencer, daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""


def test_oms_serve_exits_non_zero_when_a_component_dies(eps: Any, tmp_path: Any) -> None:
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    args = eps.serve_args(tmp_path / "data")
    args[args.index("--metrics-port") + 1] = str(port)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", KILL_A_COMPONENT,
                                 f"http://127.0.0.1:{port}/readyz", *args],
                                stdout=out, stderr=out)
        try:
            code = proc.wait(20)
        finally:
            proc.kill()
    text = log.read_text()
    assert code == 70, text[-2000:]
    assert "component sequencer died" in text


def test_the_hold_of_a_finished_order_changes_nothing() -> None:
    from helpers import normalized, retail_order

    from actors.settings import load_processes
    from oms.engine import hold_internal_error, new_order
    from oms.states import OrderState

    proc = load_processes(None)["retail"]
    order = new_order("o-1", normalized(retail_order()), proc, now=1000.0)
    order.state = OrderState.COMPLETED
    turning = hold_internal_error(Engine(proc), order, "TypeError: x", (), 1001.0)
    assert order.state == OrderState.COMPLETED and not turning.changed and order.failure is None
    order.state = OrderState.PENDING  # waiting its turn, which the dropped Turn gave it
    turning = hold_internal_error(Engine(proc), order, "TypeError: x", (Turn(go=True),), 1001.0)
    assert (order.state, order.state_reason, order.turn) == (OrderState.HELD,
                                                              "internal_error", True)
    assert order.failure["error"]["code"] == "internal_error" and turning.changed


def test_an_internal_error_hold_survives_a_restart_without_its_admission_slot(
        make_service: Any, sim: Any, eps: Any) -> None:
    import dataclasses

    from helpers import poll_until

    from gateways.client import Client

    svc = make_service()
    good = svc.octx.engines["telecom"]
    svc.octx.engines["telecom"] = Engine(dataclasses.replace(good.proc, expected_s="soon"))
    with Client(eps.intake, timeout=10) as client:
        poison = client.submit(_telecom("restart-1", "cust-7"))["order_id"]
        poll_until(lambda: client.get(poison)["order"].get("state_reason") == "internal_error")
    svc.stop()
    make_service()  # the real definitions again
    with Client(eps.intake, timeout=10) as client:
        view = client.get(poison)["order"]
        assert (view["state"], view["state_reason"]) == ("held", "internal_error")
        assert client.request({"type": "order_counts"})["in_flight"] == 0
        later = client.submit(_telecom("restart-2", "cust-7"))["order_id"]
        poll_until(lambda: client.get(later)["order"]["state"] == "pending")  # turn kept


def test_requests_queued_behind_an_order_that_cannot_even_be_held_are_answered(
        make_service: Any, sim: Any, eps: Any) -> None:
    """A second fault: the hold of a crashed order raises too (a definition
    whose ``notify_states`` is no set makes every state change raise). The
    order stays at its last durable snapshot, and the requests queued for it
    meanwhile are not lost: each is handled or answered ``internal``."""
    import dataclasses

    from helpers import retail_order

    from gateways.client import Client, wait_terminal
    from oms.engine import Engine

    svc = make_service()
    good = svc.octx.engines["retail"]
    with Client(eps.intake, timeout=10) as client:
        svc.octx.engines["retail"] = Engine(dataclasses.replace(good.proc, notify_states=None))
        order_id = client.submit(retail_order("twice-1"))["order_id"]
        replies = [reply for _req, reply in client.pipeline(
            {"type": "cancel_order", "order_id": order_id} for _ in range(8))]
        svc.octx.engines["retail"] = good
        assert client.get(order_id)["type"] == "order"  # at its last durable snapshot
        after = client.submit(retail_order("twice-2"))["order_id"]  # the rest goes on
        assert wait_terminal(client, [after], timeout=20)[after]["state"] == "completed"
    assert len(replies) == 8
    assert {r.get("code") or r["type"] for r in replies} <= {
        "internal", "cancel_accepted", "cancel_rejected"}, replies
