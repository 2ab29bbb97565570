"""Everything that crosses the service's edges toward domain systems and
subscribers, over real ZeroMQ sockets: a hostile domain system answering the
gateway, events pushed to the domain-events endpoint, subscribers of the
events endpoint. Each bad input is a clear error (counted, logged), never
state, and the service keeps running."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from conftest import CommandSink, SimThread, endpoint
from helpers import failing_deliverer, poll_until, retail_order
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from actors.metrics import Metrics
from actors.publisher import Publisher, topic_of
from actors.security import client_options, generate, read_public
from actors.throttle import LogThrottle
from gateways.breaker import Breaker
from gateways.client import Client, wait_terminal
from gateways.gateway import Gateway
from oms import codec, edge
from oms.config import ConfigError
from oms.messages import CommandResult, Send


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


class HostileDomain(CommandSink):
    """A domain system's ROUTER that answers whatever the test tells it to."""

    def command(self) -> tuple[bytes, dict[str, Any]]:
        peer, frame = self.received()
        return peer, codec.decode_map(frame)

    def answer(self, peer: bytes, reply: Any) -> None:
        self.sock.send_multipart([peer, reply if isinstance(reply, bytes) else
                                  codec.pack(reply)])


@pytest.fixture
def gateway(domain: HostileDomain) -> Iterator[tuple[Gateway, queue.Queue[Any], Metrics]]:
    delivered: queue.Queue[Any] = queue.Queue()
    metrics = Metrics(CollectorRegistry())
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint,
                        lambda order_id, res: delivered.put((order_id, res)), metrics,
                        breaker=Breaker(threshold=1000))
    yield gw, delivered, metrics
    gw.actor_ref.stop(block=True, timeout=5)
    gw.join(5)


def roundtrip(domain: HostileDomain, gw: Gateway, delivered: queue.Queue[Any], reply: Any,
              *, timeout_s: float = 10.0, cid: str = "O1:create_invoice") -> CommandResult:
    """Send one command; the hostile domain answers ``reply`` (a callable
    gets the command id); return what the order receives."""
    gw.send("O1", Send("billing", cid, "create_invoice", {"total_minor": 5}, timeout_s))
    peer, command = domain.command()
    assert command["command_id"] == cid
    domain.answer(peer, reply(cid) if callable(reply) else reply)
    order_id, result = delivered.get(timeout=5)
    assert order_id == "O1"
    return result


def result(cid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "result", "command_id": cid, **fields}


def circuit_open(retry_after: Any) -> Any:
    return lambda cid: result(cid, ok=False, data={"retry_after": retry_after}, error={
        "code": "circuit_open", "message": "breaker", "retryable": True})


def test_the_gauges_other_threads_read_follow_the_gateway(
        gateway: tuple[Gateway, queue.Queue[Any], Metrics], domain: HostileDomain) -> None:
    """The metrics thread reads a gateway only through ``gauges`` (a value
    the gateway replaces on the loop): a command awaiting its reply shows as
    pending, its reply clears it, and the breaker's state is there too."""
    gw, delivered, _ = gateway
    assert gw.gauges == (0, "closed")
    gw.send("O1", Send("billing", "O1:gauged", "create_invoice", {"total_minor": 5}, 10.0))
    peer, command = domain.command()
    assert poll_until(lambda: gw.gauges.pending == 1, 5)
    domain.answer(peer, result(command["command_id"], ok=True, data={"invoice_id": "i-1"}))
    assert delivered.get(timeout=5)[1].ok
    assert poll_until(lambda: gw.gauges == (0, "closed"), 5)


BAD_RETRY_AFTER = [math.nan, math.inf, -math.inf, -1, 1e12, 2**64 - 1, "5", True, None,
                   [1], {"s": 1}]


@pytest.mark.parametrize("value", BAD_RETRY_AFTER, ids=repr)
def test_a_circuit_open_reply_with_a_bad_retry_after_is_a_contract_violation(
        domain: HostileDomain, gateway: Any, value: Any) -> None:
    gw, delivered, metrics = gateway
    res = roundtrip(domain, gw, delivered, circuit_open(value))
    assert not res.ok and res.data is None  # the bad number never reaches the order
    assert res.error is not None
    assert (res.error.code, res.error.retryable) == ("invalid_reply", True)
    assert "retry_after" in res.error.message
    assert sample(metrics, "oms_gateway_invalid_replies_total", system="billing",
                  reason="number") == 1
    # and the gateway carries on: the next command gets its good answer
    good = roundtrip(domain, gw, delivered, lambda cid: result(cid, ok=True, data={
        "invoice_id": "inv-1"}), cid="O1:create_invoice#1")
    assert (good.ok, good.data) == (True, {"invoice_id": "inv-1"})


