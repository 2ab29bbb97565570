"""``oms.snapshot.encode`` writes each record into its thread's own buffer
and copies it out: the bytes are msgspec's own ``encode``'s, whatever the
size, after a failure, and with several threads encoding at once."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest
from helpers import normalized, retail_order
from test_engine import RETAIL

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
    order = _order()
    record = snapshot.encode(order)
    assert type(record) is bytes
    assert record == plain(order)
    assert snapshot.encode(snapshot.decode(record)) == record


def test_a_small_record_after_a_large_one_carries_nothing_of_it() -> None:
    large, small = _order("big", items=20, note="x" * 9000), _order("small")
    big = snapshot.encode(large)
    assert snapshot.encode(small) == plain(small)
    assert len(snapshot.encode(small)) < len(big)


def test_a_record_past_the_kept_size_is_whole_and_the_buffer_is_not_kept() -> None:
    huge = _order("huge", items=5, note="y" * (snapshot.KEPT_BUFFER + 10))
    record = snapshot.encode(huge)
    assert record == plain(huge) and len(record) > snapshot.KEPT_BUFFER
    assert len(snapshot._buffer.buf) <= 4096  # a fresh one for the next record
    assert snapshot.encode(_order()) == plain(_order())


def test_an_order_that_cannot_be_encoded_raises_and_the_next_is_whole() -> None:
    bad = _order("bad")
    bad.attributes = {"when": object()}  # poison: validation never lets it in
    with pytest.raises(TypeError):
        snapshot.encode(bad)
    good = _order("good", items=3)
    assert snapshot.encode(good) == plain(good)


def test_threads_encoding_at_once_each_get_their_own_records() -> None:
    orders = [_order(f"o-{n}", items=1 + n % 7, note="z" * (n * 37)) for n in range(40)]
    want = [plain(o) for o in orders]
    start = threading.Barrier(4)
    wrong: list[Any] = []

    def work(offset: int) -> None:
        start.wait()
        for _ in range(200):
            for n in range(offset, len(orders), 4):
                if snapshot.encode(orders[n]) != want[n]:
                    wrong.append(n)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
