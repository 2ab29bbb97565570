"""The store writer's burst on the loop thread hands an idle gateway's
commands and the publisher's events to their handlers in place (no tell,
bundle or slice; ``LoopActor.in_place``). Over real sockets: what is sent, in
what order, a bad message survived, the slice's end (on_tick: a timeout
armed, events counted) run at the burst's end, and the cases that must
still queue as before: mail queued ahead, a stopped actor, another thread."""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from typing import Any

import pytest
import zmq
from conftest import endpoint
from helpers import poll_until
from prometheus_client import CollectorRegistry
from test_edges import HostileDomain, sample
from test_publisher_batch import published, received, subscribed_publisher

import actors.loop as loop_module
from actors.endpoint import RouterEndpoint
from actors.eventloop import EventLoop
from actors.loop import burst
from actors.metrics import Metrics
from actors.publisher import Publisher
from gateways.breaker import Breaker
from gateways.gateway import Gateway, SendCommand
from oms import codec
from oms.messages import CommandResult, Send


def command(order_id: str, timeout_s: float = 30.0, **args: Any) -> Send:
    return Send("billing", f"{order_id}:step", "create_invoice", args or {"n": 1}, timeout_s)


def launch(domain: HostileDomain, delivered: queue.Queue[Any],
           loop: EventLoop | None = None) -> tuple[Gateway, Metrics]:
    metrics = Metrics(CollectorRegistry())
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint,
                        lambda order_id, res: delivered.put((order_id, res)), metrics,
                        breaker=Breaker(threshold=1000), loop=loop)
    return gw, metrics


def stop(gw: Gateway) -> None:
    gw.actor_ref.stop(block=True, timeout=5)
    gw.join(5)


def test_commands_in_a_burst_on_the_loop_are_sent_in_place_and_time_out(
        domain: HostileDomain) -> None:
    delivered: queue.Queue[Any] = queue.Queue()
    gw, metrics = launch(domain, delivered)
    try:
        def on_loop() -> tuple[bool, int, list[str]]:
            with burst():
                gw.send("A", command("A"))
                held = gw.in_place()
                gw.send("B", command("B", timeout_s=0.05))
                gw.send("C", command("C"))
                return held, len(gw.actor_inbox), sorted(gw.pending)  # sent, not queued

        held, queued, pending = gw._loop.run_sync(on_loop)
        assert held and queued == 0 and pending == ["A:step", "B:step", "C:step"]
        assert [domain.command()[1]["order_id"] for _ in range(3)] == ["A", "B", "C"]
        order_id, res = delivered.get(timeout=10)  # the tick was armed at the burst's end
        assert order_id == "B" and res.error is not None and res.error.code == "timeout"
        assert poll_until(lambda: sample(metrics, "oms_gateway_requests_total",
                                         system="billing") == 3)
    finally:
        stop(gw)


def test_mail_queued_ahead_keeps_its_place_and_a_bad_command_is_survived(
        domain: HostileDomain, caplog: pytest.LogCaptureFixture) -> None:
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        def queued_ahead() -> bool:
            gw.tell(SendCommand("A", command("A")))  # told on the loop: queued
            with burst():
                gw.send("B", command("B"))  # must not pass A
                return gw.in_place()

        assert gw._loop.run_sync(queued_ahead) is False
        assert [domain.command()[1]["order_id"] for _ in range(2)] == ["A", "B"]

        def bad_in_place() -> bool:
            with burst():
                gw.send("BAD", command("BAD", bad=object()))  # cannot be encoded
                gw.send("D", command("D"))
                return gw.in_place()

        with caplog.at_level(logging.ERROR):
            assert gw._loop.run_sync(bad_in_place) is True
        assert domain.command()[1]["order_id"] == "D"
        assert any("unexpected error" in r.getMessage() for r in caplog.records)
        assert gw.alive() and "BAD:step" not in gw.pending
    finally:
        stop(gw)