def test_a_good_retry_after_reaches_the_order(domain: HostileDomain, gateway: Any) -> None:
    gw, delivered, _metrics = gateway
    res = roundtrip(domain, gw, delivered, circuit_open(2.5))
    assert res.error is not None and res.error.code == "circuit_open"
    assert res.data == {"retry_after": 2.5}


NESTED = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}
MALFORMED_REPLIES = {
    "data a list": (lambda c: result(c, ok=True, data=[1, 2]), "data"),
    "data a string": (lambda c: result(c, ok=True, data="inv-1"), "data"),
    "data nil": (lambda c: result(c, ok=True, data=None), "data"),
    "data missing": (lambda c: result(c, ok=True), "data"),
    "NaN deep in data": (lambda c: result(c, ok=True, data={"x": [{"y": math.nan}]}), "data"),
    "uint64 in data": (lambda c: result(c, ok=True, data={"n": 2**64 - 1}), "data"),
    "binary in data": (lambda c: result(c, ok=True, data={"b": b"\x00"}), "data"),
    "data nested 9 deep": (lambda c: result(c, ok=True, data=NESTED), "data"),
    "ok a string": (lambda c: result(c, ok="yes", data={}), "ok"),
    "ok missing": (lambda c: result(c, data={}), "ok"),
    "unknown type": (lambda c: {"type": "resulz", "command_id": c, "ok": True, "data": {}},
                     "type"),
    "error not a map": (lambda c: result(c, ok=False, error="boom"), "error"),
    "error code a number": (lambda c: result(c, ok=False, error={
        "code": 7, "message": "m", "retryable": False}), "error"),
    "error code too long": (lambda c: result(c, ok=False, error={
        "code": "x" * 65, "message": "m", "retryable": False}), "error"),
    "retryable a string": (lambda c: result(c, ok=False, error={
        "code": "out_of_stock", "message": "m", "retryable": "no"}), "error"),
    "retryable missing": (lambda c: result(c, ok=False, error={
        "code": "out_of_stock", "message": "m"}), "error"),
    "too large": (lambda c: result(c, ok=True, data={"x": "y" * (edge.MAX_REPLY_BYTES + 1)}),
                  "too_large"),
    "float 2**63 in data": (lambda c: result(c, ok=True, data={"f": 2.0**63}), "data"),
    "float32 infinity in data": (lambda c: msgpack.packb(result(
        c, ok=True, data={"f": [math.inf]}), use_single_float=True), "data"),
    "ok twice, the last false": (lambda c: _raw_map(
        ("type", "result"), ("command_id", c), ("ok", True), ("data", {}), ("ok", False)),
        "error"),
    "data twice, the last NaN": (lambda c: _raw_map(
        ("type", "result"), ("command_id", c), ("ok", True), ("data", {}),
        ("data", {"n": math.nan})), "data"),
}


def _raw_map(*pairs: tuple[str, Any]) -> bytes:
    """A reply map with its keys as given, repeated ones too (msgpack keeps
    the last value)."""
    return bytes([0x80 | len(pairs)]) + b"".join(codec.pack(k) + codec.pack(v)
                                                  for k, v in pairs)


@pytest.mark.parametrize("case", sorted(MALFORMED_REPLIES))
def test_a_malformed_reply_is_a_retryable_contract_violation(
        domain: HostileDomain, gateway: Any, case: str) -> None:
    gw, delivered, metrics = gateway
    reply, reason = MALFORMED_REPLIES[case]
    res = roundtrip(domain, gw, delivered, reply)
    assert not res.ok and res.data is None and res.error is not None
    assert (res.error.code, res.error.retryable) == ("invalid_reply", True)
    assert sample(metrics, "oms_gateway_invalid_replies_total", system="billing",
                  reason=reason) == 1
    assert sample(metrics, "oms_step_seconds_count", system="billing", op="create_invoice",
                  outcome="invalid_reply") == 1


@pytest.mark.parametrize("reply", [
    b"\xc1garbage", codec.pack([1, 2]), codec.pack({"type": "result", "ok": True, "data": {}}),
    codec.pack({"type": "result", "command_id": 5, "ok": True}),
    msgpack.packb({**result("O1:create_invoice", ok=True, data={}), "x": msgpack.ExtType(1, b"")}),
    codec.pack(result("O1:create_invoice", ok=True, data={}))[:-1] + b"\x81\xa1x\xa2\xff\xfe",
    codec.pack(result("x" * (edge.MAX_ID + 1), ok=True, data={}))],
    ids=["undecodable", "not a map", "no command_id", "command_id int", "ext unknown field",
         "not UTF-8 in data", "command_id too long"])
