"""The process engine: one order, one message, a list of effects. Pure.

``Engine(proc).handle(order, message, now)`` mutates the order in place and
returns the effects to carry out *after* the new snapshot is persisted
(``oms.messages``: send a command, publish an event, arm a timer, reply,
ask the sequencer). It never does I/O and never reads a clock: ``now`` comes
in. Every kind of order state changes in one function (``oms.states``,
``oms.engine_base``); the order state through the one transition table.

The parts of the engine, each a mixin of ``oms.engine_base.TurnBase``:
``oms.engine_run`` (start, resume, move forward, results),
``oms.engine_events`` (domain events, timers), ``oms.engine_undo``
(cancel, compensation), ``oms.engine_notes`` (CRM notifications),
``oms.operator`` (operator actions, jeopardy), ``oms.orphans`` (steps a
changed definition no longer has).

Command ids are derived from persisted data only, so they are the same on
every retry and after a restart (contract §3):
``ORDER:STEP`` (``#GEN`` appended after an operator re-run),
``ORDER:STEP:undo`` for its compensation, ``ORDER:notify:N`` for CRM.
"""

from __future__ import annotations

from typing import Any

from oms.engine_events import MAX_EARLY_BYTES, MAX_EARLY_EVENTS, EventMixin
from oms.engine_notes import NoteMixin
from oms.engine_run import AMOUNT_OUT_OF_RANGE, RunMixin
from oms.engine_undo import MAX_REASON, UndoMixin
from oms.errors import INVALID_REPLY
from oms.messages import (
    Cancel,
    CommandResult,
    DomainEvent,
    Operate,
    Resume,
    Start,
    TimerFired,
    Turn,
)
from oms.model import Order, Step
from oms.operator import OperatorMixin
from oms.orphans import OrphanMixin
from oms.process import ProcessDef, StepDef
from oms.states import Ev, ItemState, OrderState, Reason, StepStatus, set_step_status
from oms.templates import Template, lookup

__all__ = ["AMOUNT_OUT_OF_RANGE", "INTERNAL_ERROR", "INVALID_REPLY", "MAX_EARLY_BYTES",
           "MAX_EARLY_EVENTS", "MAX_REASON", "Engine", "Turning", "hold_internal_error",
           "new_order"]

S = OrderState
INTERNAL_ERROR = Reason.INTERNAL_ERROR.value  # state_reason of an order whose handler raised
_ACKNOWLEDGED = ItemState.ACKNOWLEDGED.value  # an item's and an order's first state, as stored


def new_order(order_id: str, req: dict[str, Any], proc: ProcessDef, now: float) -> Order:
    """The order as acknowledged: its items and its expanded step list."""
    items = [dict(it, state=_ACKNOWLEDGED) for it in req["items"]]
    order = Order(
        order_id=order_id,
        source_system=req["source_system"],
        external_id=req["external_id"],
        order_type=req["order_type"],
        customer=req["customer"],
        customer_address=req["customer_address"],
        delivery_address=req["delivery_address"],
        currency=req["currency"],
        items=items,
        attributes=req["attributes"],
        created_ts=now,
        updated_ts=now,
        history=[{"state": _ACKNOWLEDGED, "ts": now}],
    )
    for sdef in proc.steps:
        if sdef.per_item is not None:
            for it in items:
                action = sdef.per_item.get(it["action"])
                key = f"{sdef.name}[{it['id']}]"
                step = Step(key, sdef.name, action.system if action else "",
                            action.op if action else "none", item_id=it["id"])
                if action is None:
                    set_step_status(step, StepStatus.SKIPPED)
                order.steps[key] = step
        elif sdef.wait_event is not None:
            order.steps[sdef.name] = Step(
                sdef.name, sdef.name, sdef.wait_system or "", f"await:{sdef.wait_event}"
            )
        else:
            assert sdef.action is not None
            order.steps[sdef.name] = Step(sdef.name, sdef.name, sdef.action.system,
                                          sdef.action.op)
    if proc.sequencing_key:
        key = lookup({"customer": order.customer, "attributes": order.attributes,
                      "source_system": order.source_system}, proc.sequencing_key)
        order.seq_key = f"{proc.order_type}/{key}" if key is not None else None
    return order


