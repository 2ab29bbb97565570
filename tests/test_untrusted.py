"""What domain systems send, as the engine keeps it (pure engine).

Issue 12 defect 11 (a wait or hold names the system it waits on), defect 13
(bytes kept per order), defect 4/19's engine side (no NaN, no non-map data
ever becomes state).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from helpers import Driver, ok_domain, retail_order
from test_engine import BACKORDERED, RETAIL, _retail_text

from oms import codec, edge, snapshot, untrusted
from oms.engine import MAX_EARLY_BYTES, MAX_EARLY_EVENTS, Engine
from oms.errors import DomainError
from oms.messages import CommandResult, DomainEvent, Timer
from oms.process import ProcessError, parse_process
from oms.states import OrderState, StepStatus
from oms.untrusted import MAX_DATA_BYTES

S = OrderState


def _finite_everywhere(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_everywhere(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_everywhere(v) for v in value)
    return True


def _stored(d: Driver) -> Any:
    return codec.unpack(snapshot.encode(d.order))


# -- a wait or hold names its system (defect 11) ----------------------------

def test_stock_hold_is_released_only_by_the_warehouse() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"reserve_stock": BACKORDERED}))
    d.start()
    assert d.order.state_reason == "awaiting_stock"
    for system in ("billing", "web", "warehouse2", "shipping"):
        turning = Engine(RETAIL).handle(
            d.order, DomainEvent("e1", system, "stock_reserved", {}), d.now)
        assert turning.stale and not turning.changed and not turning.effects
    assert (d.order.state, d.order.early_events) == (S.HELD, [])
    d.event("stock_reserved", {"reservation_id": "r-9"}, system="warehouse")
    assert d.order.state == S.IN_PROGRESS and "create_invoice" in d.ops()


def test_an_early_event_from_the_wrong_system_is_not_kept() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": None}))
    d.start()
    d.event("shipment_delivered", {}, system="warehouse")  # a forgery: not kept
    d.event("nobody_waits_for_this", {}, system="shipping")
    assert d.order.early_events == []
    d.event("shipment_delivered", {"by": "shipping"}, system="shipping")  # kept
    assert [e["system"] for e in d.order.early_events] == ["shipping"]


def test_a_wait_must_name_its_system_and_a_hold_may_name_another() -> None:
    text = _retail_text()
    with pytest.raises(ProcessError, match=r"await_delivery\.wait_event\.system: required"):
        parse_process(text.replace(', system = "shipping" }', " }"), "nosys.toml")
    hold = 'match = "reservation_id" }'
    assert hold in text
    proc = parse_process(text.replace(hold, hold[:-1] + ', system = "supplier" }'),
                         "supplier.toml")
    assert proc.step("reserve_stock").hold.system == "supplier"
    d = Driver(proc, retail_order(), ok_domain({"reserve_stock": BACKORDERED}))
    d.start()
    d.event("stock_reserved", {}, system="warehouse")
    assert d.order.state == S.HELD
    d.event("stock_reserved", {}, system="supplier")
    assert d.order.state == S.IN_PROGRESS


# -- bytes kept per order (defect 13) ----------------------------------------

def test_early_events_are_bounded_by_count_and_bytes() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": None}))
    d.start()
    big = {"blob": "x" * (MAX_DATA_BYTES - 100)}
    for i in range(40):
        d.feed(DomainEvent(f"e{i}", "shipping", "shipment_delivered", dict(big, n=i)))
    kept = d.order.early_events
    assert 0 < len(kept) <= MAX_EARLY_EVENTS
    assert sum(len(codec.pack(e)) for e in kept) <= MAX_EARLY_BYTES
    assert kept[-1]["data"]["n"] == 39  # the oldest are dropped
    assert len(snapshot.encode(d.order)) < MAX_EARLY_BYTES + 16 * 1024
    for i in range(40):  # many small ones: bounded by count
        d.feed(DomainEvent(f"s{i}", "shipping", "shipment_delivered", {"n": i}))
    assert len(d.order.early_events) == MAX_EARLY_EVENTS


def test_event_data_over_the_limit_or_with_nan_is_not_kept_but_the_event_counts() -> None:
    for data in ({"blob": "x" * (MAX_DATA_BYTES + 1)}, {"when": float("nan")},
                 {"a": [{"b": float("-inf")}]}):
        d = Driver(RETAIL, retail_order(), ok_domain())
        d.start()
        d.event("shipment_delivered", data)
        assert d.order.state == S.COMPLETED
        result = d.order.steps["await_delivery"].result
        assert list(result) == ["dropped"]
        assert _finite_everywhere(_stored(d))
        assert len(snapshot.encode(d.order)) < 32 * 1024


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# -- numbers and maps in replies (defects 4 and 19, engine side) ------------

@pytest.mark.parametrize("data", [{"invoice_id": float("nan")}, ["not", "a", "map"], "x",
                                  {"deep": _nested(20)},
                                  {"blob": "x" * (MAX_DATA_BYTES + 1)}])
def test_a_bad_reply_is_a_retryable_error_and_never_state(data: Any) -> None:
    res = CommandResult("", True, data)
    assert res.data_fit is False  # only a gateway vouches for data (edge.fit_to_keep)
    d = Driver(RETAIL, retail_order(), ok_domain({"create_invoice": res}))
    d.start()
    step = d.order.steps["create_invoice"]
    assert step.error["code"] == "invalid_reply" and step.error["retryable"]
    assert step.result is None and step.retry_at is not None
    d.fire_timers()  # every attempt gets the same bad reply
    assert d.order.state == S.FAILED
    assert _finite_everywhere(_stored(d))
    assert d.order.steps["create_invoice"].status == StepStatus.FAILED


@pytest.mark.parametrize("after", [float("nan"), float("inf"), float("-inf"), -5, "10",
                                   True, None, 10**400, [1], 1e300])
def test_retry_after_from_a_breaker_cannot_poison_the_timers(after: Any) -> None:
    reply = CommandResult("", False, {"retry_after": after},
                          DomainError("circuit_open", "open", True))
    d = Driver(RETAIL, retail_order(), ok_domain({"create_invoice": reply}))
    d.start()
    step = d.order.steps["create_invoice"]
    assert step.retry_at is not None and math.isfinite(step.retry_at)
    assert d.now - 1 < step.retry_at < d.now + 60 * 1.2 + 1
    timers = [fx for fx in d.effects if isinstance(fx, Timer)]
    assert all(math.isfinite(t.at) for t in timers)
    assert _finite_everywhere(_stored(d))


def test_an_empty_data_map_is_fit_and_a_missing_or_empty_non_map_is_not() -> None:
    # the empty map takes a path of its own in both checks
    assert untrusted.data_problem({}) is None
    for odd in ([], (), "", 0, None, False):
        assert untrusted.data_problem(odd) is not None
    reply = {"type": "result", "command_id": "O1:create_invoice", "ok": True}
    assert edge.parse_reply({**reply, "data": {}}) == edge.Reply("O1:create_invoice", True, {},
                                                                 None)
    for odd in (None, [], "", 0):
        assert isinstance(edge.parse_reply({**reply, "data": odd}), edge.Violation)
    assert isinstance(edge.parse_reply(reply), edge.Violation)  # an ok reply without data


def _walked(data: Any) -> str | None:
    """``data_problem`` as it was, every map walked by ``_scan``."""
    if not isinstance(data, dict):
        return f"data must be a map, got {type(data).__name__}"
    if not data:
        return None
    problem, bound = untrusted._scan(data)
    if problem:
        return f"data {problem}"
    if bound <= MAX_DATA_BYTES:
        return None
    try:
        size = len(codec.pack(data))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"data cannot be encoded: {exc}"
    return f"data is {size} bytes, over the {MAX_DATA_BYTES}-byte limit" if (
        size > MAX_DATA_BYTES) else None


def _near_the_limit(n: int) -> list[dict[Any, Any]]:
    return [{"a": "x" * n}, {"a": "é" * n}, {f"k{i}": "v" * (n // 8) for i in range(8)},
            {"a": "x" * n, "b": 1}, {"a": "x" * n, b"k": "y"}, {"a": "x" * n, "n": math.nan}]


@pytest.mark.parametrize("data", [
    {"reservation_id": "res-1", "status": "reserved"}, {"a": ""}, {"": "x"}, {1: "x"},
    {b"k": "v"}, {"a": "b", "c": None}, {"a": "b", "c": math.inf}, {"a": "b", "c": [1.5]},
    {"a": "b", "c": {"d": "e"}}, {"a": True}, {"a": b"bytes"},
    *(_near_the_limit(n) for n in (4090, 4094, 4095, 4096, 5000, 9000, 16377, 16378, 16379, 16380,
                                   16400)),
])
def test_data_problem_answers_as_the_walk(data: Any) -> None:
    """A map of strings takes a path of its own (no walk): same answers, also
    about the byte limit, where its bound is loose and the encoding decides."""
    cases = data if isinstance(data, list) else [data]
    for case in cases:
        assert untrusted.data_problem(case) == _walked(case)
