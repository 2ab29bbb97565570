"""Writes ``snapshot_v1.msgpack``: real version 1 snapshot records, made by
the release that wrote them (commit 3deeec3, the last to write version 1),
for ``tests/test_record_v2.py``. Not a test, and not runnable against this
release (it needs ``Order.to_record``)::

    git archive 3deeec3 | tar -x -C /tmp/v1
    PYTHONPATH=/tmp/v1:/tmp/v1/tests python tests/data/make_snapshot_v1.py OUT

Each entry: the record's bytes as that release stored them
(``codec.pack(order.to_record())``) and what that release said of the order
(its ``get_order`` view, ``finished``, recovery's ``needs_resume``).
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack
from helpers import Driver, normalized, ok_domain, retail_order
from test_engine import (
    BACKORDERED,
    DECLINED,
    RETAIL,
    TELECOM,
    TELECOM_ORDER,
    UNAVAILABLE,
    UNKNOWN_SERVICE,
    _retail_text,
    fallout_driver,
    operate,
)

from app.recovery import needs_resume
from oms import codec
from oms.engine import new_order
from oms.messages import Cancel, CommandResult
from oms.process import parse_process
from storage.records import format_order_id


def named(d: Driver, seq: int, raw: dict[str, Any]) -> Driver:
    """The driver's order under a store's id (``O000000000001`` ...)."""
    d.order = new_order(format_order_id(seq), normalized(raw), d.engine.proc, now=1000.0)
    return d


def completed() -> Driver:
    d = named(Driver(RETAIL, retail_order("v1-done"), ok_domain()), 1, retail_order("v1-done"))
    d.start()
    d.event("shipment_delivered", {"shipment_id": "s"})
    return d


def waiting_with_jeopardy() -> Driver:
    text = _retail_text().replace("[steps.await_delivery]",
                                  "[steps.await_delivery]\nexpected_s = 3600")
    d = Driver(parse_process(text, "jeopardy.toml"), retail_order("v1-wait"), ok_domain())
    named(d, 2, retail_order("v1-wait"))
    d.start()
    return d


def backing_off() -> Driver:
    d = Driver(RETAIL, retail_order("v1-retry"), ok_domain({"create_invoice": UNAVAILABLE}))
    named(d, 3, retail_order("v1-retry"))
    d.start()
    return d


def backordered_with_early_event() -> Driver:
    d = Driver(RETAIL, retail_order("v1-stock"), ok_domain({"reserve_stock": BACKORDERED}))
    named(d, 4, retail_order("v1-stock"))
    d.start()
    d.event("shipment_delivered", {"shipment_id": "early"})
    return d


def aborting() -> Driver:
    d = named(fallout_driver({"capture_payment": DECLINED, "void_invoice": None}), 5,
              retail_order("v1-abort"))
    d.start()
    operate(d, "abort")
    return d


def cancelled() -> Driver:
    d = Driver(RETAIL, retail_order("v1-cancel"), ok_domain({"capture_payment": None}))
    named(d, 6, retail_order("v1-cancel"))
    d.start()
    d.feed(Cancel("changed my mind", reply_to="r"))
    cid = next(s.command_id for s in d.sent if s.op == "capture_payment")
    d.feed(CommandResult(cid, True, {"payment_id": "pay-1"}))
    return d


def telecom_partial() -> Driver:
    d = Driver(TELECOM, TELECOM_ORDER, ok_domain({"modify_service": UNKNOWN_SERVICE}))
    named(d, 7, TELECOM_ORDER)
    d.start()
    return d


def main(out: str) -> None:
    entries: dict[str, Any] = {}
    for make in (completed, waiting_with_jeopardy, backing_off, backordered_with_early_event,
                 aborting, cancelled, telecom_partial):
        order = make().order
        rec = order.to_record()
        entries[make.__name__] = {
            "record": codec.pack(rec), "view": order.view(), "state": str(order.state),
            "finished": order.finished, "needs_resume": needs_resume(rec)}
    with open(out, "wb") as f:
        f.write(msgpack.packb(entries, use_bin_type=True))


if __name__ == "__main__":
    main(sys.argv[1])
