"""The engine's per-message cut of session 8, at its edges: ``launch_ready``
launches a one-step definition's step itself once its dependencies are
settled, without a second look over its group (``StepPlan.launch``)."""

from __future__ import annotations

from helpers import normalized, retail_order

from oms.engine import Engine, new_order
from oms.messages import CommandResult, Operate, Send, Start
from oms.process import parse_process
from oms.states import OrderState, StepStatus

_MIXED = """
[process]
order_type = "mixed"
failure_policy = "hold"
[steps.first]
system = "a"
op = "first"
[steps.items]
after = ["first"]
[steps.items.per_item.add]
system = "b"
op = "item"
[steps.middle]
after = ["first"]
system = "c"
op = "middle"
[steps.last]
after = ["items", "middle"]
system = "d"
op = "last"
"""


def _order(n_items: int) -> dict:
    return retail_order(items=[
        {"id": f"i{n}", "action": "add", "product_id": f"p-{n}", "quantity": 1,
         "unit_price_minor": 100} for n in range(n_items)])


def _sends(turning) -> list[Send]:  # type: ignore[no-untyped-def]
    return [fx for fx in turning.effects if isinstance(fx, Send)]


def test_one_step_and_per_item_definitions_launch_once_in_definition_order() -> None:
    """After ``first``: every item's step, then ``middle`` (definition order,
    one command each); ``last`` only once both groups settled, once."""
    proc = parse_process(_MIXED, "mixed.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(_order(2)), proc, 1.0)
    first = _sends(engine.handle(order, Start(), 2.0))
    assert [fx.op for fx in first] == ["first"]
    after = _sends(engine.handle(order, CommandResult(first[0].command_id, True, {}), 3.0))
    assert [fx.op for fx in after] == ["item", "item", "middle"]
    for n, fx in enumerate(after):
        sends = _sends(engine.handle(order, CommandResult(fx.command_id, True, {}), 4.0 + n))
        assert [s.op for s in sends] == (["last"] if n == 2 else [])
    assert order.steps["last"].status == StepStatus.RUNNING
    assert [s.attempts for s in order.steps.values()] == [1, 1, 1, 1, 1]


def test_a_retried_one_step_definition_is_launched_once_again() -> None:
    """An operator's retry makes the failed step pending and launches it at
    once; the ``advance`` after it finds it running and sends nothing more."""
    proc = parse_process(_MIXED, "mixed.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(_order(1)), proc, 1.0)
    first = _sends(engine.handle(order, Start(), 2.0))
    after = _sends(engine.handle(order, CommandResult(first[0].command_id, True, {}), 3.0))
    middle = next(fx for fx in after if fx.op == "middle")
    from oms.errors import DomainError
    engine.handle(order, CommandResult(middle.command_id, False, None,
                                       DomainError("nope", "refused", False)), 4.0)
    assert order.state == OrderState.HELD
    assert order.steps["middle"].status == StepStatus.FAILED
    retried = _sends(engine.handle(order, Operate("retry", None, "ann", "r", None), 5.0))
    assert [fx.op for fx in retried] == ["middle"]
    assert retried[0].command_id.endswith("#1")
    item = next(fx for fx in after if fx.op == "item")
    engine.handle(order, CommandResult(item.command_id, True, {}), 6.0)
    last = _sends(engine.handle(order, CommandResult(retried[0].command_id, True, {}), 7.0))
    assert [fx.op for fx in last] == ["last"]