def test_a_reply_naming_no_command_is_counted_and_the_command_times_out(
        domain: HostileDomain, gateway: Any, reply: bytes) -> None:
    gw, delivered, metrics = gateway
    res = roundtrip(domain, gw, delivered, reply, timeout_s=0.3)
    assert res.error is not None and res.error.code == "timeout"
    total = sum(s.value for s in metrics.gateway_invalid_replies.collect()[0].samples
                if s.name.endswith("_total"))
    assert total == 1


@pytest.mark.parametrize("reply", [
    lambda c: {**result(c, ok=True, data={"invoice_id": "i-1"}), "x": b"\x00"},
    lambda c: {**result(c, ok=True, data={"invoice_id": "i-1"}), "error": None},
    lambda c: _raw_map(("type", "result"), ("command_id", c), ("ok", True),
                       ("data", {"n": math.nan}), ("data", {"invoice_id": "i-1"})),
    lambda c: _raw_map(("type", "result"), ("command_id", c), ("ok", False), ("ok", True),
                       ("data", {"invoice_id": "i-1"}))],
    ids=["bin unknown field", "error with ok", "data twice, the last fine", "ok twice"])
def test_a_good_reply_the_one_step_read_leaves_to_the_full_checks_reaches_its_order(
        domain: HostileDomain, gateway: Any, reply: Any) -> None:
    """``edge.decode_success`` takes only plain successes; a good reply it
    leaves (an unknown field, a key twice) is read in full, as before."""
    gw, delivered, _ = gateway
    res = roundtrip(domain, gw, delivered, reply)
    assert (res.ok, res.data, res.error, res.data_fit) == (True, {"invoice_id": "i-1"}, None,
                                                           True)


def test_a_good_failure_reply_keeps_its_code(domain: HostileDomain, gateway: Any) -> None:
    gw, delivered, _metrics = gateway
    res = roundtrip(domain, gw, delivered, lambda c: result(c, ok=False, error={
        "code": "payment_declined", "message": "no", "retryable": False}))
    assert res.error is not None
    assert (res.error.code, res.error.retryable, res.data) == ("payment_declined", False, {})


@pytest.mark.parametrize("threshold,cooldown", [(5, math.nan), (5, math.inf), (5, -1.0),
                                                (0, 5.0), (True, 5.0)])
def test_a_breaker_setting_out_of_range_is_refused(threshold: Any, cooldown: Any) -> None:
    with pytest.raises(ConfigError):
        Breaker(threshold, cooldown)


# -- the domain-events endpoint ------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate(folder / "server", ["server"])
    names = ["web", "webshop", "operator-ann", "domains", "warehouse", "intruder"]
    generate(folder / "own", names)
    allowed = folder / "clients"
    allowed.mkdir()
    for name in names[:-1]:
        (allowed / f"{name}.key").write_text((folder / "own" / f"{name}.key").read_text())
    return folder


def key_opts(keys: Path, name: str) -> dict[str, Any]:
    return client_options(str(keys / "own" / f"{name}.key_secret"),
                          str(keys / "server" / "server.key"))


@pytest.fixture
def secure(keys: Path, make_service: Any, sim_config: Any) -> Iterator[Any]:
    """A CURVE service; the simulators push events with the ``domains`` key and
    never fill a back-order by themselves."""
    public, secret = zmq.auth.load_certificate(str(keys / "own" / "domains.key_secret"))
    sim_config.curve = {"public": public, "secret": secret,
                        "service_key": read_public(keys / "server" / "server.key")}
    sim_config.restock_s = 3600.0
    thread = SimThread(sim_config)
    yield make_service(curve_server_key=str(keys / "server" / "server.key_secret"),
                       curve_clients=str(keys / "clients"))
    thread.stop()


