"""The sockets' helpers of the loop actors: a socket opened with its options,
and pyzmq's Cython send and receive called directly on the hot paths."""

from __future__ import annotations

from collections.abc import Iterable

import zmq
import zmq.backend

Buffer = bytes | bytearray  # a frame to send (a copying send)


def open_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None,
                connect: str | None = None, **options: int) -> zmq.Socket:
    """A socket with options set (``SNDHWM=...``), bound or connected; closed
    again if that fails, so a failed start leaves nothing open."""
    sock = ctx.socket(kind)
    try:
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
    except BaseException:
        sock.close(0)
        raise
    return sock


# pyzmq's ``Socket.send``, ``send_multipart`` and ``recv_multipart`` are Python
# wrappers (routing ids, groups, type checks, enum flags) around its Cython
# calls: 0.2 µs a frame sent, 1.4 µs a multipart reply, 0.3 µs a multipart
# request. The hot paths (13 events, 5 commands and a few requests and replies
# an order) call the Cython ones directly, with plain int flags.
NOBLOCK = int(zmq.NOBLOCK)
MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
send_frame = zmq.backend.Socket.send  # send_frame(sock, frame, NOBLOCK or MORE)
# recv_frame(sock, NOBLOCK): one frame, as bytes (the gateways' replies, 6 an order), or
# recv_frame(sock, NOBLOCK, False): as a ``Frame``, whose ``more`` pyzmq reads in C (asking
# the socket, ``get(RCVMORE)``, costs 0.6 us a frame in Python: more than the ``Frame``
# and its copy together), and its properties (a CURVE peer's ``User-Id``); the ROUTER
# endpoints' read (``actors.endpoint.RequestReader``); ``sock.recv`` is found past
# pyzmq's ``__getattr__`` on each call (not specialised)
recv_frame = zmq.backend.Socket.recv


def send_frames(sock: zmq.Socket, head: Iterable[Buffer], last: Buffer) -> None:
    """``sock.send_multipart([*head, last], flags=zmq.NOBLOCK)``, without its
    wrapper (nor the list): a reply's envelope, then its payload."""
    for frame in head:
        send_frame(sock, frame, MORE)
    send_frame(sock, last, NOBLOCK)
