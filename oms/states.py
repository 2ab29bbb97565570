"""Every kind of order state, each with its one choke point.

Order states use the TMF622 names of the contract. Every order state change
goes through ``next_state``: a pair missing from ``TRANSITIONS`` raises
``IllegalTransition``. The other kinds of state an order carries change in
one function each, here, by a table of the moves they allow (an illegal move
raises ``IllegalTransition`` too):

- a step's ``status`` (``StepStatus``): ``set_step_status``, table ``STEP_MOVES``;
- an item's ``state`` (``ItemState``): ``set_item_state``, table ``ITEM_MOVES``;
- a step's compensation (``step.comp``, ``Undo``): ``set_undo``, table ``UNDO_MOVES``;
- the order's phase (``order.phase``/``order.target``, ``Phase``): ``set_phase``,
  table ``PHASE_MOVES``;
- the order's ``state_reason`` (``Reason``, or a reason that is data: a
  definition's hold reason, an error code, a cancel reason): ``set_reason``.

All enums are ``str`` enums: the snapshot and the wire carry the same strings
as before. ``python -m oms.states --mermaid`` prints the order state diagram
(docs/states.md) from ``TRANSITIONS``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oms.model import Order, Step


class OrderState(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    PENDING = "pending"
    IN_PROGRESS = "inProgress"
    HELD = "held"
    ASSESSING_CANCELLATION = "assessingCancellation"
    PENDING_CANCELLATION = "pendingCancellation"
    COMPLETED = "completed"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {OrderState.COMPLETED, OrderState.PARTIAL, OrderState.FAILED, OrderState.CANCELLED}
)


class Ev(StrEnum):
    """What happened to an order: the column of the transition table."""

    WAIT_TURN = "wait_turn"  # an earlier order of the same sequencing key runs
    START = "start"  # the process begins (or resumes after waiting its turn)
    HOLD = "hold"  # awaiting stock, or fallout awaiting an operator
    RESUME = "resume"  # the hold ended
    COMPLETE = "complete"  # every step done
    PARTIAL = "partial"  # some items completed, others failed
    FAIL = "fail"  # failed; completed steps were compensated
    CANCEL = "cancel"  # a cancel request is being checked
    CANCEL_ACCEPT = "cancel_accept"  # cancel accepted; compensating
    CANCELLED = "cancelled"  # compensation after cancel finished


S = OrderState
TRANSITIONS: dict[tuple[OrderState, Ev], OrderState] = {
    (S.ACKNOWLEDGED, Ev.START): S.IN_PROGRESS,
    (S.ACKNOWLEDGED, Ev.WAIT_TURN): S.PENDING,
    (S.ACKNOWLEDGED, Ev.CANCEL): S.ASSESSING_CANCELLATION,
    (S.ACKNOWLEDGED, Ev.FAIL): S.FAILED,  # an operator aborts before it starts
    (S.PENDING, Ev.START): S.IN_PROGRESS,
    (S.PENDING, Ev.CANCEL): S.ASSESSING_CANCELLATION,
    (S.PENDING, Ev.FAIL): S.FAILED,  # an operator aborts while it waits its turn
    (S.IN_PROGRESS, Ev.HOLD): S.HELD,
    (S.IN_PROGRESS, Ev.COMPLETE): S.COMPLETED,
    (S.IN_PROGRESS, Ev.PARTIAL): S.PARTIAL,
    (S.IN_PROGRESS, Ev.FAIL): S.FAILED,
    (S.IN_PROGRESS, Ev.CANCEL): S.ASSESSING_CANCELLATION,
    (S.HELD, Ev.RESUME): S.IN_PROGRESS,
    (S.HELD, Ev.WAIT_TURN): S.PENDING,  # an internal_error hold retried before its turn came
    (S.HELD, Ev.FAIL): S.FAILED,
    (S.HELD, Ev.CANCEL): S.ASSESSING_CANCELLATION,
    (S.HELD, Ev.CANCEL_ACCEPT): S.PENDING_CANCELLATION,  # a failed undo of a cancel retried
    (S.ASSESSING_CANCELLATION, Ev.CANCEL_ACCEPT): S.PENDING_CANCELLATION,
    (S.PENDING_CANCELLATION, Ev.CANCELLED): S.CANCELLED,
    (S.PENDING_CANCELLATION, Ev.HOLD): S.HELD,
    # a handler that raised holds the order from any unfinished state
    # (state_reason internal_error; oms.engine.hold_internal_error)
    (S.ACKNOWLEDGED, Ev.HOLD): S.HELD,
    (S.PENDING, Ev.HOLD): S.HELD,
    (S.ASSESSING_CANCELLATION, Ev.HOLD): S.HELD,
}


class IllegalTransition(RuntimeError):
    """An (order state, event) pair that the table does not allow."""


def next_state(state: OrderState, event: Ev) -> OrderState:
    """The one choke point for order state changes."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{state} --{event}--> (not allowed)") from None


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


