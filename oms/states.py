"""Order, item and step states, and the one order transition table.

Order states use the TMF622 names of the contract. Every order state change
goes through ``next_state``: a pair missing from ``TRANSITIONS`` raises
``IllegalTransition``.
"""

from __future__ import annotations

from enum import StrEnum


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


class ItemState(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    PENDING = "pending"
    IN_PROGRESS = "inProgress"
    HELD = "held"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
