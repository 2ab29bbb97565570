"""No input can hurt the service: every frame gets an answer, the service
stays up, and memory does not grow under a stream of hostile frames.
The service and simulators run as real processes on loopback."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Endpoints
from helpers import retail_order
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateways.client import Client
from oms import codec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Endpoints, Any]]:
    from conftest import Proc

    tmp = tmp_path_factory.mktemp("fuzz")
    eps = Endpoints()
    sim = Proc(eps.simulate_args() + ["--delivery-s", "0.05"], tmp / "simulate.log")
    svc = Proc(eps.serve_args(tmp / "data"), tmp / "serve.log")
    with Client(eps.intake) as client:
        client.wait_ready(30)
    yield eps, svc
    assert svc.p.poll() is None, "the service died"
    assert svc.terminate() == 0
    sim.kill()


def blast(endpoint: str, frames: Iterator[bytes], window: int = 256) -> int:
    """Send frames with up to ``window`` unanswered; return the replies seen."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = answered = 0
    try:
        for frame in frames:
            sock.send(frame)
            sent += 1
            while sent - answered >= window:
                assert sock.poll(10_000), f"no reply: {sent - answered} outstanding"
                sock.recv()
                answered += 1
        while answered < sent:
            assert sock.poll(10_000), f"no reply: {sent - answered} outstanding"
            sock.recv()
            answered += 1
    finally:
        sock.close()
    return answered


def hostile(rng: random.Random) -> bytes:
    """One frame from the corpus of hostile inputs (each deserves a reply)."""
    valid = codec.pack({"type": "submit_order", "order": retail_order("x")})
    kind = rng.randrange(12)
    if kind == 0:
        return os.urandom(rng.randrange(1, 300))
    if kind == 1:
        return valid[: rng.randrange(1, len(valid))]  # truncated msgpack
    if kind == 2:
        return msgpack.packb({1: "non-string key", "type": "get_order"})
    if kind == 3:
        return b"\xdb\xff\xff\xff\xf0" + b"x" * 10  # str32 claiming 4 GB
    if kind == 4:
        return b"\xdd\xff\xff\xff\xff" + b"\xc0" * 4  # array32 claiming 4 G items
    if kind == 5:
        return b"\x91" * rng.randrange(2000, 20_000) + b"\xc0"  # deep nesting
    if kind == 6:
        return b"\x81\xa4type\xa3\xff\xfe\xfd"  # invalid UTF-8
    if kind == 7:
        return msgpack.packb({"type": msgpack.ExtType(7, b"boom")})
    if kind == 8:
        order = retail_order("x")
        field = rng.choice(list(order))
        order[field] = rng.choice([None, 7, 1.5, [], {}, "s" * 1001, True, b"bin"])
        order["source_system"] = 42  # always invalid: nothing is stored
        return codec.pack({"type": "submit_order", "order": order})
    if kind == 9:
        return codec.pack({"type": rng.choice(["", "x" * 2000, "SUBMIT_ORDER", "💥"])})
    if kind == 10:
        return codec.pack({"type": "list_orders", "limit": rng.choice([-1, 0, 10**6, "5"]),
                           "after": rng.choice([None, 5, "O0"])})
    return codec.pack({"type": "get_order", "order_id": rng.choice(["", "\x00", "O" * 999])})


def test_hostile_frames_all_answered_and_memory_flat(target: tuple[Endpoints, Any]) -> None:
    eps, svc = target
    rng = random.Random(7)
    assert blast(eps.intake, (hostile(rng) for _ in range(5_000))) == 5_000  # warm up
    before = svc.rss_mb()
    assert blast(eps.intake, (hostile(rng) for _ in range(100_000))) == 100_000
    after = svc.rss_mb()
    print(f"\n100,000 hostile frames answered; RSS {before:.1f} MB before, {after:.1f} MB after")
    assert after <= before * 1.10


def test_oversized_frames(target: tuple[Endpoints, Any]) -> None:
    eps, _svc = target
    with Client(eps.intake) as client:
        reply = client.send_raw(b"\x00" * (2 * 1024 * 1024))
        assert reply["code"] == "too_large"
        assert client.submit(retail_order("after-big"))["type"] == "accepted"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20)
_requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["submit_order", "get_order", "cancel_order", "list_orders",
                              "order_counts", "retry_step", "bogus"])},
    optional={"order": _json, "order_id": _json, "limit": _json, "after": _json,
              "state": _json, "source_system": _json, "external_id": _json, "reason": _json,
              "operator": _json, "request_id": _json})


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=_requests)
def test_fuzzed_requests_always_get_a_typed_reply(target: tuple[Endpoints, Any],
                                                  request: dict[str, Any]) -> None:
    eps, _svc = target
    with Client(eps.intake, timeout=10) as client:
        reply = client.send_raw(codec.pack(request))
    assert isinstance(reply.get("type"), str)
    if reply["type"] == "error":
        assert reply["code"] in {"malformed", "unknown_type", "not_found", "unauthorized",
                                 "too_large", "conflict", "busy"}, reply


ODD = [
    dict(retail_order("odd-unicode"), customer={"id": "ü-ß-漢字-🙂", "name": "Zoë 🙂"}),
    retail_order("odd-max", external_id="e" * 1000),
    retail_order("odd-many", items=[{"id": str(i), "product_id": "p", "quantity": 1}
                                    for i in range(1000)]),
    retail_order("odd-deep", attributes={"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}),
    retail_order("odd-free", items=[{"id": "a", "product_id": "p", "quantity": 1,
                                     "unit_price_minor": 0}]),
    {**retail_order("odd-tel"), "order_type": "telecom",
     "items": [{"id": "n", "product_id": "x", "action": "noChange"}]},
]


@pytest.mark.parametrize("order", ODD, ids=[o["external_id"][:10] for o in ODD])
def test_valid_but_odd_orders_are_accepted_and_finish(target: tuple[Endpoints, Any],
                                                      order: dict[str, Any]) -> None:
    from gateways.client import wait_terminal

    eps, _svc = target
    with Client(eps.intake, timeout=20) as client:
        reply = client.submit(order)
        assert reply["type"] == "accepted", reply
        view = wait_terminal(client, [reply["order_id"]], timeout=30)[reply["order_id"]]
    assert view["state"] in ("completed", "partial")
