"""The sockets' hot-path helpers (``actors.sockets``) against pyzmq's own
``send_multipart`` / ``recv_multipart``: real sockets on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from actors.sockets import recv_frames, send_frames


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
def test_recv_frames_reads_each_message_whole_and_alone(
        pair: tuple[zmq.Socket, zmq.Socket], frames: list[bytes]) -> None:
    """Whatever a peer sends (empty frames, a large one, many), the ROUTER
    reads its envelope and frames, then the next message separately, as
    ``recv_multipart`` does; an empty queue is ``zmq.Again``."""
    router, dealer = pair
    dealer.send_multipart(frames)
    dealer.send_multipart([b"next"])
    _wait(router)
    first = recv_frames(router)
    assert first[1:] == frames and len(first[0]) > 0  # the peer's routing id first
    _wait(router)
    assert recv_frames(router) == [first[0], b"next"]
    with pytest.raises(zmq.Again):
        recv_frames(router)


def test_send_frames_then_recv_frames_round_trip(
        pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    """A reply through ``send_frames`` reaches the peer as one message, in order."""
    router, dealer = pair
    dealer.send(b"request")
    _wait(router)
    envelope, payload = recv_frames(router)
    assert payload == b"request"
    for reply in ([b"one"], [b"", b"two"], [b"3", b"", b"three"]):
        send_frames(router, [envelope, *reply])
        _wait(dealer)
        assert dealer.recv_multipart() == reply
