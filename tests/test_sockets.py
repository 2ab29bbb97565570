"""The sockets' hot-path helpers (``actors.sockets``) against pyzmq's own
``send_multipart`` / ``recv_multipart``: real sockets on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

import pytest
import zmq
from prometheus_client import CollectorRegistry

from actors.endpoint import RequestReader, RouterEndpoint
from actors.metrics import Metrics
from actors.sockets import send_frames
from oms import codec


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A DEALER connected to a ROUTER, the connection up."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    assert router.poll(5000)
    router.recv_multipart()
    yield router, dealer
    dealer.close()
    router.close()
    ctx.term()


def _wait(sock: zmq.Socket) -> None:
    assert sock.poll(5000), "nothing arrived within 5 s"


@pytest.mark.parametrize("frames", [
    [b"x"],
    [b""],
    [b"", b""],
    [b"a", b"", b"b"],
    [b"\x00" * 10, b"y" * 70_000],  # beyond pyzmq's copy threshold (65,536 bytes)
    [bytes([i]) for i in range(40)],
])
def test_the_reader_reads_each_message_whole_and_alone(
        pair: tuple[zmq.Socket, zmq.Socket], frames: list[bytes]) -> None:
    """Whatever a peer sends (empty frames, a large one, many), the reader
    takes that message (a request or not) and then the next one separately;
    an empty queue ends the read."""
    router, dealer = pair
    dealer.send_multipart(frames)
    dealer.send_multipart([b"next"])
    _wait(router)
    reader = RequestReader(router, False)
    [(envelope, frame, _)] = reader.read(1)
    assert len(envelope[0]) > 0  # the peer's routing id first
    assert frame == (frames[-1] if len(frames) == 1 or (len(frames) == 2 and not frames[0])
                     else None)
    _wait(router)
    assert list(reader.read(5)) == [((envelope[0],), b"next", None)]


def test_send_frames_then_a_reply_reaches_the_peer_in_order(
        pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """A reply through ``send_frames`` reaches the peer as one message, in order."""
    router, dealer = pair
    dealer.send(b"request")
    _wait(router)
    [((peer,), payload, _)] = RequestReader(router, False).read(1)
    assert payload == b"request"
    for reply in ([b"one"], [b"", b"two"], [b"3", b"", b"three"]):
        send_frames(router, [peer, *reply[:-1]], reply[-1])
        _wait(dealer)
        assert dealer.recv_multipart() == reply


@pytest.fixture
def endpoint(pair: tuple[zmq.Socket, zmq.Socket]) -> RouterEndpoint:
    """A ``RouterEndpoint`` on the pair's ROUTER (ROUTER_MANDATORY, as its own),
    driven from this thread, its socket's only one."""
    router, _ = pair
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    ep = RouterEndpoint(zmq.Context.instance(), "tcp://127.0.0.1:0",
                        Metrics(CollectorRegistry()))
    ep.sock = router
    return ep


def _request(pair: tuple[zmq.Socket, zmq.Socket], payload: bytes) -> tuple[bytes, ...]:
    router, dealer = pair
    dealer.send(payload)
    _wait(router)
    [(envelope, frame, user)] = RequestReader(router, False).read(1)
    assert (frame, user) == (payload, None)
    return envelope


class Level(IntEnum):
    HIGH = 3


def test_send_reply_encodes_as_pack_and_a_refused_payload_sends_nothing(
        endpoint: RouterEndpoint, pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """Each reply is the bytes ``codec.pack`` writes (also a value only msgpack
    encodes, and a shorter reply after a longer one: the reused buffer is cut
    to each); a payload neither encodes raises before any frame leaves, and
    the next reply is whole."""
    _, dealer = pair
    envelope = _request(pair, b"request")
    replies = [{"type": "ack", "data": "x" * 5000}, {"type": "ack"}, {"level": Level.HIGH},
               {"request_id": 7, "nested": {"a": [1, 2.5, None, True]}}]
    for payload in replies:
        endpoint.send_reply(envelope, payload)
        _wait(dealer)
        assert dealer.recv_multipart() == [codec.pack(payload)]
    with pytest.raises(TypeError):
        endpoint.send_reply(envelope, {"bad": object()})
    endpoint.send_reply(envelope, {"type": "ack"})
    _wait(dealer)
    assert dealer.recv_multipart() == [codec.pack({"type": "ack"})]


def test_send_reply_to_a_gone_peer_is_counted_not_raised(
        endpoint: RouterEndpoint, pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """ROUTER_MANDATORY: a reply to an unknown routing id fails on its first
    frame; it is counted in ``oms_reply_failures_total``, and the next reply
    to a known peer still arrives whole."""
    _, dealer = pair
    envelope = _request(pair, b"request")
    endpoint.send_reply((b"\x00gone",), {"type": "ack"})
    failures = endpoint.metrics.reply_failures.labels("endpoint")._value.get()
    assert failures == 1
    endpoint.send_reply(envelope, {"type": "ack", "n": 2})
    _wait(dealer)
    assert dealer.recv_multipart() == [codec.pack({"type": "ack", "n": 2})]
