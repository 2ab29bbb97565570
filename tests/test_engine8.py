"""The engine's per-message cuts of session 8, at their edges: ``launch_ready``
launches a one-step definition's step itself once its dependencies are
settled, without a second look over its group (``StepPlan.launch``), and
``Engine.handle`` dispatches a message itself (no ``Turning.handle``)."""

from __future__ import annotations

from typing import Any

from helpers import normalized, retail_order

from oms.engine import Engine, Turning, new_order
from oms.errors import DomainError
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


def _order(n_items: int) -> dict[str, Any]:
    return retail_order(items=[
        {"id": f"i{n}", "action": "add", "product_id": f"p-{n}", "quantity": 1,
         "unit_price_minor": 100} for n in range(n_items)])


def _sends(turning: Turning) -> list[Send]:
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


def test_a_message_of_no_known_kind_is_refused_and_changes_nothing() -> None:
    """Poison: anything but the engine's messages raises ``TypeError`` (the
    actor's failure rule takes it), before the order's version moves."""
    proc = parse_process(_MIXED, "mixed.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(_order(1)), proc, 1.0)
    engine.handle(order, Start(), 2.0)
    version, updated = order.version, order.updated_ts
    for poison in (None, "start", ("c", True, {}, None, True), {"command_id": "x"}):
        try:
            engine.handle(order, poison, 3.0)
        except TypeError as exc:
            assert "cannot handle" in str(exc)
        else:
            raise AssertionError(f"{poison!r} was taken")
    assert (order.version, order.updated_ts) == (version, updated)


def test_a_stale_reply_leaves_version_and_time_alone_and_a_fresh_one_moves_both() -> None:
    """The version and ``updated_ts`` move exactly when the message changed
    the order, once a message."""
    proc = parse_process(_MIXED, "mixed.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(_order(1)), proc, 1.0)
    first = _sends(engine.handle(order, Start(), 2.0))
    version = order.version
    stale = engine.handle(order, CommandResult("o-1:nope", True, {}), 3.0)
    assert stale.stale and not stale.changed
    assert (order.version, order.updated_ts) == (version, 2.0)
    fresh = engine.handle(order, CommandResult(first[0].command_id, True, {}), 4.0)
    assert fresh.changed and not fresh.stale
    assert (order.version, order.updated_ts) == (version + 1, 4.0)
    again = engine.handle(order, CommandResult(first[0].command_id, True, {}), 5.0)
    assert again.stale and (order.version, order.updated_ts) == (version + 1, 4.0)
