"""The one transition table."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from oms.model import Order, Step
from oms.states import (
    ITEM_MOVES,
    PHASE_MOVES,
    STEP_MOVES,
    TERMINAL,
    TRANSITIONS,
    UNDO_MOVES,
    Ev,
    IllegalTransition,
    ItemState,
    OrderState,
    Phase,
    Reason,
    StepStatus,
    Target,
    Undo,
    mermaid,
    next_state,
    set_item_state,
    set_phase,
    set_reason,
    set_step_status,
    set_undo,
    states_page,
)


def test_terminal_states_have_no_way_out() -> None:
    for (state, _event) in TRANSITIONS:
        assert state not in TERMINAL


@pytest.mark.parametrize("state", sorted(TERMINAL))
@pytest.mark.parametrize("event", list(Ev))
def test_illegal_transitions_raise(state: OrderState, event: Ev) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_every_state_is_reachable_from_acknowledged() -> None:
    seen, frontier = {OrderState.ACKNOWLEDGED}, [OrderState.ACKNOWLEDGED]
    while frontier:
        state = frontier.pop()
        for (src, _ev), dst in TRANSITIONS.items():
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(OrderState)


def test_cancel_is_not_possible_once_terminal() -> None:
    assert next_state(OrderState.IN_PROGRESS, Ev.CANCEL) == OrderState.ASSESSING_CANCELLATION
    with pytest.raises(IllegalTransition):
        next_state(OrderState.COMPLETED, Ev.CANCEL)


# -- one choke point per kind of order state ---------------------------------

ROOT = Path(__file__).resolve().parent.parent
# field -> the one function that may assign it (path, function name)
CHOKE_POINTS = {
    "state": ("oms/engine_base.py", "transition"),  # Order.state
    "state_reason": ("oms/states.py", "set_reason"),
    "status": ("oms/states.py", "set_step_status"),
    "comp": ("oms/states.py", "set_undo"),
    "phase": ("oms/states.py", "set_phase"),
    "target": ("oms/states.py", "set_phase"),
    '["state"]': ("oms/states.py", "set_item_state"),  # an item's state, in its map
}
# a snapshot read back is not a change (oms.snapshot builds new objects; it assigns none)
DECODING: set[tuple[str, str]] = set()


def _assigned(target: ast.expr) -> list[str]:
    """The choke-pointed fields an assignment target writes."""
    if isinstance(target, ast.Tuple | ast.List):
        return [name for elt in target.elts for name in _assigned(elt)]
    if isinstance(target, ast.Starred):
        return _assigned(target.value)
    if isinstance(target, ast.Attribute) and target.attr in CHOKE_POINTS:
        return [target.attr]
    if (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
            and target.slice.value == "state"):
        return ['["state"]']
    return []


def _writes(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(field, enclosing function, line) of every write in a module:
    assignments, augmented and annotated ones, ``setattr(x, "field", ...)``."""
    out: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            targets: list[ast.expr] = []
            if isinstance(child, ast.Assign):
                targets = child.targets
            elif isinstance(child, ast.AugAssign | ast.AnnAssign) and child.value is not None:
                targets = [child.target]
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Name)
                  and child.func.id == "setattr" and len(child.args) >= 2
                  and isinstance(child.args[1], ast.Constant)
                  and child.args[1].value in CHOKE_POINTS):
                out.append((child.args[1].value, func, child.lineno))
            for target in targets:
                out.extend((field, func, child.lineno) for field in _assigned(target))
            visit(child, name)

    visit(tree, "<module>")
    return out