P, R, D, F, C, K = (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.DONE, StepStatus.FAILED,
                    StepStatus.COMPENSATED, StepStatus.SKIPPED)
STEP_MOVES: frozenset[tuple[StepStatus, StepStatus]] = frozenset({
    (P, R),  # launched: its command sent, or its event awaited
    (P, K),  # nothing to do for its item; or compensation began before it ran
    (P, D),  # an operator skips an orphan that never ran (done by hand)
    (R, D),  # its command applied, or its event came (or a wait was skipped)
    (R, F),  # failed for good (or its event did not come in time)
    (R, K),  # a wait that had not got its event when compensation began
    (F, D),  # an operator skips the failed step (done by hand)
    (F, P),  # an operator retries the failed step (a new command, launched at once)
    (D, C),  # its compensation is done (or an operator skipped a failed undo)
})


def set_step_status(step: Step, status: StepStatus) -> None:
    """The one choke point for a step's (or a CRM note's) status."""
    if (step.status, status) not in STEP_MOVES:
        raise IllegalTransition(f"step {step.key}: {step.status} -> {status} (not allowed)")
    step.status = status


class ItemState(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    PENDING = "pending"
    IN_PROGRESS = "inProgress"
    HELD = "held"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_I = ItemState
ITEM_MOVES: frozenset[tuple[ItemState, ItemState]] = frozenset({
    (_I.ACKNOWLEDGED, _I.IN_PROGRESS),  # the order starts
    (_I.IN_PROGRESS, _I.COMPLETED),  # all of its steps done (or the order completed)
    (_I.IN_PROGRESS, _I.FAILED),  # one of its steps failed (partial), or the order failed
    (_I.IN_PROGRESS, _I.CANCELLED),  # the order was cancelled
    (_I.ACKNOWLEDGED, _I.CANCELLED),  # ... before it started
    (_I.ACKNOWLEDGED, _I.FAILED),  # the order failed (aborted) before it started
    (_I.COMPLETED, _I.CANCELLED),  # the order was cancelled after the item was done
    (_I.COMPLETED, _I.FAILED),  # the order failed after the item was done
    (_I.FAILED, _I.CANCELLED),  # the order was cancelled after the item failed
    (_I.FAILED, _I.COMPLETED),  # an operator skipped its failed step (done by hand)
})


def set_item_state(item: dict[str, Any], state: ItemState) -> None:
    """The one choke point for an item's state (kept as its plain string in
    the item map). Setting the state it has is no change. (A str enum member
    and its string are equal and hash alike: the tables take either.)"""
    old = item["state"]
    if old == state:
        return
    if (old, state) not in ITEM_MOVES:
        raise IllegalTransition(f"item {item.get('id')}: {old} -> {state} (not allowed)")
    item["state"] = state._value_  # the member's plain string (``str`` would copy it)


class Undo(StrEnum):
    """A step's compensation (``step.comp``; None: not undone)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


UNDO_MOVES: frozenset[tuple[Undo | None, Undo]] = frozenset({
    (None, Undo.RUNNING),  # its undo command is sent
    (None, Undo.FAILED),  # an orphan's undo is unknown: fallout
    (Undo.RUNNING, Undo.DONE),  # undone
    (Undo.RUNNING, Undo.FAILED),  # the undo failed for good: fallout
    (Undo.FAILED, Undo.RUNNING),  # an operator retries the undo
    (Undo.FAILED, Undo.DONE),  # an operator skips it (undone by hand)
})


def set_undo(step: Step, undo: Undo) -> None:
    """The one choke point for a step's compensation status."""
    if (step.comp, undo) not in UNDO_MOVES:
        raise IllegalTransition(f"undo of step {step.key}: {step.comp} -> {undo} (not allowed)")
    step.comp = undo


class Phase(StrEnum):
    """What an order's process is doing (``order.phase``)."""

    RUN = "run"  # moving forward
    COMPENSATE = "compensate"  # undoing completed steps, towards ``order.target``
    FINISH = "finish"  # terminal


class Target(StrEnum):
    """Where compensation ends (``order.target``)."""

    FAILED = "failed"
    CANCELLED = "cancelled"


PHASE_MOVES: frozenset[tuple[Phase, Phase]] = frozenset({
    (Phase.RUN, Phase.COMPENSATE),  # failed, cancelled or aborted: undo what was done
    (Phase.RUN, Phase.FINISH),  # completed (or partial)
    (Phase.COMPENSATE, Phase.FINISH),  # everything undone: failed or cancelled
})


def set_phase(order: Order, phase: Phase, target: Target | None = None) -> None:
    """The one choke point for an order's phase (and compensation target)."""
    if (order.phase, phase) not in PHASE_MOVES:
        raise IllegalTransition(f"phase of {order.order_id}: {order.phase} -> {phase} "
                                f"(not allowed)")
    if (phase is Phase.COMPENSATE) != (target is not None):
        raise IllegalTransition(f"phase {phase} with target {target}")
    order.phase = phase
    if target is not None:
        order.target = target


class Reason(StrEnum):
    """The ``state_reason`` values the engine itself gives. Others are data:
    a definition's hold reason (e.g. ``awaiting_stock``), the error code a
    failed order ends with, a channel's cancel reason."""

    FALLOUT = "fallout"  # held: a step (or its undo) failed, an operator decides
    INTERNAL_ERROR = "internal_error"  # held: a handler raised on this order
    COMPENSATING = "compensating"  # held no more for an operator: undoing, then failed
    ABORTED = "aborted"  # failed: an operator aborted it (no error code)


OPERATOR_HOLDS = frozenset({Reason.FALLOUT, Reason.INTERNAL_ERROR})  # only an operator ends these


# The members the engine reads for nearly every message, as module names. On
# Python 3.11 a member read off its class (``StepStatus.DONE``) goes through
# ``EnumType.__getattr__``'s slow path: about 75 ns, against 6 ns for a module
# name, and 13 % of the engine's instructions per retail order. These are the
# members themselves (``STEP_DONE is StepStatus.DONE``); cold code reads the class.
STEP_PENDING, STEP_RUNNING, STEP_DONE, STEP_FAILED, STEP_SKIPPED = P, R, D, F, K
ORDER_ACKNOWLEDGED, ORDER_IN_PROGRESS, ORDER_HELD = S.ACKNOWLEDGED, S.IN_PROGRESS, S.HELD
ITEM_IN_PROGRESS, ITEM_COMPLETED, ITEM_FAILED = _I.IN_PROGRESS, _I.COMPLETED, _I.FAILED
PHASE_RUN, PHASE_COMPENSATE, PHASE_FINISH = Phase.RUN, Phase.COMPENSATE, Phase.FINISH
UNDO_RUNNING = Undo.RUNNING
REASON_INTERNAL_ERROR = Reason.INTERNAL_ERROR


def set_reason(order: Order, reason: str | None) -> None:
    """The one choke point for ``state_reason``. It changes with each order
    transition (``oms.engine_base.TurnBase.transition``, the reason that
    transition gives, None for none), and while an order stays ``held`` when
    what holds it changes (a hold for another reason, an internal error, or a
    failed order starting to compensate). Kept as a plain string."""
    order.state_reason = None if reason is None else str(reason)


def _node(value: Any) -> str:
    return "[*]" if value is None else value.name.title().replace("_", "")


def mermaid() -> str:
    """The order state diagram, generated from ``TRANSITIONS`` (docs/states.md)."""
    lines = ["stateDiagram-v2"]
    lines += [f"    {_node(s)}: {s.value}" for s in OrderState]
    lines.append(f"    [*] --> {_node(OrderState.ACKNOWLEDGED)}")
    for (old, event), new in TRANSITIONS.items():
        lines.append(f"    {_node(old)} --> {_node(new)}: {event.value}")
    lines += [f"    {_node(s)} --> [*]" for s in OrderState if s.terminal]
    return "\n".join(lines) + "\n"


def mermaid_moves(kind: type[StrEnum], moves: frozenset[tuple[Any, Any]],
                  start: Any = None) -> str:
    """A diagram of one of the move tables (``STEP_MOVES``, ...)."""
    used = {v for move in moves for v in move if v is not None} | (
        {start} if start is not None else set())
    lines = ["stateDiagram-v2"]
    lines += [f"    {_node(v)}: {v.value}" for v in kind if v in used]
    if start is not None:
        lines.append(f"    [*] --> {_node(start)}")
    lines += [f"    {_node(old)} --> {_node(new)}"
              for old, new in sorted(moves, key=lambda m: (str(m[0] or ""), str(m[1])))]
    return "\n".join(lines) + "\n"


def states_page() -> str:
    """docs/states.md as the tables generate it now."""
    def section(title: str, where: str, diagram: str) -> str:
        return f"## {title}\n\n{where}\n\n```mermaid\n{diagram}```\n"

    return "\n".join([
        "# Order states\n\n"
        "Generated from the tables of `oms/states.py` by\n"
        "`python -m oms.states --mermaid > docs/states.md`; "
        "`tests/test_states.py::test_the_state_diagram_is_current` fails when it is stale.\n"
        "A move missing from a table is refused (`IllegalTransition`).\n",
        section("Order state", "`oms.states.TRANSITIONS`, changed only by "
                "`oms.engine_base.TurnBase.transition`; an arrow is labelled with its event.",
                mermaid()),
        section("Step status", "`oms.states.STEP_MOVES`, changed only by "
                "`oms.states.set_step_status` (a CRM note starts `running`).",
                mermaid_moves(StepStatus, STEP_MOVES, StepStatus.PENDING)),
        section("Undo of a step", "`oms.states.UNDO_MOVES` (`step.comp`; `[*]`: not undone), "
                "changed only by `oms.states.set_undo`.", mermaid_moves(Undo, UNDO_MOVES)),
        section("Item state", "`oms.states.ITEM_MOVES`, changed only by "
                "`oms.states.set_item_state`.",
                mermaid_moves(ItemState, ITEM_MOVES, ItemState.ACKNOWLEDGED)),
        section("Phase", "`oms.states.PHASE_MOVES` (`order.phase`, with `order.target` when "
                "compensating), changed only by `oms.states.set_phase`.",
                mermaid_moves(Phase, PHASE_MOVES, Phase.RUN)),
    ])


if __name__ == "__main__":  # python -m oms.states --mermaid > docs/states.md
    print(states_page(), end="")