def test_a_stopped_gateway_on_the_loop_drops_its_burst_as_before(
        domain: HostileDomain, caplog: pytest.LogCaptureFixture) -> None:
    loop = EventLoop("test-loop").start()
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered, loop=loop)
    try:
        stop(gw)

        def on_loop() -> bool:
            with burst():
                gw.send("A", command("A"))
                return gw.in_place()

        with caplog.at_level(logging.WARNING):
            assert loop.run_sync(on_loop) is False
        assert any("1 messages for stopped" in r.getMessage() for r in caplog.records)
        assert not domain.sock.poll(0)
    finally:
        loop.stop()


def test_a_command_from_another_thread_is_told(domain: HostileDomain) -> None:
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        with burst():  # the test's thread, not the gateway's loop
            gw.send("A", command("A"))
            assert gw.in_place() is False
        assert domain.command()[1]["order_id"] == "A"
    finally:
        stop(gw)


def test_events_in_place_keep_their_order_behind_a_queued_one_and_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    with subscribed_publisher() as (pub, sub, registry):
        def queued_then_held() -> bool:
            pub.publish("web", {"type": "order_state", "n": 1})  # told alone: queued
            with burst():
                pub.publish("app", {"type": "order_progress", "n": 2})  # behind it
                return pub.in_place()

        def held() -> bool:
            with burst():
                pub.publish("web", {"type": "order_progress", "n": 3})
                pub.publish("web", {"type": "order_state", "bad": object()})
                pub.publish("shop", {"type": "order_summary", "n": 4})
                return pub.in_place()

        assert pub._loop.run_sync(queued_then_held) is False
        with caplog.at_level(logging.ERROR):
            assert pub._loop.run_sync(held) is True
        pub.actor_ref.ask("barrier", timeout=10)
        assert received(sub, 4) == [(b"web\x00", 1), (b"app\x00", 2), (b"web\x00", 3),
                                    (b"shop\x00", 4)]
        assert any("unexpected error" in r.getMessage() for r in caplog.records)
        counted = published(registry)
        assert counted["order_state"] == 1 and counted["order_progress"] == 2
        assert counted["order_summary"] == 1


def test_a_result_delivered_in_place_reaches_its_order(domain: HostileDomain) -> None:
    """A send refused in place (the send queue full is rare; an open breaker
    here) still hands the order its result."""
    delivered: queue.Queue[Any] = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    breaker = Breaker(threshold=1, cooldown_s=3600)
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint,
                        lambda order_id, res: delivered.put((order_id, res)), metrics,
                        breaker=breaker)
    try:
        gw._loop.run_sync(lambda: breaker.record(False, time.monotonic()))  # open

        def on_loop() -> bool:
            with burst():
                gw.send("A", command("A"))
                return gw.in_place()

        assert gw._loop.run_sync(on_loop) is True
        order_id, res = delivered.get(timeout=10)
        assert order_id == "A" and isinstance(res, CommandResult)
        assert res.error is not None and res.error.code == "circuit_open"
    finally:
        stop(gw)


