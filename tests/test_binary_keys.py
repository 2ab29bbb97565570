"""docs/protocol.md, "Encoding and transport": a payload is a map with
string keys. A msgpack map with a binary (bin) key, anywhere in a request,
is `malformed`, and the reply names where without a Python repr: 1.4 took
one at the top and ignored it, and inside an `order` answered `rejected`
with the field ``b'colour'``. Real sockets, a real service (one node, and
two shards behind a front)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import retail_order
from test_shards import Sharded

from gateways.client import Client
from oms import codec


def frames() -> list[tuple[bytes, str]]:
    """(a request with a bin key, where the reply must say it is)."""
    order = retail_order("bin-keys")
    return [
        (msgpack.packb({"type": "order_counts", b"colour": 1}), "colour"),
        (msgpack.packb({"type": "list_orders", "limit": 1, b"\xffx": 1}), "\\xffx"),
        (msgpack.packb({"type": "submit_order", "order": {**order, b"colour": "red"}}),
         "order.colour"),
        (msgpack.packb({"type": "submit_order", "order": {**order, "items": [
            {**order["items"][0], "attributes": {"a": [{b"k": 1}]}}]}}),
         "order.items[0].attributes.a[0].k"),
    ]


def assert_malformed(client: Client, frame: bytes, where: str) -> None:
    reply = client.send_raw(frame)
    assert (reply["type"], reply["code"]) == ("error", "malformed"), reply
    assert where in reply["message"] and "b'" not in reply["message"], reply
    assert "binary" in reply["message"], reply


def test_binary_keys_are_malformed_and_named_without_a_repr(service: Any,
                                                             client: Client) -> None:
    for frame, where in frames():
        assert_malformed(client, frame, where)
    # the same requests with string keys are served as ever
    assert client.request({"type": "order_counts", "colour": 1})["type"] == "order_counts"
    assert client.submit(retail_order("bin-keys"))["type"] == "accepted"


def test_binary_keys_deeper_than_the_typed_read_are_found_too(service: Any,
                                                               client: Client) -> None:
    """msgpack reads what msgspec's typed read does not (deeper than
    ``codec.PLAIN_DEPTH``, bin values): the walk finds the key there too."""
    deep: Any = {b"k": 1}
    for _ in range(codec.PLAIN_DEPTH + 2):
        deep = {"d": deep}
    frame = msgpack.packb({"type": "order_counts", "x": deep, "v": b"bin value"})
    assert_malformed(client, frame, "x." + "d." * (codec.PLAIN_DEPTH + 2) + "k")
    assert client.send_raw(msgpack.packb({"type": "order_counts", "v": b"bin value"}))[
        "type"] == "order_counts"  # a bin value (not a key) outside the order: ignored


@pytest.mark.slow
def test_a_sharded_front_answers_them_malformed_as_well(procs: Any, tmp_path: Path) -> None:
    s = Sharded(procs, tmp_path)
    with s.client(timeout=10) as client:
        client.wait_ready(20)
        for frame, where in frames():
            assert_malformed(client, frame, where)
        assert client.submit(retail_order("bin-keys"))["type"] == "accepted"