class Pusher:
    """A DEALER pushing domain events, as a domain system does."""

    def __init__(self, ep: str, options: dict[str, Any] | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for name, value in (options or {}).items():
            self.sock.setsockopt(getattr(zmq, name), value)
        self.sock.connect(ep)

    def push(self, frame: dict[str, Any] | bytes) -> dict[str, Any]:
        self.sock.send(frame if isinstance(frame, bytes) else codec.pack(frame))
        assert self.sock.poll(5000), "no answer to a domain event"
        return codec.decode_map(self.sock.recv())

    def close(self) -> None:
        self.sock.close()


def event(order_id: str, system: str, name: str, **data: Any) -> dict[str, Any]:
    return {"type": "event", "event_id": f"ev-{os.urandom(6).hex()}", "system": system,
            "order_id": order_id, "name": name, "data": data}


def held_order(client: Client, ext: str) -> tuple[str, str]:
    """An order back-ordered (held, awaiting_stock) and its reservation id."""
    oid = client.submit(retail_order(ext, items=[
        {"id": "a", "product_id": "SKU-901", "quantity": 10**9}]))["order_id"]
    view = poll_until(lambda: (v := client.get(oid)["order"])["state"] == "held" and v)
    reservation = next(s["result"]["reservation_id"] for s in view["steps"]
                       if s["name"] == "reserve_stock")
    return oid, reservation


def test_only_domain_system_keys_push_events_each_its_own(secure: Any, eps: Any,
                                                          keys: Path) -> None:
    with Client(eps.intake, curve=key_opts(keys, "web")) as web:
        oid, rid = held_order(web, "edge-hold")
        forged = [("web", "warehouse"), ("web", "web"), ("operator-ann", "warehouse"),
                  ("warehouse", "shipping"), ("domains", "warehouse2")]
        for key, system in forged:  # (whose key, which system the event claims)
            pusher = Pusher(eps.domain_events, key_opts(keys, key))
            reply = pusher.push(event(oid, system, "stock_reserved", reservation_id=rid))
            pusher.close()
            assert (reply["type"], reply["code"]) == ("error", "unauthorized"), (key, system)
        view = web.get(oid)["order"]
        assert (view["state"], view["state_reason"]) == ("held", "awaiting_stock")
        assert secure.metrics.registry.get_sample_value(
            "oms_domain_events_total", {"system": "invalid", "outcome": "unauthorized"}) == 5
        warehouse = Pusher(eps.domain_events, key_opts(keys, "warehouse"))
        good = event(oid, "warehouse", "stock_reserved", reservation_id=rid)
        assert warehouse.push(good) == {"type": "ack", "event_id": good["event_id"]}
        warehouse.close()
        assert wait_terminal(web, [oid], timeout=20)[oid]["state"] == "completed"


def test_without_curve_only_configured_systems_and_bounded_labels(service: Any,
                                                                  eps: Any) -> None:
    pusher = Pusher(eps.domain_events)
    assert pusher.push(event("O1", "wherehouse", "stock_reserved"))["code"] == "unauthorized"
    batch, total = 1000, 50_000
    for start in range(0, total, batch):  # pipelined, a window at a time
        for i in range(start, start + batch):
            pusher.sock.send(codec.pack(event("O1", f"sys-{i}", "x")))
        for _ in range(batch):
            assert pusher.sock.poll(5000)
            assert codec.decode_map(pusher.sock.recv())["code"] == "unauthorized"
    assert pusher.push(event("O404", "warehouse", "stock_reserved"))["type"] == "ack"
    pusher.close()
    labels = {s.labels["system"] for s in service.metrics.domain_events.collect()[0].samples}
    assert labels <= {"warehouse", "invalid"}
    assert service.metrics.registry.get_sample_value(
        "oms_domain_events_total", {"system": "invalid", "outcome": "unauthorized"}) == total + 1


@pytest.mark.parametrize("case", ["too large", "NaN in data", "huge int", "data a list",
                                  "deep data", "no event_id", "not msgpack", "bytes key",
                                  "nested bytes key", "float 2**63", "event_id too long",
                                  "data twice, the last NaN", "ext in an unknown field",
                                  "name not UTF-8"])
def test_a_bad_event_gets_a_clear_error_and_the_endpoint_carries_on(
        service: Any, eps: Any, case: str) -> None:
    frames: dict[str, Any] = {
        "too large": (event("O1", "warehouse", "x", blob="b" * edge.MAX_EVENT_BYTES),
                      "too_large"),
        "NaN in data": (event("O1", "warehouse", "x", v=math.nan), "malformed"),
        "huge int": (event("O1", "warehouse", "x", v=[2**64 - 1]), "malformed"),
        "data a list": ({**event("O1", "warehouse", "x"), "data": [1]}, "malformed"),
        "deep data": (event("O1", "warehouse", "x", **NESTED), "malformed"),
        "no event_id": ({**event("O1", "warehouse", "x"), "event_id": None}, "malformed"),
        "not msgpack": (b"\xc1\xc1", "malformed"),
        # a msgpack bin key passes strict_map_key; it raised in the check, no reply was sent
        "bytes key": ({**event("O1", "warehouse", "x"), "data": {b"k": 1}}, "malformed"),
        "nested bytes key": (event("O1", "warehouse", "x", v={b"k": 1}), "malformed"),
        "float 2**63": (event("O1", "warehouse", "x", v=2.0**63), "malformed"),
        "event_id too long": ({**event("O1", "warehouse", "x"), "event_id": "e" * 1001},
                              "malformed"),
        "data twice, the last NaN": (_raw_map(*event("O1", "warehouse", "x").items(),
                                              ("data", {"v": math.nan})), "malformed"),
        "ext in an unknown field": (msgpack.packb({**event("O1", "warehouse", "x"),
                                                   "x": msgpack.ExtType(1, b"")}), "malformed"),
        "name not UTF-8": (codec.pack({**event("O1", "warehouse", "x"), "name": "\xe9"}).replace(
            b"\xa2\xc3\xa9", b"\xa2\xc3\x28"), "malformed"),
    }
    frame, code = frames[case]
    pusher = Pusher(eps.domain_events)
    reply = pusher.push(frame)
    assert (reply["type"], reply["code"]) == ("error", code)
    if code == "malformed":  # the full checks' own words
        raw = frame if isinstance(frame, bytes) else codec.pack(frame)
        try:
            expected = edge.parse_event(codec.decode_map(raw)).message  # type: ignore[union-attr]
        except codec.DecodeError as exc:
            expected = str(exc)
        assert reply["message"] == expected
    assert pusher.push(event("O404", "warehouse", "x"))["type"] == "ack"
    pusher.close()


def test_an_event_beyond_the_socket_limit_drops_only_that_connection(service: Any,
                                                                     eps: Any) -> None:
    huge = Pusher(eps.domain_events)
    huge.sock.send(codec.pack(event("O1", "warehouse", "x", blob="b" * (5 * 2**20))))
    assert huge.sock.poll(500) == 0  # ZeroMQ cut the connection: no answer possible
    huge.close()
    pusher = Pusher(eps.domain_events)
    assert pusher.push(event("O404", "warehouse", "x"))["type"] == "ack"
    pusher.close()


def test_a_reply_to_a_vanished_or_stalled_peer_is_counted_never_blocks(
        service: Any, eps: Any) -> None:
    failures = service.metrics.reply_failures.labels("domain_events")
    service.domain_events.reply_to((b"\x00gone",), {"type": "ack", "event_id": "e"})
    poll_until(lambda: failures._value.get() == 1, timeout=5)
    stalled = Pusher(eps.domain_events, {"RCVHWM": 1, "RCVBUF": 4096})  # never reads
    for _ in range(40):  # until the service's queue to it is full (kernel buffers too)
        for _ in range(10_000):
            stalled.sock.send(b"\xc1")
        if failures._value.get() > 1:
            break
    poll_until(lambda: failures._value.get() > 1, timeout=10)
    other = Pusher(eps.domain_events)
    assert other.push(event("O404", "warehouse", "x"))["type"] == "ack"
    other.close()
    stalled.close()


# -- the events endpoint: topics and subscribers ------------------------------


def subscriber(ep: str, topic: bytes = b"", curve: dict[str, Any] | None = None,
               stalled: bool = False) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if stalled:  # never reads, and takes as little as it can before it stops
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.RCVBUF, 4096)
    for name, value in (curve or {}).items():
        sub.setsockopt(getattr(zmq, name), value)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(ep)
    return sub