def test_each_kind_of_order_state_changes_in_its_one_function() -> None:
    """Order state, state_reason, step status, undo status, phase/target and
    item state are assigned only in their choke point (``oms.states``,
    ``oms.engine_base.TurnBase.transition``), in the core and the actors."""
    offenders = []
    for package in ("oms", "actors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for field, func, line in _writes(tree):
                if (rel, func) in DECODING or CHOKE_POINTS[field] == (rel, func):
                    continue
                offenders.append(f"{rel}:{line} {func} assigns {field}")
    assert not offenders, "\n".join(offenders)


def test_the_choke_point_test_sees_every_kind_of_write() -> None:
    """The checker itself: each form of write is found (a test that cannot
    fail is a defect)."""
    source = ("def f(step, order, item):\n"
              "    step.status = 1\n    order.state, order.state_reason = 2, 3\n"
              "    item['state'] = 4\n    step.comp += 1\n    setattr(order, 'phase', 5)\n"
              "    order.target: str = 'x'\n")
    found = {field for field, func, _ in _writes(ast.parse(source)) if func == "f"}
    assert found == {"status", "state", "state_reason", '["state"]', "comp", "phase", "target"}


def test_step_item_undo_and_phase_tables_refuse_illegal_moves() -> None:
    step = Step("s", "s", "x", "op")
    set_step_status(step, StepStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        set_step_status(step, StepStatus.COMPENSATED)  # never undone before it is done
    assert step.status is StepStatus.RUNNING
    with pytest.raises(IllegalTransition):
        set_step_status(step, StepStatus.PENDING)
    set_step_status(step, StepStatus.DONE)
    with pytest.raises(IllegalTransition):
        set_undo(step, Undo.DONE)  # undone without an undo command
    set_undo(step, Undo.RUNNING)
    set_undo(step, Undo.DONE)
    with pytest.raises(IllegalTransition):
        set_undo(step, Undo.RUNNING)  # undone twice
    item = {"id": "i", "state": "acknowledged"}
    with pytest.raises(IllegalTransition):
        set_item_state(item, ItemState.COMPLETED)  # completed without ever running
    set_item_state(item, ItemState.IN_PROGRESS)
    set_item_state(item, ItemState.IN_PROGRESS)  # the state it has: no change
    assert item["state"] == "inProgress" and type(item["state"]) is str
    order = Order("o", "s", "e", "retail", {}, {}, {}, "EUR", [], {}, 0.0)
    with pytest.raises(IllegalTransition):
        set_phase(order, Phase.COMPENSATE)  # compensating towards nothing
    set_phase(order, Phase.COMPENSATE, Target.CANCELLED)
    with pytest.raises(IllegalTransition):
        set_phase(order, Phase.RUN)  # no way back to running forward
    set_phase(order, Phase.FINISH)
    assert (order.phase, order.target) == ("finish", "cancelled")


def test_enums_keep_the_strings_of_the_snapshot_and_the_wire() -> None:
    assert [s.value for s in StepStatus] == ["pending", "running", "done", "failed",
                                            "compensated", "skipped"]
    assert [u.value for u in Undo] == ["running", "done", "failed"]
    assert [p.value for p in Phase] == ["run", "compensate", "finish"]
    assert [r.value for r in Reason] == ["fallout", "internal_error", "compensating",
                                        "aborted"]
    order = Order("o", "s", "e", "retail", {}, {}, {}, "EUR", [], {}, 0.0)
    set_reason(order, Reason.FALLOUT)
    assert type(order.state_reason) is str and order.state_reason == "fallout"


def test_the_state_diagram_is_current() -> None:
    """docs/states.md is what ``python -m oms.states --mermaid`` generates
    from the transition table now, with an arrow per table entry."""
    page = (ROOT / "docs/states.md").read_text(encoding="utf-8")
    assert page == states_page(), "regenerate: python -m oms.states --mermaid > docs/states.md"
    assert mermaid().count(" --> ") == len(TRANSITIONS) + 1 + len(TERMINAL)
    for (old, event), new in TRANSITIONS.items():
        assert f": {event.value}\n" in page and old.name.title().replace("_", "") in page
        assert new.name.title().replace("_", "") in page
    for table in (STEP_MOVES, ITEM_MOVES, UNDO_MOVES, PHASE_MOVES):  # an arrow per move
        for old, new in table:
            arrow = f"    {_node(old)} --> {_node(new)}\n"
            assert arrow in page, arrow


def _node(value: Any) -> str:
    return "[*]" if value is None else value.name.title().replace("_", "")
