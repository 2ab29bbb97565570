"""Level 2: the single-loop runtime (actors.eventloop, actors.loop) with
real ZeroMQ sockets on 127.0.0.1 and real pykka actors on one loop thread."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pykka
import pytest
import zmq
from helpers import poll_until, retail_order

from actors.eventloop import EventLoop, LoopBlocked
from actors.loop import LoopActor
from actors.pool import PooledActor
from bench.ports import free_endpoint
from gateways.client import Client, wait_terminal


class Supervisor:
    """What the loop reports to (as actors.supervision.Supervisor, without exiting)."""

    def __init__(self) -> None:
        self.survivals: list[str] = []
        self.deaths: list[str] = []
        self.dead = threading.Event()

    def survived(self, component: str, exc_info: Any = None) -> None:
        self.survivals.append(component)

    def died(self, component: str, exc_info: Any = None) -> None:
        self.deaths.append(component)
        self.dead.set()


class Turns:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, amount: float) -> None:
        self.seen.append(amount)


@pytest.fixture
def sup() -> Supervisor:
    return Supervisor()


@pytest.fixture
def loop(sup: Supervisor) -> Any:
    lp = EventLoop("loop-test", supervisor=sup, turn_seconds=Turns()).start()
    yield lp
    lp.stop(5)


class Echo(LoopActor):
    """Records which thread ran each message."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.threads: set[int] = set()

    def on_receive(self, message: Any) -> Any:
        self.threads.add(threading.get_ident())
        if message == "boom":
            raise ValueError("boom")
        if message == "get":
            return list(self.seen)
        if message == "ask-self":
            return self.actor_ref.ask("get", timeout=1)
        self.seen.append(message)
        return None

    def double(self, n: int) -> int:
        return 2 * n


class Puller(LoopActor):
    """Owns a PULL socket and reads it on the loop."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__()
        self.ctx, self.endpoint = ctx, endpoint
        self.got: list[bytes] = []
        self.threads: set[int] = set()
        self.sock: zmq.Socket | None = None

    def on_start(self) -> None:
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(self.endpoint)

    def on_stop(self) -> None:
        assert self.sock is not None
        self.sock.close(0)

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] if self.sock is not None else []

    def on_readable(self, sock: zmq.Socket) -> None:
        self.threads.add(threading.get_ident())
        for _ in range(100):  # bounded, as every reader
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame == b"boom":
                raise ValueError("bad frame")
            self.got.append(frame)

    def on_receive(self, message: Any) -> Any:
        return len(self.got) if message == "count" else None


def test_actors_and_their_sockets_run_on_one_thread(loop: EventLoop) -> None:
    ctx = zmq.Context()
    try:
        ends = [free_endpoint(), free_endpoint()]
        pullers = [Puller.launch(ctx, ep, loop=loop) for ep in ends]
        echo = Echo.launch(loop=loop)
        pushes = [ctx.socket(zmq.PUSH) for _ in ends]
        for push, ep in zip(pushes, ends, strict=True):
            push.connect(ep)
            for n in range(300):
                push.send(b"%d" % n)
        for n in range(300):
            echo.tell(n)  # from this thread: wakes the loop
        assert echo.actor_ref.ask("get", timeout=5) == list(range(300))
        for p in pullers:
            assert poll_until(lambda p=p: p.actor_ref.ask("count", timeout=5) == 300, 5)
        threads = echo.threads | pullers[0].threads | pullers[1].threads
        assert threads == {loop._thread.ident}
        assert threading.get_ident() not in threads
        assert echo.actor_ref.proxy().double(21).get(timeout=5) == 42  # proxies work
        for push in pushes:
            push.close(0)
        for actor in (*pullers, echo):
            actor.actor_ref.stop(block=True, timeout=5)
            actor.join(5)
        assert loop.alive()
    finally:
        ctx.destroy(0)


def test_a_private_loop_when_none_is_given() -> None:
    before = threading.active_count()
    echo = Echo.launch()
    assert threading.active_count() == before + 1
    echo.tell("x")
    assert echo.actor_ref.ask("get", timeout=5) == ["x"]
    echo.actor_ref.stop(block=True, timeout=5)
    echo.join(5)
    assert poll_until(lambda: threading.active_count() == before, 5)


def test_ask_from_the_loop_fails_at_once_instead_of_deadlocking(loop: EventLoop) -> None:
    echo = Echo.launch(loop=loop)
    started = time.monotonic()
    with pytest.raises(LoopBlocked):
        echo.actor_ref.ask("ask-self", timeout=5)
    assert time.monotonic() - started < 1  # not a timeout: refused at once
    echo.tell("after")
    assert echo.actor_ref.ask("get", timeout=5) == ["after"]  # the loop goes on
    echo.actor_ref.stop(block=True, timeout=5)


def test_a_failing_message_or_reader_is_survived(loop: EventLoop, sup: Supervisor) -> None:
    ctx = zmq.Context()
    try:
        ep = free_endpoint()
        puller = Puller.launch(ctx, ep, loop=loop)
        echo = Echo.launch(loop=loop)
        echo.tell("boom")
        echo.tell(1)
        with pytest.raises(ValueError, match="boom"):
            echo.actor_ref.ask("boom", timeout=5)  # an ask's error goes to the asker only
        assert echo.actor_ref.ask("get", timeout=5) == [1]
        push = ctx.socket(zmq.PUSH)
        push.connect(ep)
        push.send(b"boom")
        push.send(b"fine")
        assert poll_until(lambda: puller.actor_ref.ask("count", timeout=5) == 1, 5)
        assert sup.survivals.count("Echo") == 1  # the told one; counted once
        assert "Puller" in sup.survivals
        assert sup.deaths == [] and loop.alive()
        push.close(0)
        puller.actor_ref.stop(block=True, timeout=5)
        echo.actor_ref.stop(block=True, timeout=5)
    finally:
        ctx.destroy(0)


def test_a_runnable_that_breaks_the_runtime_ends_the_loop_loudly(sup: Supervisor) -> None:
    lp = EventLoop("doomed", supervisor=sup).start()

    class Broken:
        turn_end = False

        def _run_slice(self, budget: int) -> None:
            raise RuntimeError("runtime bug")

    lp.schedule(Broken())
    assert sup.dead.wait(5)
    assert sup.deaths == ["doomed"]
    assert poll_until(lambda: not lp.alive(), 5)  # reported, never a silent dead loop


def test_failing_callbacks_and_timers_are_survived(loop: EventLoop, sup: Supervisor) -> None:
    fired: list[str] = []

    def bad() -> None:
        raise ValueError("timer")

    def arm() -> None:
        loop.call_later(0.02, lambda: fired.append("late"))
        loop.call_later(0.01, bad)
        loop.call_later(0.0, lambda: fired.append("soon"))
        loop.call_later(0.005, lambda: fired.append("never")).cancel()

    loop.call_soon(arm)
    assert poll_until(lambda: fired == ["soon", "late"], 5)
    assert sup.survivals == ["loop-test"] and loop.alive()


class Ticker(LoopActor):
    """A deadline, as a gateway's: poll_timeout says when, on_tick fires it."""

    def __init__(self) -> None:
        super().__init__()
        self.due: float | None = None
        self.fired: list[float] = []

    def on_receive(self, message: Any) -> Any:
        self.due = time.monotonic() + message

    def poll_timeout(self) -> float | None:
        return None if self.due is None else max(0.0, (self.due - time.monotonic()) * 1000)

    def on_tick(self) -> None:
        if self.due is not None and time.monotonic() >= self.due:
            self.fired.append(time.monotonic() - self.due)
            self.due = None