def drain(sub: zmq.Socket, wait_ms: int = 300) -> list[tuple[bytes, dict[str, Any]]]:
    out = []
    while sub.poll(wait_ms):
        topic, raw = sub.recv_multipart()
        out.append((topic, codec.decode_map(raw)))
    return out


@pytest.mark.parametrize("first", ["web", "webshop"])
def test_with_curve_a_channel_never_gets_the_events_of_a_channel_it_prefixes(
        secure: Any, eps: Any, keys: Path, first: str) -> None:
    order = [first, "webshop" if first == "web" else "web"]
    subs = {name: subscriber(eps.events, b"", key_opts(keys, name)) for name in order}
    subs["web"].setsockopt(zmq.SUBSCRIBE, b"webshop\x00")  # asks for webshop's outright
    with Client(eps.intake, curve=key_opts(keys, "web")) as web, \
            Client(eps.intake, curve=key_opts(keys, "webshop")) as shop:
        for name, client in (("web", web), ("webshop", shop)):
            def seen(name: str = name, client: Client = client) -> bool:
                client.submit(retail_order(f"pfx-{os.urandom(4).hex()}", source_system=name))
                return subs[name].poll(300) != 0  # subscribed (no slow joiner any more)
            poll_until(seen, timeout=20)
        ids = {name: client.submit(retail_order(f"pfx-last-{name}", source_system=name))[
            "order_id"] for name, client in (("web", web), ("webshop", shop))}
        wait_terminal(web, [ids["web"]], timeout=20)
        wait_terminal(shop, [ids["webshop"]], timeout=20)
    got = {name: drain(sub) for name, sub in subs.items()}
    for sub in subs.values():
        sub.close()
    for name in ("web", "webshop"):
        assert {topic for topic, _ in got[name]} == {name.encode() + b"\x00"}
        assert ids[name] in {ev["order_id"] for _, ev in got[name]}
    other = {ev["order_id"] for _, ev in got["webshop"]}
    assert not other & {ev["order_id"] for _, ev in got["web"]}


