"""Does this order have something outstanding? Decided here, once.

A step (or a CRM note) has something outstanding when a command of it is out
at a gateway (its reply, or the gateway's timeout, will come) or when a timer
will bring it back (a retry back-off, an event wait's deadline). Everything
that asks (the engine before it undoes anything, the order actor before it
leaves memory, ``Order.finished``, recovery choosing what to resume) asks
``command_out`` for each step, directly or through ``outstanding``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from oms.states import STEP_RUNNING, TERMINAL, UNDO_RUNNING

if TYPE_CHECKING:
    from oms.model import Order

REPLY = "reply"  # a command is at a gateway: its reply (or its timeout) is awaited
TIMER = "timer"  # a retry back-off or an event deadline: a timer brings it back


def command_out(status: str, wait: str | None, retry_at: float | None,
                comp: str | None) -> tuple[bool, str] | None:
    """What one step (or CRM note) has outstanding, from its stored fields:
    ``(forward, REPLY or TIMER)`` (forward: a forward command, not an undo or
    an event deadline), or None."""
    if comp == UNDO_RUNNING:
        return False, REPLY if retry_at is None else TIMER
    if status == STEP_RUNNING:
        if wait is None:
            return True, REPLY if retry_at is None else TIMER
        if retry_at is not None:
            return False, TIMER  # an event wait's deadline
    return None


class Outstanding(NamedTuple):
    """What an order has outstanding.

    forward: a forward command whose outcome is not known yet (at a gateway,
      or backing off to be sent again): compensation waits for it.
    replies: a command, undo or CRM note is at a gateway, its reply awaited:
      the order stays in memory for it.
    timers: a back-off or an event deadline, re-armed after a restart.
    notes: a CRM notification is still being delivered: a terminal order
      is not finished before it is.
    """

    forward: bool
    replies: bool
    timers: bool
    notes: bool


def outstanding(order: Order) -> Outstanding:
    """Everything an order has outstanding, in one pass."""
    forward = replies = timers = notes = False
    for step in order.steps.values():
        out = command_out(step.status, step.wait, step.retry_at, step.comp)
        if out is not None:
            forward |= out[0]
            replies |= out[1] == REPLY
            timers |= out[1] == TIMER
    for note in order.notes:
        out = command_out(note.status, None, note.retry_at, None)
        if out is not None:
            notes = True
            replies |= out[1] == REPLY
            timers |= out[1] == TIMER
    return Outstanding(forward, replies, timers, notes)


# The questions asked on hot paths, each ``outstanding(order).<field>``,
# answered at the first step that decides it.


def forward_in_flight(order: Order) -> bool:
    """``outstanding(order).forward``."""
    for step in order.steps.values():
        out = command_out(step.status, step.wait, step.retry_at, step.comp)
        if out is not None and out[0]:
            return True
    return False


def awaiting_reply(order: Order) -> bool:
    """``outstanding(order).replies``: ``command_out``'s REPLY cases written
    out (no call and no tuple a step; asked at every snapshot of an order,
    about 6 times an order), pinned to it by
    ``tests/test_engine.py::test_awaiting_reply_is_command_outs_reply``.
    Most steps are done or pending: the status decides first, and ``comp``
    is compared only when set (``None == member`` is two failed compares)."""
    for step in order.steps.values():
        if step.status == STEP_RUNNING and step.wait is None and step.retry_at is None:
            return True
        comp = step.comp
        if comp is not None and comp == UNDO_RUNNING and step.retry_at is None:
            return True
    for note in order.notes:  # noqa: SIM110 - a loop: no generator, as above
        if note.status == STEP_RUNNING and note.retry_at is None:
            return True
    return False


def delivering_notes(order: Order) -> bool:
    """``outstanding(order).notes``: ``command_out`` of a note (no wait, no
    ``comp``) is not None exactly when it runs, at a gateway or backing off."""
    for note in order.notes:  # noqa: SIM110 - a loop: no generator (``Order.finished``)
        if note.status == STEP_RUNNING:
            return True
    return False


AWAITING, WAITING, FINISHED = 0, 1, 2
"""``standing``: a reply is awaited (the order stays in memory for it); nothing
is awaited, but the order is not finished (it may rest: passivate); finished
(it retires)."""


def standing(order: Order) -> int:
    """``FINISHED`` if ``order.finished``, else ``AWAITING`` if
    ``awaiting_reply(order)``, else ``WAITING``: what the order actor asks at
    every snapshot, in one call. A terminal order's notes decide alone
    unless one is backing off (its steps then decide, as they may)."""
    if order.state not in TERMINAL:
        return AWAITING if awaiting_reply(order) else WAITING
    delivering = False
    for note in order.notes:
        if note.status == STEP_RUNNING:
            if note.retry_at is None:
                return AWAITING
            delivering = True
    if not delivering:
        return FINISHED
    return AWAITING if awaiting_reply(order) else WAITING
