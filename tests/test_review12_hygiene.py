"""Review 12, hygiene: what goes back to a client and what reaches a scrape.

- A ROUTER endpoint (the intake, the domain-events endpoint, and the
  sharded front's two) answers a message of another shape than one request
  frame ``malformed`` and sends back none of its frames but an empty
  delimiter (docs/protocol.md §1): real DEALER and REQ sockets on 127.0.0.1.
- ``--json`` of the operator CLI prints the order view or the contract's
  reply, never the CLI's own ``request_id``: real subprocesses.
- A ``source_system`` label never carries a control character and a flood
  of distinct values adds a bounded number of series: a real scrape of
  ``/metrics``, parsed with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import free_port
from helpers import retail_order
from prometheus_client.parser import text_string_to_metric_families
from test_shards import Sharded

from actors.endpoint import FRONT_TAG_BYTES, RequestReader
from gateways.client import Client
from oms import codec

GET = codec.pack({"type": "get_order", "order_id": "O999999999999", "request_id": 7})
EVENT = codec.pack({"type": "event", "event_id": "e-1", "system": "shipping",
                    "order_id": "O999999999999", "name": "delivered"})

# (what a client sends, the frames it gets back before the reply's payload,
#  whether the reply is the request's own answer (else ``malformed``))
SHAPES: list[tuple[list[bytes], list[bytes], bool]] = [
    ([b"P"], [], True),  # a DEALER's one frame
    ([b"", b"P"], [b""], True),  # a DEALER with the REQ envelope's empty delimiter
    ([b"junk", b"", b"P"], [], False),
    ([b"junk", b"P"], [], False),
    ([b"\x00" * FRONT_TAG_BYTES, b"P"], [], False),  # a front's tag: only a shard takes it
    ([b"", b"", b"P"], [b""], False),
    ([b"", b"x", b"P"], [b""], False),
    ([b"", b"", b"", b"odd", b"P"], [b""], False),
    ([b"a", b"b", b"c", b"d", b"P"], [], False),
]


def _exchange(endpoint: str, kind: int, frames: list[bytes],
              curve: dict[str, Any] | None = None) -> list[bytes]:
    """Send one message on a new socket of ``kind`` (CURVE options
    ``curve``, if any) and return the reply's frames."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in (curve or {}).items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(15_000), f"no reply to {frames[:-1]}"
        return sock.recv_multipart()
    finally:
        sock.close()


def _check_shapes(endpoint: str, payload: bytes, answer: str) -> None:
    """Every shape of ``SHAPES`` from a DEALER, and one- and two-frame
    requests from a REQ socket, against a live endpoint."""
    for sent, head, served in SHAPES:
        frames = [payload if f == b"P" else f for f in sent]
        got = _exchange(endpoint, zmq.DEALER, frames)
        assert got[:-1] == head, (sent, got)  # nothing the client chose comes back
        reply = codec.decode_map(got[-1])
        if served:
            assert reply["type"] == answer, (sent, reply)
        else:
            assert (reply["type"], reply["code"]) == ("error", "malformed"), (sent, reply)
            assert "one frame" in reply["message"] and "request_id" not in reply
    assert codec.decode_map(_exchange(endpoint, zmq.REQ, [payload])[0])["type"] == answer
    odd = _exchange(endpoint, zmq.REQ, [b"a", payload])  # REQ adds the delimiter: 3 frames
    assert len(odd) == 1 and codec.decode_map(odd[0])["code"] == "malformed"


def test_odd_frames_are_malformed_and_never_echoed_by_the_intake_and_domain_events(
        service: Any, eps: Any, client: Client) -> None:
    _check_shapes(eps.intake, GET, "error")  # (the order does not exist: not_found)
    assert codec.decode_map(_exchange(eps.intake, zmq.DEALER, [GET])[0])["code"] == "not_found"
    _check_shapes(eps.domain_events, EVENT, "ack")
    bad = sum(not served for _, _, served in SHAPES) + 1  # + the REQ's two frames
    value = service.registry.get_sample_value
    assert value("oms_intake_requests_total", {"type": "?", "reply": "error"}) == bad
    assert value("oms_intake_errors_total", {"code": "malformed"}) == bad
    assert value("oms_domain_events_total", {"system": "invalid", "outcome": "malformed"}) == bad
    # the existing clients are untouched: the CLI's client, a REQ, the load generator's DEALER
    assert client.submit(retail_order("after-odd-frames"))["type"] == "accepted"


