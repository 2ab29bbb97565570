"""Stored orders loaded under a changed process definition (issue 12,
defect 18): removing ``expected_s``, removing or renaming a step, removing a
per-item action. Old snapshots load and either go on or go to fallout with a
clear reason; nothing raises."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from helpers import Driver, ok_domain, retail_order
from test_engine import BACKORDERED, RETAIL, TELECOM, TELECOM_ORDER, _retail_text

from oms import snapshot
from oms.engine import Engine
from oms.messages import Operate, Publish, Reply, Resume, Start
from oms.process import ProcessDef, parse_process
from oms.states import OrderState, StepStatus

S = OrderState


def without(proc: ProcessDef, name: str) -> ProcessDef:
    gone = proc.step(name)
    steps = tuple(dataclasses.replace(s, after=tuple(
        a for d in s.after for a in ((d,) if d != name else gone.after)))
        for s in proc.steps if s.name != name)
    ponr = None if proc.point_of_no_return == name else proc.point_of_no_return
    return dataclasses.replace(proc, steps=steps, point_of_no_return=ponr)


def renamed(proc: ProcessDef, name: str, new: str) -> ProcessDef:
    steps = tuple(dataclasses.replace(s, name=new if s.name == name else s.name,
                                      after=tuple(new if a == name else a for a in s.after))
                  for s in proc.steps)
    ponr = new if proc.point_of_no_return == name else proc.point_of_no_return
    return dataclasses.replace(proc, steps=steps, point_of_no_return=ponr)


def reload(d: Driver, proc: ProcessDef) -> Driver:
    """The snapshot as stored, now run by ``proc`` (a restart after the change)."""
    d.order = snapshot.decode(snapshot.encode(d.order))
    d.engine = Engine(proc)
    return d


def replies(d: Driver) -> list[dict[str, Any]]:
    return [fx.payload for fx in d.effects if isinstance(fx, Reply)]


def test_removing_expected_s_drops_the_deadlines_without_a_crash() -> None:
    text = _retail_text().replace("[steps.await_delivery]",
                                  "[steps.await_delivery]\nexpected_s = 3600").replace(
        'failure_policy = "compensate"', 'failure_policy = "compensate"\nexpected_s = 60')
    d = Driver(parse_process(text, "a.toml"), retail_order(), ok_domain())
    d.start()
    assert set(d.order.jeopardy) == {"order", "await_delivery"}
    reload(d, RETAIL)
    d.feed(Resume())
    d.fire_timers()  # the deadlines armed under the old definition come due
    assert not [fx for fx in d.effects if isinstance(fx, Publish)
                and fx.payload["type"] == "order_jeopardy"]
    d.event("shipment_delivered", {})
    assert d.order.state == S.COMPLETED


@pytest.mark.parametrize("change", ["removed", "renamed"])
def test_a_step_removed_or_renamed_before_it_ran_goes_to_fallout_then_on(change: str) -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"capture_payment": None}))
    d.start()  # capture_payment in flight; create_shipment still to run
    new = (without(RETAIL, "create_shipment") if change == "removed"
           else renamed(RETAIL, "create_shipment", "ship"))
    reload(d, new)
    d.domain = ok_domain()
    d.feed(Resume())  # re-sends capture_payment; its reply comes back
    assert (d.order.state, d.order.state_reason) == (S.HELD, "fallout")
    assert "ship" not in d.order.steps
    block = d.order.view(new.point_of_no_return)["fallout"]
    assert block["step"] == "create_shipment"
    assert block["error"]["code"] == "definition_changed"
    assert "retry" not in block["actions"] and "skip" in block["actions"]
    assert "create_shipment" not in [s.op for s in d.sent]  # never sent blind
    d.feed(Operate("retry", None, "ann", None, "r"))
    assert "not in the current process definition" in replies(d)[-1]["reason"]
    d.feed(Operate("skip", None, "ann", "shipped by hand", "r"))
    assert replies(d)[-1]["type"] == "operator_accepted"
    d.feed(Operate("skip", "await_delivery", "ann", "delivered", "r"))
    if d.order.state != S.COMPLETED:
        d.event("shipment_delivered", {})
    assert d.order.state == S.COMPLETED


def test_an_applied_step_no_longer_defined_cannot_be_undone_blindly() -> None:
    proc = parse_process(_retail_text().replace('failure_policy = "compensate"',
                                                'failure_policy = "hold"'), "hold.toml")
    d = Driver(proc, retail_order(), ok_domain({"create_shipment": None}))
    d.start()
    reload(d, without(proc, "capture_payment"))
    d.domain = ok_domain()
    d.feed(Operate("abort", None, "ann", "customer left", "r"))
    d.feed(Resume())  # the shipment in flight gets its answer: then undo in reverse
    assert "cancel_shipment" in [s.op for s in d.sent]
    assert (d.order.state, d.order.state_reason) == (S.HELD, "fallout")
    assert d.order.failure["compensation"]
    assert d.order.failure["step"] == "capture_payment"
    assert "refund_payment" not in [s.op for s in d.sent]
    assert "retry" not in d.order.view()["fallout"]["actions"]
    d.feed(Operate("skip", None, "ann", "refunded by hand", "r"))
    assert d.order.state == S.FAILED
    assert [s.op for s in d.sent if s.system != "crm"][-2:] == ["void_invoice",
                                                                 "release_stock"]


def test_a_running_step_that_was_removed_finishes_from_its_snapshot() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"create_invoice": None}))
    d.start()
    reload(d, without(RETAIL, "create_invoice"))
    d.domain = ok_domain()
    d.feed(Resume())  # re-sent with its stored arguments, default timeout
    assert [s.op for s in d.sent].count("create_invoice") == 2
    assert d.order.steps["create_invoice"].status == StepStatus.DONE
    d.event("shipment_delivered", {})
    assert d.order.state == S.COMPLETED


def test_a_removed_per_item_action_holds_a_not_yet_started_order() -> None:
    d = Driver(TELECOM, TELECOM_ORDER, ok_domain())
    per_item = dict(TELECOM.step("provision").per_item or {})
    del per_item["delete"]
    steps = tuple(dataclasses.replace(s, per_item=per_item) if s.name == "provision" else s
                  for s in TELECOM.steps)
    reload(d, dataclasses.replace(TELECOM, steps=steps))
    d.start()
    assert (d.order.state, d.order.state_reason) == (S.HELD, "fallout")
    assert d.order.failure["step"] == "provision[d]"
    assert "deactivate_service" not in [s.op for s in d.sent]


MUTATIONS = {
    "no-expected": lambda p: dataclasses.replace(p, expected_s=None),
    **{f"without-{n}": (lambda p, n=n: without(p, n)) for n in
       ("reserve_stock", "create_invoice", "capture_payment", "create_shipment",
        "await_delivery")},
    **{f"renamed-{n}": (lambda p, n=n: renamed(p, n, n + "_v2")) for n in
       ("reserve_stock", "capture_payment", "await_delivery")},
}
STOPS = ["reserve_stock", "create_invoice", "capture_payment", "create_shipment", None]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_no_stored_order_crashes_under_any_changed_definition(mutation: str) -> None:
    base = parse_process(_retail_text().replace("[steps.await_delivery]",
                                                "[steps.await_delivery]\nexpected_s = 60"),
                         "base.toml")
    for stop in STOPS:
        for operator in ("skip", "abort"):
            d = Driver(base, retail_order(), ok_domain({stop: None} if stop else {}))
            d.start()
            reload(d, MUTATIONS[mutation](base))
            d.domain = ok_domain()
            d.feed(Resume())
            d.fire_timers()
            for _ in range(6):
                if d.order.state == S.HELD:
                    d.feed(Operate(operator, None, "ann", None, "r"))
                waits = [s.key for s in d.order.steps.values() if s.wait]
                for key in waits:
                    d.feed(Operate("skip", key, "ann", None, "r"))
                d.fire_timers()
            assert d.order.state.terminal or d.order.state == S.HELD, (stop, d.order.state)
            if d.order.state == S.HELD:
                assert d.order.view()["fallout"]["hint"]


def test_an_order_not_started_under_the_old_definition_starts_under_the_new() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain())
    reload(d, renamed(RETAIL, "await_delivery", "await_delivery_v2"))
    d.feed(Start())
    assert (d.order.state, d.order.failure["error"]["code"]) == (S.HELD, "definition_changed")


def test_a_hold_whose_definition_lost_hold_when_still_ends_with_its_event() -> None:
    d = Driver(RETAIL, retail_order(),
               ok_domain({"reserve_stock": BACKORDERED}))
    d.start()
    assert d.order.state_reason == "awaiting_stock"
    steps = tuple(dataclasses.replace(s, hold=None) if s.name == "reserve_stock" else s
                  for s in RETAIL.steps)
    reload(d, dataclasses.replace(RETAIL, steps=steps))
    d.feed(Resume())
    d.event("stock_reserved", {}, system="billing")  # still only from the warehouse
    assert d.order.state == S.HELD
    d.event("stock_reserved", {}, system="warehouse")
    assert d.order.state == S.IN_PROGRESS and "create_invoice" in [s.op for s in d.sent]