def test_ticks_come_when_due(loop: EventLoop) -> None:
    ticker = Ticker.launch(loop=loop)
    ticker.tell(0.05)
    assert poll_until(lambda: len(ticker.fired) == 1, 5)
    ticker.tell(0.2)
    ticker.tell(0.01)  # an earlier deadline replaces the later one
    assert poll_until(lambda: len(ticker.fired) == 2, 5)
    assert ticker.fired[1] < 0.15
    ticker.actor_ref.stop(block=True, timeout=5)


class Writer(LoopActor):
    """A turn-end actor: gets everything the turn produced in one batch."""

    turn_end = True

    def __init__(self, effects: Any) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.effects = effects

    def on_batch(self, envelopes: list[Any]) -> None:
        saves = [e.message for e in envelopes if isinstance(e.message, int)]
        self.batches.append(len(saves))
        for n in saves:
            self.effects.tell(("sent", n))
        super().on_batch([e for e in envelopes if not isinstance(e.message, int)])


class Order(PooledActor):
    """An order-like pooled actor, with the loop as its dispatcher."""

    def __init__(self, loop: EventLoop, writer: Writer, n: int) -> None:
        super().__init__(loop)  # type: ignore[arg-type]
        self.writer, self.n = writer, n
        self.thread: int | None = None

    def on_receive(self, message: Any) -> Any:
        self.thread = threading.get_ident()

    def on_slice_end(self) -> None:
        self.writer.tell(self.n)


def test_one_group_commit_per_turn_then_the_effects(loop: EventLoop) -> None:
    sink = Echo.launch(loop=loop)
    writer = Writer.launch(sink, loop=loop)
    orders = [Order(loop, writer, n) for n in range(50)]

    def start_all() -> None:  # in one turn, as a burst of frames would
        for order in orders:
            order._start_actor_loop()
            order.actor_ref.tell("go")

    loop.call_soon(start_all)
    assert poll_until(lambda: len(sink.actor_ref.ask("get", timeout=5)) == 50, 5)
    assert writer.batches == [50]  # the 50 orders' saves in one commit
    assert {o.thread for o in orders} == {loop._thread.ident}
    for actor in (writer, sink):
        actor.actor_ref.stop(block=True, timeout=5)