class Engine:
    """Runs orders of one process definition.

    defs: the step definitions by name; known: which stored step shapes
    its definition still has, sdefs: the definition of each (``oms.orphans``);
    templates: each argument template parsed, by its id (``TurnBase.fill``).
    """

    def __init__(self, proc: ProcessDef) -> None:
        self.proc = proc
        self.defs = {s.name: s for s in proc.steps}
        self.known: dict[tuple[str, str, bool], bool] = {}
        self.sdefs: dict[tuple[str, str, bool], StepDef] = {}
        self.templates: dict[int, Template] = {}

    def handle(self, order: Order, msg: Any, now: float,
               effects: list[Any] | None = None) -> Turning:
        """Apply one message; the returned ``Turning`` holds the effects.
        (The dispatch is here, not in a method of the ``Turning``: one frame
        less a message.) ``effects``: a list to append them to (the order
        actor's for its slice: no list of its own a message), which is then
        the ``Turning``'s ``effects``; if it raises, some may be in it."""
        turning = Turning(self, order, now, effects)
        kind = type(msg)  # exact types (messages are final NamedTuples), most frequent first
        if kind is CommandResult:
            turning.on_result(msg)
        elif kind is TimerFired:
            turning.on_timer(msg.token)
        elif kind is DomainEvent:
            turning.on_event(msg)
        elif kind is Start:
            turning.on_start()
        elif kind is Turn:
            turning.on_turn(msg.go)
        elif kind is Cancel:
            turning.on_cancel(msg)
        elif kind is Operate:
            turning.check_orphans()  # after a definition change (oms.orphans)
            turning.on_operate(msg)
        elif kind is Resume:
            turning.check_orphans()
            turning.on_resume()
        else:
            raise TypeError(f"an order cannot handle {kind.__name__}")
        if turning.changed:
            order.updated_ts = now
            order.version += 1
        return turning


def hold_internal_error(engine: Engine, order: Order, error: str, dropped: tuple[Any, ...],
                        now: float) -> Turning:
    """The engine half of the order failure rule (``OrderRouter.crashed``).

    A handler raised on this order; ``order`` is its last durable snapshot
    again, and ``dropped`` the messages lost with the crash. Hold it as
    fallout (``held``, ``internal_error``) with the error (and the failure
    it had, under ``previous``); an operator retries (resume from the
    snapshot), skips or aborts it. A sequencing turn it was given is kept:
    it stays the head of its queue until it finishes or is aborted.
    """
    turning = Turning(engine, order, now)
    if order.state.terminal:  # finished, only notices still out: nothing to hold, but a
        _fail_dropped_notes(turning, error, dropped)  # notice whose reply or timer was
        if not turning.changed:  # dropped would stay running for ever: it fails
            turning.stale = True
            return turning
        order.updated_ts, order.version = now, order.version + 1
        return turning
    order.failure = {"step": None, "previous": order.failure,
                     "error": {"code": INTERNAL_ERROR, "message": error[:500],
                               "retryable": False}}
    if any(isinstance(m, Turn) and m.go for m in dropped):
        order.turn = True
    if order.state == S.HELD:
        turning.set_reason(INTERNAL_ERROR)
        order.history.append({"state": S.HELD.value, "ts": now, "reason": INTERNAL_ERROR})
    else:
        turning.transition(Ev.HOLD, INTERNAL_ERROR)
    turning.changed = True
    order.updated_ts, order.version = now, order.version + 1
    return turning


def _fail_dropped_notes(turning: Turning, error: str, dropped: tuple[Any, ...]) -> None:
    """A terminal order's CRM notices named by the messages the crash dropped
    (a reply, a back-off timer) fail: nothing else would ever settle them, and
    sending them again could raise again, for ever."""
    notes = turning.order.notes
    for msg in dropped:
        idx = -1
        if isinstance(msg, CommandResult):
            kind, _note, idx = turning.find(msg.command_id)
            idx = idx if kind == "note" else -1
        elif isinstance(msg, TimerFired) and msg.token[0] == "note":
            idx = msg.token[1]
        if 0 <= idx < len(notes) and notes[idx].status == StepStatus.RUNNING:
            note = notes[idx]
            note.retry_at = None
            note.error = {"code": INTERNAL_ERROR, "message": error[:500], "retryable": False}
            set_step_status(note, StepStatus.FAILED)
            turning.changed = True


class Turning(RunMixin, EventMixin, UndoMixin, NoteMixin, OperatorMixin, OrphanMixin):
    """One message's worth of work on one order (see ``TurnBase``)."""

    __slots__ = ()  # as ``TurnBase``