def test_without_curve_the_delimited_topic_is_exact_and_the_bare_name_still_works(
        service: Any, eps: Any, client: Client) -> None:
    exact = subscriber(eps.events, topic_of("web"))
    bare = subscriber(eps.events, b"web")  # as a contract client subscribes
    def seen() -> bool:
        client.submit(retail_order(f"nc-{os.urandom(4).hex()}"))
        return exact.poll(300) != 0 and bare.poll(300) != 0
    poll_until(seen, timeout=20)
    shop = client.submit(retail_order("nc-shop", source_system="webshop"))["order_id"]
    mine = client.submit(retail_order("nc-web"))["order_id"]
    wait_terminal(client, [shop, mine], timeout=20)
    exact_got, bare_got = drain(exact), drain(bare)
    assert {t for t, _ in exact_got} == {b"web\x00"}
    assert mine in {e["order_id"] for _, e in exact_got}
    assert mine in {e["order_id"] for _, e in bare_got}
    refused = client.submit(retail_order("nc-nul", source_system="web\x00shop"))
    assert refused["type"] == "rejected"
    exact.close()
    bare.close()


@pytest.fixture
def publisher() -> Iterator[Any]:
    started = []

    def start(**kw: Any) -> tuple[Publisher, str, Metrics]:
        ep, metrics = endpoint(), Metrics(CollectorRegistry())
        pub = Publisher.launch(zmq.Context.instance(), ep, metrics, **kw)
        started.append(pub)
        return pub, ep, metrics

    yield start
    for pub in started:
        pub.actor_ref.stop(block=True, timeout=5)
        pub.join(5)


class Reader:
    """A healthy subscriber: a thread that reads everything."""

    def __init__(self, ep: str) -> None:
        self.sock = subscriber(ep, b"")
        self.seen: set[int] = set()
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                _topic, raw = self.sock.recv_multipart()
                n = codec.decode_map(raw)["n"]
                if n < 0:  # a marker
                    self.seen.add(n)
                self.count += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def published_through(pub: Publisher, reader: Reader, n: int) -> bool:
    """Publish marker ``n`` until the healthy reader has it."""
    def got() -> bool:
        pub.publish("web", {"type": "order_state", "n": n})
        return n in reader.seen
    return bool(poll_until(got, timeout=10, every=0.05))


def test_stalled_subscribers_hold_bounded_memory_and_healthy_ones_still_get_events(
        publisher: Any) -> None:
    pub, ep, metrics = publisher(stall_timeout_s=3600)  # no eviction in this test
    reader = Reader(ep)
    stalled = [subscriber(ep, b"", stalled=True) for _ in range(20)]
    poll_until(lambda: metrics.subscribers._value.get() == 21, timeout=10)
    published_through(pub, reader, -1)
    payload = {"type": "order_state", "order_id": "O000000000001", "external_id": "ext-12345",
               "state": "inProgress", "previous_state": "acknowledged", "ts": 1.0}
    before = rss_mb()
    for start in range(0, 100_000, 1000):  # as fast as the publisher takes them
        for i in range(start, start + 1000):
            pub.publish("web", {**payload, "n": i})
        pub.actor_ref.ask("barrier", timeout=10)
    published_through(pub, reader, -2)  # after all 100,000: still delivered
    grown = rss_mb() - before
    # SNDHWM 100,000 (before) held every event for each stalled subscriber:
    # +232 MB for 20 of them, never given back.
    assert grown < 20, f"RSS grew {grown:.1f} MB"
    print(f"RSS +{grown:.1f} MB with 20 stalled subscribers over 100,000 events")
    assert reader.count > 1000
    for sock in stalled:
        sock.close()
    poll_until(lambda: metrics.subscribers._value.get() == 1, timeout=10)
    reader.close()


def test_a_stalled_subscriber_is_disconnected_and_a_healthy_one_stays(
        publisher: Any) -> None:
    pub, ep, metrics = publisher(stall_timeout_s=1.0)
    reader = Reader(ep)
    stalled = subscriber(ep, b"", stalled=True)
    poll_until(lambda: metrics.subscribers._value.get() == 2, timeout=10)
    n = 0

    def evicted() -> bool:
        nonlocal n
        for _ in range(500):  # keep publishing: the stalled one's buffers fill up
            n += 1
            pub.publish("web", {"type": "order_state", "n": n})
        return metrics.subscribers._value.get() == 1
    poll_until(evicted, timeout=15, every=0.05)
    published_through(pub, reader, -1)  # the healthy one was not disconnected
    stalled.close()
    reader.close()


def test_subscribers_beyond_the_bound_are_refused_until_a_place_is_free(
        publisher: Any) -> None:
    pub, ep, metrics = publisher(max_subscribers=2)
    first = Reader(ep)
    poll_until(lambda: metrics.subscribers._value.get() == 1, timeout=10)
    second = Reader(ep)
    poll_until(lambda: metrics.subscribers._value.get() == 2, timeout=10)
    third = Reader(ep)
    poll_until(lambda: metrics.subscribers_refused._value.get() >= 1, timeout=10)
    published_through(pub, first, -1)
    published_through(pub, second, -1)
    assert metrics.subscribers._value.get() == 2
    assert not third.seen  # it never got in
    first.close()  # a place is free: the refused one gets in on its next reconnect
    published_through(pub, third, -2)
    assert metrics.subscribers._value.get() == 2
    second.close()
    third.close()