class Asker(PooledActor):
    """An order-like actor that asks another order-like actor (never do this)."""

    def __init__(self, loop: EventLoop, other: Any) -> None:
        super().__init__(loop)  # type: ignore[arg-type]
        self.other = other

    def on_receive(self, message: Any) -> Any:
        return self.other.ask("anything", timeout=5)


def test_an_order_actor_asking_on_the_loop_fails_at_once(loop: EventLoop) -> None:
    sink = Echo.launch(loop=loop)
    order = Order(loop, sink, 0)
    order._start_actor_loop()
    asker = Asker(loop, order.actor_ref)
    asker._start_actor_loop()
    started = time.monotonic()
    with pytest.raises(LoopBlocked):
        asker.actor_ref.ask("go", timeout=5)
    assert time.monotonic() - started < 4 and loop.alive()  # at once, not at the ask's 5 s
    sink.actor_ref.stop(block=True, timeout=5)


class Chatty(LoopActor):
    """Tells itself forever: its slices must not starve anyone else."""

    def on_receive(self, message: Any) -> Any:
        self.actor_ref.tell(message)


def test_no_actor_starves_the_others(loop: EventLoop) -> None:
    ctx = zmq.Context()
    try:
        chatty = Chatty.launch(loop=loop)
        ep = free_endpoint()
        puller = Puller.launch(ctx, ep, loop=loop)
        for _ in range(10):
            chatty.tell("again")
        push = ctx.socket(zmq.PUSH)
        push.connect(ep)
        push.send(b"x")
        assert poll_until(lambda: puller.actor_ref.ask("count", timeout=5) == 1, 5)
        push.close(0)
        chatty.actor_ref.stop(block=True, timeout=5)
        puller.actor_ref.stop(block=True, timeout=5)
    finally:
        ctx.destroy(0)


def test_turns_are_measured(loop: EventLoop) -> None:
    echo = Echo.launch(loop=loop)
    echo.tell(1)
    echo.actor_ref.ask("get", timeout=5)
    assert loop._turn_seconds is not None
    assert loop._turn_seconds.seen and all(t >= 0 for t in loop._turn_seconds.seen)
    echo.actor_ref.stop(block=True, timeout=5)


class FailsToStart(LoopActor):
    def on_start(self) -> None:
        raise OSError("address in use")


def test_a_failed_start_fails_launch_and_leaves_nothing(loop: EventLoop) -> None:
    with pytest.raises(OSError, match="address in use"):
        FailsToStart.launch(loop=loop)
    assert not any(isinstance(r, FailsToStart) for r in
                   (ref._actor for ref in pykka.ActorRegistry.get_all()))
    assert loop.alive()


def test_stop_answers_queued_asks_and_frees_the_socket(loop: EventLoop) -> None:
    ctx = zmq.Context()
    try:
        ep = free_endpoint()
        puller = Puller.launch(ctx, ep, loop=loop)
        puller.actor_ref.stop(block=True, timeout=5)
        puller.join(5)
        with pytest.raises(pykka.ActorDeadError):
            puller.actor_ref.tell("count")
        assert puller.sock is not None and puller.sock.closed
        assert puller.sock not in loop._readers  # off the poller: never polled closed
        assert loop.alive()
    finally:
        ctx.destroy(0)


# -- the service on its loop ---------------------------------------------------

@pytest.fixture
def slow_delivery(sim_config: Any) -> Any:
    sim_config.delivery_s = 1.0  # orders wait for shipment_delivered a while
    return sim_config


def test_the_service_runs_every_actor_on_its_loop(slow_delivery: Any, sim: Any,
                                                  make_service: Any, eps: Any) -> None:
    """One loop thread; waiting orders passivate and come back for their
    event; finished ones leave memory; no per-actor or worker threads."""
    svc = make_service(passivate_after_s=0.1)
    names = {t.name for t in threading.enumerate()}
    for old in ("intake", "store-writer", "orders-0", "timers", "passivator", "sequencer",
                "events-pub", "domain-events", "gw-billing"):
        assert old not in names
    assert "loop" in names
    with Client(eps.intake, timeout=10) as c:
        ids = [c.submit(retail_order(f"loop-{n}"))["order_id"] for n in range(20)]
        # all 20 wait for delivery (1 s): idle 0.1 s, they leave memory
        assert poll_until(lambda: svc.router.snapshot()["passivated"] == 20, 10)
        assert svc.router.snapshot()["live"] == 0
        views = wait_terminal(c, ids, timeout=20)  # reactivated by their event
    assert {v["state"] for v in views.values()} == {"completed"}
    assert poll_until(lambda: svc.router.snapshot()["in_flight"] == 0, 10)
    assert svc.router.snapshot()["live"] == 0
    assert svc.metrics.loop_turn._sum.get() > 0
    assert svc.supervisor.dead == [] and svc.is_ready()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