def test_only_a_shard_takes_the_front_tag() -> None:
    """``RequestReader`` itself: ``[tag, payload]`` is a request only with
    ``tagged`` (a shard behind the front), and only with an 8-byte tag."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        tag = (12).to_bytes(FRONT_TAG_BYTES, "big")
        for tagged, frames, payload in ((True, [tag, b"P"], b"P"), (False, [tag, b"P"], None),
                                        (True, [b"short", b"P"], None),
                                        (True, [tag, b"", b"P"], None)):
            dealer.send_multipart(frames)
            assert router.poll(10_000)
            [(envelope, frame, user)] = list(RequestReader(router, False, tagged).read(1))
            assert frame == payload and user is None
            assert envelope[1:] == ((tag,) if payload else ())
    finally:
        router.close()
        dealer.close()


@pytest.mark.slow
def test_the_sharded_front_answers_odd_frames_and_its_shards_still_serve(
        procs: Any, tmp_path: Path) -> None:
    s = Sharded(procs, tmp_path)
    with s.client(timeout=15) as client:
        client.wait_ready(30)
        accepted = client.submit(retail_order("front-odd-1"))
        assert accepted["type"] == "accepted"  # through the front's tag to a shard
        _check_shapes(s.eps.intake, GET, "error")
        _check_shapes(s.eps.domain_events, EVENT, "ack")
        view = client.get(accepted["order_id"])
        assert view["order"]["order_id"] == accepted["order_id"]


# -- 2. the CLI's --json -------------------------------------------------------------


def _oms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ), check=False)


def test_cli_json_carries_no_request_id(service: Any, eps: Any, client: Client,
                                        tmp_path: Path) -> None:
    oid = client.submit(retail_order("cli-json-1"))["order_id"]
    for argv in (["order", "show", oid], ["status", oid],
                 ["order", "show", "--source-system", "web", "--external-id", "cli-json-1"]):
        shown = _oms(*argv, "--intake", eps.intake, "--timeout", "20", "--json")
        assert shown.returncode == 0, shown
        out = json.loads(shown.stdout)
        assert "request_id" not in out and "type" not in out  # the view itself
        assert out["order_id"] == oid and {"state", "steps", "history"} <= set(out)
    missing = _oms("order", "show", "O999999999999", "--intake", eps.intake, "--json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout) == {"type": "error", "code": "not_found",
                                          "message": "no order 'O999999999999'"}
    for argv, kind in ((["order", "retry", oid], "operator_rejected"),
                       (["order", "skip", oid], "operator_rejected"),
                       (["order", "abort", oid], "operator_rejected"),
                       (["order", "cancel", "O999999999999"], "error")):
        done = _oms(*argv, "--intake", eps.intake, "--timeout", "20", "--json")
        out = json.loads(done.stdout)
        assert out["type"] == kind and "request_id" not in out, done
    order = tmp_path / "order.json"
    order.write_text(json.dumps(retail_order("cli-json-2")))
    sent = _oms("submit", str(order), "--intake", eps.intake, "--timeout", "20", "--json")
    line = json.loads(sent.stdout)
    assert line["external_id"] == "cli-json-2" and line["reply"]["type"] == "accepted"
    assert "request_id" not in line["reply"]
    for argv in (["orders"], ["fallout", "list"]):
        listed = _oms(*argv, "--intake", eps.intake, "--timeout", "20", "--json")
        assert listed.returncode == 0 and "request_id" not in listed.stdout, listed


# -- 3. metric labels from what clients send --------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as resp:
        return resp.read().decode()


def test_source_system_labels_are_printable_and_bounded(make_service: Any, sim: Any,
                                                        client: Client) -> None:
    port = free_port()
    make_service(metrics_port=port)
    hostile = ["a\x00b", "x\ry", "\x1b[2J", "tab\there", "nl\nx", "\u2028z", "\x7f",
               "ok\x85", "bidi\u202e", "", "x" * 65]
    floods = [f"bad\x01{n}" for n in range(300)] + [f"chan-{n}" for n in range(300)]
    reqs = [{"type": "submit_order", "order": {"source_system": s}}
            for s in [*hostile, 'q"\\', 7, ["web"], {"a": 1}, *floods]]
    replies = [reply for _, reply in client.pipeline(reqs, timeout=60)]
    assert len(replies) == len(reqs) and {r["type"] for r in replies} == {"rejected"}
    assert client.submit(retail_order("metrics-1", source_system="web\n"))["type"] == "accepted"
    text = _scrape(port)
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    for sample in samples:  # no label anywhere carries a control character
        for value in sample.labels.values():
            assert value.isprintable(), (sample.name, value)
    received: dict[str, float] = {}
    for sample in samples:
        if sample.name == "oms_orders_received_total":
            source = sample.labels["source_system"]
            received[source] = received.get(source, 0) + sample.value
    assert received["invalid"] == len(hostile) + 3 + 300 + 1  # the three non-strings, web\n
    assert received['q"\\'] == 1  # printable: kept, and escaped by the text format
    assert received["other"] == 300 - 99  # 100 distinct values at most, then one bucket
    assert len(received) == 1 + 1 + 99 + 1  # invalid, q"\, chan-0..98, other