def test_state_changes_and_completions_are_counted_in_place_and_from_other_threads(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    pub = Publisher.launch(zmq.Context.instance(), endpoint(), Metrics(registry))

    def counted(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    state = {"type": "order_state", "state": "completed", "previous_state": "inProgress"}
    summary = {"type": "order_summary", "summary": {"state": "completed", "completed_ts": 12.5}}
    try:
        def on_loop() -> tuple[bool, float]:
            with burst():
                pub.publish_counted("web", state, "retail", 10.0)
                pub.publish_counted("web", dict(state, bad=object()), "retail", 10.0)
                pub.publish_counted("web", summary, "retail", 10.0)
                pub.publish_counted("web", summary, "retail", 20.0)  # before its start: 0 s
                held = pub.in_place()
                return held, counted("oms_order_transitions_total", order_type="retail",
                                     state="completed")

        with caplog.at_level(logging.ERROR):
            held, during = pub._loop.run_sync(on_loop)
        assert held and during == 0  # counted at the slice's end, once per label set
        labels = {"order_type": "retail", "state": "completed"}
        assert counted("oms_order_transitions_total", **labels) == 2  # the bad one too
        assert counted("oms_order_completion_seconds_count", **labels) == 2
        assert counted("oms_order_completion_seconds_sum", **labels) == 2.5
        assert counted("oms_order_completion_seconds_bucket", le="0.001", **labels) == 1
        pub.publish_counted("app", state, "telecom", 0.0)  # another thread: at once
        pub.publish_counted("app", summary, "telecom", 2.5)
        other = {"order_type": "telecom", "state": "completed"}
        assert counted("oms_order_transitions_total", **other) == 1
        assert counted("oms_order_completion_seconds_sum", **other) == 10.0
    finally:
        pub.actor_ref.stop(block=True, timeout=5)
        pub.join(5)


def test_mail_reaching_a_held_gateway_keeps_program_order(domain: HostileDomain) -> None:
    """A nested burst's bundle and a plain tell reach the held gateway's inbox;
    what the outer burst sends after them queues behind them."""
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        def on_loop() -> list[bool]:
            held = []
            with burst():
                gw.send("1", command("1"))  # in place
                held.append(gw.in_place())
                with burst():
                    gw.send("2", command("2"))  # the outer burst holds it: gathered
                gw.send("3", command("3"))  # behind 2
                held.append(gw.in_place())
                gw.tell(SendCommand("4", command("4")))
                gw.send("5", command("5"))
            return held

        assert gw._loop.run_sync(on_loop) == [True, False]
        assert [domain.command()[1]["order_id"] for _ in range(5)] == ["1", "2", "3", "4", "5"]
    finally:
        stop(gw)


class Echo(RouterEndpoint):
    """A ROUTER endpoint that keeps each request's envelope to answer later."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.envelopes: queue.Queue[tuple[bytes, ...]] = queue.Queue()

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes, user: str | None) -> None:
        self.envelopes.put(envelope)


def test_replies_in_a_burst_on_the_loop_are_sent_in_place_and_a_bad_one_is_survived(
        caplog: pytest.LogCaptureFixture) -> None:
    ep = endpoint()
    echo = Echo.launch(zmq.Context.instance(), ep, Metrics(CollectorRegistry()))
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(ep)
    try:
        client.send(codec.pack({"type": "ping"}))
        envelope = echo.envelopes.get(timeout=10)

        def on_loop() -> bool:
            with burst():
                echo.reply_to(envelope, {"type": "bad", "x": object()})  # cannot be encoded
                echo.reply_to(envelope, {"type": "pong", "n": 1})
                echo.reply_to(envelope, {"type": "pong", "n": 2})
                return echo.in_place()

        with caplog.at_level(logging.ERROR):
            assert echo._loop.run_sync(on_loop) is True
        got = [codec.decode_map(client.recv())["n"] for _ in range(2) if client.poll(5000)]
        assert got == [1, 2]
        assert any("unexpected error" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
        echo.actor_ref.stop(block=True, timeout=5)
        echo.join(5)


def test_a_value_only_msgpack_writes_goes_out_in_place_as_msgpack_writes_it(
        domain: HostileDomain) -> None:
    """The publisher and the gateways encode in place with msgspec's
    ``encode_into`` inline; a value it refuses (an int subclass: an
    ``IntEnum``) goes to ``codec.pack_into``, which writes msgpack's bytes,
    and the next message is whole (the shared buffer is rewritten)."""
    level = enum.IntEnum("Level", "LOW HIGH").HIGH
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        def send() -> bool:
            with burst():
                gw.send("E", command("E", level=level))
                gw.send("F", command("F"))
                return gw.in_place()

        assert gw._loop.run_sync(send) is True
        _, first = domain.sock.recv_multipart()
        assert codec.decode_map(first)["args"] == {"level": 2}
        assert domain.command()[1]["order_id"] == "F"
    finally:
        stop(gw)
    with subscribed_publisher() as (pub, sub, _):
        def publish() -> bool:
            with burst():
                pub.publish("web", {"type": "order_progress", "x": level})
                pub.publish("web", {"type": "order_progress", "n": 1})
                return pub.in_place()

        assert pub._loop.run_sync(publish) is True
        assert sub.poll(5000)
        topic, raw = sub.recv_multipart()
        assert (topic, raw) == (b"web\x00", codec.msgpack_pack({"type": "order_progress",
                                                                "x": level}))
        assert received(sub, 1) == [(b"web\x00", 1)]


def test_a_command_goes_out_as_the_contract_map_whatever_its_args(domain: HostileDomain) -> None:
    """The gateway encodes a tagged struct, not the dict: the frame is the
    bytes of ``codec.pack`` of the contract's map, for any args; one whose
    value no encoder takes (an int past 64 bits) is survived as before and
    the next command is whole."""
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    odd: list[dict[str, Any]] = [{}, {"n": -(2**63)}, {"u": "Zürich 東京", "b": b"\x00\xff"},
                                 {"deep": [{"a": [1.5, None, True]}]}, {"big": 2**64 - 1}]
    try:
        def send() -> bool:
            with burst():
                for i, args in enumerate(odd):
                    gw.send(f"O{i}", command(f"O{i}", **args) if args else
                            Send("billing", f"O{i}:step", "create_invoice", {}, 30.0))
                gw.send("BAD", command("BAD", n=2**64))  # msgpack refuses it too
                gw.send("NEXT", command("NEXT"))
                return gw.in_place()

        assert gw._loop.run_sync(send) is True
        for i, args in enumerate(odd):
            _, frame = domain.sock.recv_multipart()
            assert frame == codec.pack({"type": "command", "command_id": f"O{i}:step",
                                        "order_id": f"O{i}", "op": "create_invoice",
                                        "args": args})
        assert domain.command()[1]["order_id"] == "NEXT"
        assert "BAD:step" not in gw.pending
    finally:
        stop(gw)


def test_a_burst_lets_go_of_what_it_held_even_when_it_fails(domain: HostileDomain) -> None:
    """``in_place`` decides once per burst (``held_by``): after the burst, even
    one left by an error, the gateway is free again, and a later burst (or
    another thread while one holds it) decides afresh."""
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        def failing() -> None:
            with burst():
                gw.send("A", command("A"))
                raise RuntimeError("the writer's own bug")

        with pytest.raises(RuntimeError):
            gw._loop.run_sync(failing)

        def again() -> list[bool]:
            free = gw.held_by is loop_module.FREE
            with burst():
                first = gw.in_place()
                other: queue.Queue[bool] = queue.Queue()
                thread = threading.Thread(target=lambda: other.put(gw.in_place()))
                thread.start()
                thread.join(10)
                gw.send("B", command("B"))
            return [free, first, other.get(timeout=10), gw.held_by is loop_module.FREE]

        assert gw._loop.run_sync(again) == [True, True, False, True]
        assert [domain.command()[1]["order_id"] for _ in range(2)] == ["A", "B"]
    finally:
        stop(gw)


def test_the_hot_actors_keep_their_instance_dict_small(domain: HostileDomain) -> None:
    """Past 30 instance attributes CPython 3.11 gives up an object's shared-key
    dict and every attribute and method lookup on it gets slower: the gateway
    and the publisher keep their own fields in slots."""
    delivered: queue.Queue[Any] = queue.Queue()
    gw, _ = launch(domain, delivered)
    try:
        gw._loop.run_sync(lambda: gw.send("A", command("A")))
        assert len(vars(gw)) <= 20
    finally:
        stop(gw)
    with subscribed_publisher() as (pub, _sub, _):
        assert len(vars(pub)) <= 20
