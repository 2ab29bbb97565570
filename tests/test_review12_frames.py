"""Session 12 review of the ROUTER framing rule (``actors.endpoint.read_requests``)
with CURVE on: the intake and the domain-events endpoint read each message
with its ``User-Id`` (``recv_parts``), a path ``test_review12_hygiene``
does not take. Every odd shape is answered ``malformed`` with none of the
sender's frames, and an authenticated client's one-frame and REQ requests
are still served as its identity allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq
from test_review12_hygiene import EVENT, GET, SHAPES
from test_security import keys, opts, secure  # noqa: F401 - fixtures

from oms import codec


def exchange(endpoint: str, kind: int, frames: list[bytes], curve: dict[str, Any]) -> list[bytes]:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in curve.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(15_000), f"no reply to {frames[:-1]}"
        return sock.recv_multipart()
    finally:
        sock.close()


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
