"""``oms.snapshot.encode_in`` writes a record into a buffer its caller
reuses (the order actors' saves: their thread's, ``actors.order``) and
copies it out: the bytes are ``encode``'s, whatever the size, after a
failure, and with several threads encoding at once."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest
from helpers import normalized, retail_order
from test_engine import RETAIL

from actors.order import _records
from oms import snapshot
from oms.engine import new_order
from oms.model import Order

plain = msgspec.msgpack.Encoder().encode


def _order(oid: str = "o-1", items: int = 2, note: str = "") -> Order:
    raw = retail_order(oid, items=[{"id": f"i{n}", "product_id": f"p-{n}", "quantity": 1,
                                     "unit_price_minor": 100 + n} for n in range(items)])
    order = new_order(oid, normalized(raw), RETAIL, now=1000.0)
    if note:  # past what validation lets in: the buffer's sizes, not the contract's
        order.attributes = {"note": note}
    return order


def test_a_record_is_msgspecs_own_bytes_and_decodes_back() -> None:
    order, buf = _order(), bytearray(16)
    record = snapshot.encode_in(order, buf)
    assert type(record) is bytes
    assert record == plain(order) == snapshot.encode(order)
    assert snapshot.encode_in(snapshot.decode(record), buf) == record


def test_a_small_record_after_a_large_one_carries_nothing_of_it() -> None:
    large, small, buf = _order("big", items=20, note="x" * 9000), _order("small"), bytearray()
    big = snapshot.encode_in(large, buf)
    assert snapshot.encode_in(small, buf) == plain(small)
    assert len(snapshot.encode_in(small, buf)) < len(big)


def test_a_record_past_the_kept_size_is_whole_and_the_buffer_let_go() -> None:
    huge, buf = _order("huge", items=5, note="y" * (snapshot.KEPT_BUFFER + 10)), bytearray()
    record = snapshot.encode_in(huge, buf)
    assert record == plain(huge) and len(record) > snapshot.KEPT_BUFFER
    assert len(buf) <= 4096  # not kept at that size
    assert snapshot.encode_in(_order(), buf) == plain(_order())


def test_an_order_that_cannot_be_encoded_raises_and_the_next_is_whole() -> None:
    bad, buf = _order("bad"), bytearray()
    snapshot.encode_in(_order("first", items=9), buf)
    bad.attributes = {"when": object()}  # poison: validation never lets it in
    with pytest.raises(TypeError):
        snapshot.encode_in(bad, buf)
    good = _order("good", items=3)
    assert snapshot.encode_in(good, buf) == plain(good)


def test_threads_encoding_at_once_each_get_their_own_records() -> None:
    orders = [_order(f"o-{n}", items=1 + n % 7, note="z" * (n * 37)) for n in range(40)]
    want = [plain(o) for o in orders]
    start = threading.Barrier(4)
    wrong: list[Any] = []

    buffers: list[int] = []
    mine = _records.buf  # the main thread's, alive throughout

    def work(offset: int) -> None:
        buf = _records.buf  # this thread's own (the order actors' saves use it)
        buffers.append(id(buf))
        start.wait()
        for _ in range(200):
            for n in range(offset, len(orders), 4):
                if snapshot.encode_in(orders[n], buf) != want[n]:
                    wrong.append(n)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert len(set(buffers)) == 4 and id(mine) not in buffers
