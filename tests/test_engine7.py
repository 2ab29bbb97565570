"""The engine's per-message cuts of session 7, at their edges: ``TurnBase.fill``
taking a fixed template's kept facts itself, ``advance`` asking whether all
steps are settled last step first (``StepPlan.last_first``), a definition's one
dependency's steps taken as they are (``StepPlan.launch``), and a map template
asking once per scope whether it is a map (``oms.templates._compile_map``)."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Driver, normalized, retail_order

from oms.engine import Engine, Turning, new_order
from oms.messages import CommandResult, Send, Start, Turn
from oms.process import builtin_processes, parse_process
from oms.states import ItemState, OrderState, StepStatus
from oms.templates import compile_template, order_facts, resolve

PROCS = builtin_processes()
RETAIL, TELECOM = PROCS["retail"], PROCS["telecom"]


def _scopes(order: Any) -> dict[str, Any]:
    return {"order": order_facts(order),
            "steps": {k: s.result for k, s in order.steps.items() if s.result is not None}}


def test_every_command_of_an_order_carries_what_resolve_gives_over_the_full_facts() -> None:
    """Each step's arguments, filled through the kept facts, are those the
    plain resolver gives from every fact and every result at that moment."""
    checked = []

    def domain(cmd: Send) -> CommandResult:
        if cmd.op != "notify":
            sdef = next(s for s in RETAIL.steps if s.action and s.action.op == cmd.op)
            assert sdef.action is not None
            expected = resolve(sdef.action.args, _scopes(d.order))
            assert repr(cmd.args) == repr(expected)  # the same keys in the same order
            checked.append(cmd.op)
        return CommandResult(cmd.command_id, True, {"reservation_id": "r", "invoice_id": "i",
                                                    "payment_id": "p", "shipment_id": "s"})

    d = Driver(RETAIL, retail_order(), domain)
    d.start()
    assert checked == ["reserve_stock", "create_invoice", "capture_payment", "create_shipment"]


def test_a_template_of_kept_facts_and_one_of_a_changing_fact_fill_as_resolve_does() -> None:
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    turning = Turning(Engine(RETAIL), order, 2.0)
    fixed = {"c": "$order.currency", "t": "$order.total_minor", "w": "$order"}
    partial = {"c": "$order.currency", "n": "$order.nope", "x": "$order.currency.x"}
    changing = {"c": "$order.currency", "done": "$order.completed_items",
                "sum": "$order.completed_total_minor"}
    for _ in range(2):  # nothing kept yet, then kept
        for template in (fixed, partial, changing):
            assert repr(turning.fill(template)) == repr(resolve(template, _scopes(order)))
    order.items[0]["state"] = ItemState.COMPLETED.value  # a changing fact is never kept
    filled = turning.fill(changing)
    assert [it["id"] for it in filled["done"]] == ["i1"] and filled["sum"] == 2000
    assert repr(filled) == repr(resolve(changing, _scopes(order)))
    assert repr(turning.fill(fixed)) == repr(resolve(fixed, _scopes(order)))


@pytest.mark.parametrize("scope", [None, [], [1], "text", 7, {}, {"a": None}, {"a": [1]},
                                   {"a": {"b": 2}}, {"a": "s"}])
def test_a_map_template_over_a_scope_that_is_no_map_fills_as_resolve_does(scope: Any) -> None:
    template = {"whole": "$s", "a": "$s.a", "ab": "$s.a.b", "again": "$s.a", "lit": "$",
                "other": "$t.a", "list": ["$s.a"]}
    for scopes in ({"s": scope}, {"s": scope, "t": scope}, {}):
        assert repr(compile_template(template)(scopes)) == repr(resolve(template, scopes))


_PARALLEL = """
[process]
order_type = "parallel"
[steps.first]
system = "a"
op = "first"
[steps.last]
system = "b"
op = "last"
"""


def test_an_order_completes_once_its_first_step_settles_after_its_last() -> None:
    """``all_settled`` walks the steps last first: a last step that settles
    first (no dependency) leaves the order running until the first settles."""
    proc = parse_process(_PARALLEL, "parallel.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(retail_order()), proc, 1.0)
    sent = {fx.op: fx for fx in engine.handle(order, Start(), 2.0).effects
            if isinstance(fx, Send)}
    assert set(sent) == {"first", "last"}
    engine.handle(order, CommandResult(sent["last"].command_id, True, {}), 3.0)
    assert order.state == OrderState.IN_PROGRESS
    assert order.steps["last"].status == StepStatus.DONE
    turning = engine.handle(order, CommandResult(sent["first"].command_id, True, {}), 4.0)
    assert order.state == OrderState.COMPLETED
    assert sum(1 for fx in turning.effects
               if fx.__class__.__name__ == "Publish" and fx[0].get("state") == "completed") == 1


def test_a_step_after_a_per_item_step_waits_for_every_item() -> None:
    """``create_invoice`` depends on ``provision`` (one name, its group of
    per-item steps taken as it is): sent once the last item settles, never
    before, whatever order the replies come in."""
    raw = retail_order(order_type="telecom", items=[
        {"id": f"i{n}", "action": "add", "product_id": f"p-{n}", "quantity": 1,
         "unit_price_minor": 100} for n in range(3)])
    engine = Engine(TELECOM)
    order = new_order("o-1", normalized(raw), TELECOM, 1.0)
    engine.handle(order, Start(), 2.0)  # (a sequenced order: it starts with its turn)
    sends = [fx for fx in engine.handle(order, Turn(go=True), 2.0).effects
             if isinstance(fx, Send)]
    provisions = [fx for fx in sends if fx.op == "activate_service"]
    assert len(provisions) == 3
    plan = order.plan
    groups = [list(group) for _, group, _, _ in plan.launch]
    for n, fx in enumerate(reversed(provisions)):
        turning = engine.handle(order, CommandResult(fx.command_id, True,
                                                     {"service_id": f"s{n}"}), 3.0 + n)
        invoices = [e for e in turning.effects if isinstance(e, Send)
                    and e.op == "create_invoice"]
        assert len(invoices) == (1 if n == 2 else 0)
    assert [list(group) for _, group, _, _ in plan.launch] == groups  # never changed
    assert order.steps["create_invoice"].status == StepStatus.RUNNING
