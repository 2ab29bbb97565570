"""Session 12 review of the ROUTER framing rule (``actors.endpoint.read_requests``)
with CURVE on: the intake and the domain-events endpoint read each message
with its ``User-Id``, a path ``test_review12_hygiene``
does not take. Every odd shape is answered ``malformed`` with none of the
sender's frames, and an authenticated client's one-frame and REQ requests
are still served as its identity allows. A message of very many frames
is read a bounded chunk a loop turn (``DRAIN_PER_READ``): one message of a
million frames held the service's one loop for seconds."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Endpoints, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_review12_hygiene import EVENT, GET, SHAPES, _exchange
from test_security import keys, opts, secure  # noqa: F401 - fixtures

from actors.endpoint import DRAIN_PER_READ, RequestReader
from gateways.client import Client
from oms import codec


def exchange(endpoint: str, kind: int, frames: list[bytes], curve: dict[str, Any]) -> list[bytes]:
    return _exchange(endpoint, kind, frames, curve)


def check(endpoint: str, payload: bytes, answer: str, curve: dict[str, Any]) -> None:
    for sent, head, served in SHAPES:
        frames = [payload if f == b"P" else f for f in sent]
        got = exchange(endpoint, zmq.DEALER, frames, curve)
        assert got[:-1] == head, (sent, got)
        reply = codec.decode_map(got[-1])
        expected = answer if served else "malformed"
        assert reply.get("code", reply["type"]) == expected, (sent, reply)
    req = exchange(endpoint, zmq.REQ, [payload], curve)
    assert len(req) == 1 and codec.decode_map(req[0]).get("code", "ack") == answer
    odd = exchange(endpoint, zmq.REQ, [b"a", payload], curve)
    assert len(odd) == 1 and codec.decode_map(odd[0])["code"] == "malformed"


def test_with_curve_odd_frames_are_malformed_and_authenticated_ones_served(
        secure: Any, keys: Path, eps: Any) -> None:  # noqa: F811 - fixtures
    check(eps.intake, GET, "not_found", opts(keys, "operator-ann"))
    event = codec.decode_map(EVENT)
    check(eps.domain_events, codec.pack({**event, "system": "warehouse"}), "ack",
          opts(keys, "warehouse"))
    # the sender's identity still decides: the warehouse's key may not send billing's
    refused = exchange(eps.domain_events, zmq.DEALER, [b"", codec.pack(
        {**event, "event_id": "e-2", "system": "billing"})], opts(keys, "warehouse"))
    assert refused[0] == b"" and codec.decode_map(refused[1])["code"] == "unauthorized"


# -- a message of very many frames ----------------------------------------------------


def connected_pair() -> tuple[zmq.Socket, zmq.Socket]:
    """A ROUTER on a random loopback port and a DEALER connected to it."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
    return router, dealer


def test_a_message_of_many_frames_is_read_a_bounded_chunk_a_call() -> None:
    """Past its fourth frame a message's frames are discarded, at most
    ``DRAIN_PER_READ`` a call, the socket still readable between calls; the
    message is answered once, and the next message read whole afterwards."""
    router, dealer = connected_pair()
    try:
        n = 3 * DRAIN_PER_READ + 10
        dealer.send_multipart([b""] * n + [b"P"])
        dealer.send_multipart([b"", b"next"])
        assert router.poll(10_000)
        reader = RequestReader(router, False)
        reads = [list(reader.read(100))]
        for _ in range(3):  # 2 * DRAIN_PER_READ + 14 frames are left, then 14
            assert router.poll(0), "readable while frames are left"
            reads.append(list(reader.read(100)))
        [(first, none, _)] = reads[0]
        assert none is None and first[1:] == (b"",)  # malformed, answered with the delimiter
        assert reads[1:3] == [[], []]
        nxt = [((first[0], b""), b"next", None)]
        if reads[3] != nxt:  # (drained; "next" had not come yet)
            assert reads[3] == [] and router.poll(10_000) and list(reader.read(100)) == nxt
    finally:
        router.close()
        dealer.close()


def metric(port: int, sample: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name + str(sorted(s.labels.items())) == sample:
                return float(s.value)
    raise AssertionError(f"no sample {sample}")


@pytest.mark.slow
def test_a_million_frames_never_hold_the_service_loop_a_second(
        procs: Any, tmp_path: Path) -> None:
    """A client's one message of a million empty frames (2 MB on the wire)
    held the service's one loop for some 6 s here (each frame kept as
    bytes): every order, gateway and request waited. Now it is drained a
    bounded chunk a loop turn (``oms_loop_turn_seconds``' count; the service
    in its own process); the message is answered ``malformed`` once, and the
    client served after it."""
    eps, port = Endpoints(), free_port()
    procs(eps.serve_args(tmp_path / "data") + ["--metrics-port", str(port)], "serve")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(eps.intake)
    try:
        with Client(eps.intake, timeout=20) as client:
            client.wait_ready(30)
            sock.send_multipart([b""] * 1_000_000 + [GET])
            sock.send(GET)
            replies = []
            for _ in range(2):
                assert sock.poll(120_000), "no reply"
                replies.append(sock.recv_multipart())
            assert replies[0][0] == b"" and codec.decode_map(replies[0][-1])["code"] == "malformed"
            assert codec.decode_map(replies[1][0])["code"] == "not_found"
            assert client.get("O999999999999")["code"] == "not_found"
    finally:
        sock.close()
    # drained a bounded chunk a turn: at least as many turns as chunks (a count,
    # not a duration: a busy machine may stretch any one turn)
    assert metric(port, "oms_loop_turn_seconds_count[]") >= 1_000_000 // DRAIN_PER_READ


def test_a_read_left_at_a_long_message_goes_on_with_its_rest_next_time() -> None:
    """The endpoint stops reading if handling a message raises (the loop
    survives it): the rest of a long message is still discarded by the next
    read, never taken for a new message (its next frame as a routing id)."""
    router, dealer = connected_pair()
    try:
        dealer.send_multipart([b"x", b"y", b"z", b"forged-id", b"forged-request"])
        dealer.send(b"next")
        assert router.poll(10_000)
        reader = RequestReader(router, False)
        reading = reader.read(10)
        _, frame, _ = next(reading)
        assert frame is None
        reading.close()  # (as a raise in its handler leaves it)
        got: list[Any] = []
        while not got:  # (the rest is discarded first; "next" may come a little later)
            assert router.poll(10_000)
            got = list(reader.read(10))
        [((peer,), frame, _)] = got
        assert frame == b"next" and peer != b"forged-id"
    finally:
        router.close()
        dealer.close()