@pytest.mark.parametrize("setting", [{"hwm": 0}, {"max_subscribers": -1},
                                     {"stall_timeout_s": math.nan}, {"hwm": 1.5e300}])
def test_publisher_settings_out_of_range_are_refused(setting: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Publisher(zmq.Context.instance(), "tcp://127.0.0.1:1", Metrics(CollectorRegistry()),
                  **setting)


def test_memory_a_stalled_subscriber_held_is_given_back_when_it_leaves(
        publisher: Any) -> None:
    pub, ep, metrics = publisher(stall_timeout_s=3600, hwm=50_000)  # room to hold a lot
    reader = Reader(ep)
    stalled = [subscriber(ep, b"", stalled=True) for _ in range(10)]
    poll_until(lambda: metrics.subscribers._value.get() == 11, timeout=10)
    published_through(pub, reader, -1)
    before = rss_mb()
    for start in range(0, 50_000, 1000):
        for i in range(start, start + 1000):
            pub.publish("web", {"type": "order_state", "order_id": "O1" * 40, "n": i})
        pub.actor_ref.ask("barrier", timeout=10)
    held = rss_mb() - before
    for sock in stalled:
        sock.close()
    poll_until(lambda: metrics.subscribers._value.get() == 1, timeout=10)
    poll_until(lambda: rss_mb() - before < held / 3, timeout=10, every=0.2)
    print(f"held +{held:.1f} MB; after they left +{rss_mb() - before:.1f} MB")
    reader.close()


@pytest.mark.parametrize("who", ["intruder", "plaintext"])
def test_a_refused_handshake_does_not_keep_a_subscriber_place(secure: Any, eps: Any,
                                                              keys: Path, who: str) -> None:
    gauge = secure.metrics.subscribers
    sub = subscriber(eps.events, b"", key_opts(keys, "intruder") if who == "intruder" else None)
    assert not sub.poll(300)
    poll_until(lambda: gauge._value.get() == 0, timeout=10)
    sub.close()
    web = subscriber(eps.events, b"", key_opts(keys, "web"))
    poll_until(lambda: gauge._value.get() == 1, timeout=10)
    web.close()


def test_a_flood_of_bad_input_logs_a_line_not_a_flood(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("edges-test"), every_s=60)
    with caplog.at_level(logging.WARNING, logger="edges-test"):
        for i in range(10_000):
            throttle.report("malformed", "bad event %d", i, summary="bad events")
        throttle.report("too_large", "big event", summary="big events")
    assert [r.getMessage() for r in caplog.records] == ["bad event 0", "big event"]


def test_the_service_applies_its_subscriber_settings(make_service: Any, eps: Any) -> None:
    svc = make_service(max_subscribers=1, events_hwm=10, subscriber_timeout_s=5.0)
    assert (svc.publisher.hwm, svc.publisher.stall_timeout_s) == (10, 5.0)
    first = subscriber(eps.events)
    poll_until(lambda: svc.metrics.subscribers._value.get() == 1, timeout=10)
    second = subscriber(eps.events)
    poll_until(lambda: svc.metrics.subscribers_refused._value.get() >= 1, timeout=10)
    assert svc.metrics.subscribers._value.get() == 1
    first.close()
    second.close()


def test_a_setting_out_of_range_stops_the_start(make_service: Any) -> None:
    with pytest.raises(ConfigError, match="max_subscribers"):
        make_service(max_subscribers=0)


def test_the_simulators_survive_a_command_they_cannot_handle(sim: Any, eps: Any) -> None:
    """A command whose args the reference simulator cannot handle (here a
    bin map key) ended the whole simulator process, all five systems; it is
    now answered with a non-retryable error and the next command works."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(eps.systems["warehouse"])
    try:
        def command(cid: str, args: dict[Any, Any]) -> dict[str, Any]:
            sock.send(codec.pack({"type": "command", "command_id": cid, "op": "reserve_stock",
                                  "order_id": "O1", "args": args}))
            assert sock.poll(5000), "no reply from the simulator"
            return codec.decode_map(sock.recv())

        bad = command("c-bad", {"items": [{"product_id": "SKU-1", "quantity": 1}],
                                "attributes": {b"k": 1}})
        assert (bad["ok"], bad["error"]["code"], bad["error"]["retryable"]) == (
            False, "invalid_command", False), bad
        good = command("c-good", {"items": [{"product_id": "SKU-1", "quantity": 1}]})
        assert good["ok"] is True, good
        assert sim.thread.is_alive()
    finally:
        sock.close()


def test_a_reply_whose_delivery_fails_costs_no_other_reply(domain: HostileDomain) -> None:
    """Replies read together are delivered after the read (their latencies
    observed first): one whose delivery raises is survived, the next still
    reaches its order."""
    delivered, deliver = failing_deliverer()

    metrics = Metrics(CollectorRegistry())
    gw = Gateway.launch(zmq.Context.instance(), "billing", domain.endpoint, deliver, metrics,
                        breaker=Breaker(threshold=1000))
    try:
        answers = []
        for order_id in ("BAD", "O2", "BAD", "O3"):
            cid = f"{order_id}:{len(answers)}"
            gw.send(order_id, Send("billing", cid, "create_invoice", {"total_minor": 5}, 10.0))
            peer, command = domain.command()
            answers.append((peer, result(command["command_id"], ok=True, data={})))
        for peer, reply in answers:
            domain.answer(peer, reply)
        got = [delivered.get(timeout=5)[0] for _ in range(2)]
        assert got == ["O2", "O3"]
        assert sample(metrics, "oms_step_seconds_count", system="billing", op="create_invoice",
                      outcome="ok") == 4
    finally:
        gw.actor_ref.stop(block=True, timeout=5)
        gw.join(5)


# -- data the gateway found fit: the engine does not check it twice ---------------

def _float32_reply(cid: str, count: int) -> bytes:
    """An ok reply whose data grows most when encoded again: float32s (5
    bytes each in the frame, 9 as the float64 the service keeps)."""
    return msgpack.packb(result(cid, ok=True, data={"f": [1.5] * count}),
                         use_single_float=True)


def test_data_of_a_small_reply_is_fit_and_of_a_larger_one_the_engine_checks(
        domain: HostileDomain, gateway: Any) -> None:
    """The largest frame the gateway vouches for, at the worst growth, still
    holds data within the engine's limit; one a little larger it does not
    vouch for, and the engine's own check refuses it (an invalid reply,
    retried), as before."""
    from oms import untrusted

    gw, delivered, _ = gateway
    fits = max(n for n in range(1600, 1700)
               if len(_float32_reply("O1:create_invoice", n)) <= edge.FIT_FRAME_BYTES)
    res = roundtrip(domain, gw, delivered, lambda cid: _float32_reply(cid, fits))
    assert res.ok and res.data_fit
    assert untrusted.data_problem(res.data) is None  # what the engine would have asked
    too_big = 1900  # a frame of about 9.5 KiB: 17 KiB as kept
    res = roundtrip(domain, gw, delivered, lambda cid: _float32_reply(cid, too_big),
                    cid="O1:create_invoice#1")
    assert res.ok and not res.data_fit
    assert "over the" in (untrusted.data_problem(res.data) or "")


json_like = st.recursive(  # what check_data lets through, and what it does not
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=30) | st.integers(2**63, 2**64 - 1),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=5),
    max_leaves=60)


@given(st.dictionaries(st.text(max_size=5), json_like, max_size=6), st.booleans(),
       st.integers(0, 2000))
@settings(max_examples=400, deadline=None)
def test_data_the_gateway_vouches_for_is_data_the_engine_would_keep(
        data: dict[str, Any], single: bool, pad: int) -> None:
    """``parse_reply`` accepted it and its frame is at most FIT_FRAME_BYTES:
    the engine's own check (``untrusted.data_problem``) finds nothing."""
    from oms import untrusted

    data = {**data, "pad": "p" * pad * 4}  # frames up to about 8 KiB and beyond
    try:
        frame = msgpack.packb(result("O1:x", ok=True, data=data), use_single_float=single)
    except OverflowError:  # a float beyond float32
        return
    parsed = edge.parse_reply(codec.decode_map(frame))
    if isinstance(parsed, edge.Reply) and edge.fit_to_keep(len(frame)):
        assert untrusted.data_problem(parsed.data) is None


@pytest.mark.parametrize("depth", range(1, 26))
@pytest.mark.parametrize("shape", ["list", "map", "mixed"])
def test_deep_data_the_gateway_vouches_for_is_data_the_engine_would_keep(
        depth: int, shape: str) -> None:
    from oms import untrusted

    value: Any = 1.5
    for level in range(depth):
        as_list = shape == "list" or (shape == "mixed" and level % 2)
        value = [value] if as_list else {"k": value}
    frame = codec.pack(result("O1:x", ok=True, data={"d": value}))
    parsed = edge.parse_reply(codec.decode_map(frame))
    if isinstance(parsed, edge.Reply) and edge.fit_to_keep(len(frame)):
        assert untrusted.data_problem(parsed.data) is None
    assert isinstance(parsed, edge.Reply) == (depth < edge.MAX_DEPTH)
