"""Operator actions and jeopardy: the parts of the engine that people drive
or watch. A mixin of ``oms.engine.Turning`` (see ``oms.engine_base``);
pure like the rest of it.

Operator actions (``Operate``):
- ``retry``: a held/fallout order runs its failed step (or failed
  compensation) again, as a new logical command (new ``command_id``).
- ``skip``: the failed step is marked done and the process goes on.
- ``abort``: completed steps are compensated, then the order is ``failed``.
Each is recorded in the order's history with the operator and the reason.

Jeopardy: a definition may give ``expected_s`` per step and for the whole
order. When one is exceeded the order publishes one ``order_jeopardy`` event
and notifies CRM once. It is not a state change; deadlines and whether they
fired are in the snapshot, so a restart neither loses nor repeats them.
"""

from __future__ import annotations

from typing import Any

from oms import fallout
from oms.engine_base import TurnBase
from oms.messages import Operate, Publish, Reply, Timer
from oms.model import Step
from oms.states import (
    Ev,
    ItemState,
    OrderState,
    Phase,
    Reason,
    StepStatus,
    Target,
    Undo,
    set_step_status,
    set_undo,
)

S = OrderState
MAX_NOTE = 1000  # operator names and reasons kept in the history, in characters


class OperatorMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    # -- operator actions --------------------------------------------------

    def on_operate(self, msg: Operate) -> None:
        order = self.order

        def answer(kind: str, **extra: Any) -> None:
            self.emit(Reply(msg.reply_to, {"type": kind, "order_id": order.order_id,
                                           "action": msg.action, **extra}))

        problem = self.operate_problem(msg)
        if problem:
            answer("operator_rejected", reason=problem)
            return
        order.history.append({"state": str(order.state), "ts": self.now, "action": msg.action,
                              "operator": str(msg.operator)[:MAX_NOTE],
                              "reason": str(msg.reason or "")[:MAX_NOTE]})
        self.changed = True
        if msg.action == "abort":
            order.failure = dict(order.failure or {}, aborted_by=str(msg.operator)[:MAX_NOTE])
            self.begin_compensation(Target.FAILED)
        elif msg.action == "retry" and fallout.failed_step(order) is None:
            self.retry_internal_error()
        elif msg.action == "skip" and self.skips_a_wait(msg.step):
            self.skip_wait(msg)
        else:
            self.operate_on_failed(msg)
        answer("operator_accepted", state=str(order.state))

    def retry_internal_error(self) -> None:
        """Resume an ``internal_error`` hold from its last durable snapshot. An
        order that was in fallout then (its failure, kept as ``previous``,
        names a failed step or undo) is in that fallout again, for the
        operator; one that never had its sequencing turn waits for it."""
        order = self.order
        previous = order.failure
        while isinstance(previous, dict) and previous.get("step") is None and (
                previous.get("error") or {}).get("code") == Reason.INTERNAL_ERROR:
            previous = previous.get("previous")  # held again and again: the one before
        key = previous.get("step") if isinstance(previous, dict) else None
        step = order.steps.get(key) if isinstance(key, str) else None
        if step is not None and (step.comp == Undo.FAILED or (
                order.phase == Phase.RUN and step.status == StepStatus.FAILED)):
            order.failure = previous  # the fallout it was in, for the operator again
            self.set_reason(Reason.FALLOUT)
            order.history.append({"state": S.HELD.value, "ts": self.now,
                                  "reason": Reason.FALLOUT.value})
        elif order.seq_key and not order.turn:  # it never had its turn: it waits for it
            self.transition(Ev.WAIT_TURN)  # (still queued: the sequencer's Turn starts it)
        elif (hold := self.hold_waited_for()) is not None:  # e.g. awaiting_stock: held
            self.set_reason(hold)  # for it again (its event ends the hold)
        else:
            began = order.phase != Phase.RUN or not any(
                it["state"] == ItemState.ACKNOWLEDGED for it in order.items)
            if isinstance(previous, dict):
                order.failure = previous  # what it fails with, if it is failing
            self.transition_back()  # resume from the snapshot (what was in flight is sent again)
            if began:
                self.advance()
            else:  # held before it started (its start raised): start it now
                self.start_run()

    def hold_waited_for(self) -> str | None:
        """The reason of a definition's hold that a step of this running order
        waits in (its command applied, its event awaited), or None."""
        if self.order.phase != Phase.RUN:
            return None
        for step in self.order.steps.values():
            if step.wait and step.applied and step.status == StepStatus.RUNNING:
                hold = self.sdef(step).hold
                if hold is not None:
                    return hold.reason
        return None

    def skips_a_wait(self, name: str | None) -> bool:
        step = fallout.skip_target(self.order, name)[0]
        return step is not None and step is not fallout.failed_step(self.order)

    def skip_wait(self, msg: Operate) -> None:
        """The wait ends as if its event had come; a held order goes on
        unless another wait or a failed step still holds it."""
        order = self.order
        step = fallout.skip_target(order, msg.step)[0]
        assert step is not None  # operate_problem checked it
        self.consume(step, {"skipped_by": str(msg.operator)[:MAX_NOTE]})
        holding = any(s.wait and s.applied for s in order.steps.values())
        if not holding and fallout.failed_step(order) is None:
            self.transition_back()
        self.advance()

    def operate_problem(self, msg: Operate) -> str | None:
        """Why the action is refused (``oms.fallout`` holds the rules)."""
        if msg.action == "cancel":
            return "cancel is a channel request (cancel_order), not an operator action"
        return fallout.problem(self.order, msg.action, msg.step, self.proc.point_of_no_return)

    def operate_on_failed(self, msg: Operate) -> None:
        order = self.order
        assert order.failure is not None  # operate_problem checked it
        step: Step = order.steps[order.failure["step"]]
        compensation = bool(order.failure.get("compensation"))
        order.failure = order.failure.get("previous") if compensation else None
        step.error = None
        if compensation:  # a compensation failed for good (its order fails as it was failing)
            step.gen += 1
            set_undo(step, Undo.DONE if msg.action == "skip" else Undo.RUNNING)
            if msg.action == "skip":
                self.set_status(step, StepStatus.COMPENSATED)
            else:
                step.comp_attempts = 1
                self.send_comp(step)
            self.transition_back()
            self.compensate_next()
            return
        if msg.action == "skip":
            step.result, step.applied = {"skipped_by": msg.operator}, False
            self.step_done(step)
            self.skip_dependent_waits(step, msg.operator)
        else:
            step.gen += 1
            step.attempts = 0
            set_step_status(step, StepStatus.PENDING)  # no progress event: launched at once
            self.launch(step, self.sdef(step))
        other = self.other_failed_step()
        if other is not None:  # failed beside it (parallel steps): fallout for that one now
            order.failure = {"step": other.key, "error": other.error}
            self.set_reason(Reason.FALLOUT)
        else:
            self.transition_back()
        self.advance()

    def other_failed_step(self) -> Step | None:
        """A step that failed for good while the order was held for another
        (the order's ``failure`` names one step only)."""
        partial = self.proc.item_failure == "partial"
        for step in self.order.steps.values():
            if step.status == StepStatus.FAILED and not (partial and step.item_id is not None):
                return step
        return None

    def skip_dependent_waits(self, skipped: Step, operator: str) -> None:
        """Skipping a step also skips the event waits that list it in
        ``after`` (the event would come from the skipped command, e.g.
        ``await_delivery`` after ``create_shipment``): the order would
        otherwise wait forever. For a per-item step, once no instance of it
        ran for real."""
        order = self.order
        if any(s.name == skipped.name and s.applied for s in order.steps.values()):
            return
        for sdef in self.proc.steps:
            if sdef.wait_event is None or skipped.name not in sdef.after:
                continue
            for step in self.steps_of(sdef.name):
                if step.status == StepStatus.PENDING:
                    step.result = {"skipped_by": operator, "because": skipped.key}
                    self.set_status(step, StepStatus.SKIPPED)

    def transition_back(self) -> None:
        """A held order goes on: back to ``inProgress``, or, when the undo of
        a cancelled order is retried, back to ``pendingCancellation``."""
        order = self.order
        if order.state != S.HELD:
            return
        if order.phase == Phase.COMPENSATE and order.target == Target.CANCELLED:
            self.transition(Ev.CANCEL_ACCEPT, (order.cancel or {}).get("reason"))
        elif order.phase == Phase.COMPENSATE:  # undoing, then failed
            self.transition(Ev.RESUME, Reason.COMPENSATING)
        else:
            self.transition(Ev.RESUME)

    # -- jeopardy ----------------------------------------------------------

    def expect(self, key: str, expected_s: float | None) -> None:
        """Arm a jeopardy deadline for a step (or "order") just started."""
        if not expected_s or key in self.order.jeopardy:
            return
        at = self.now + expected_s
        self.order.jeopardy[key] = [at, False]
        self.changed = True
        self.emit(Timer(at, ("jeopardy", key, 0)))

    def rearm_jeopardy(self) -> None:
        """After a restart: the deadlines not yet passed are armed again."""
        for key, (at, fired) in self.order.jeopardy.items():
            if not fired:
                self.emit(Timer(at, ("jeopardy", key, 0)))

    def on_jeopardy(self, key: str) -> None:
        order = self.order
        entry = order.jeopardy.get(key)
        step = order.steps.get(key)
        still_running = (not order.state.terminal) if key == "order" else (
            step is not None and step.status in (StepStatus.PENDING, StepStatus.RUNNING))
        if entry is None or entry[1] or not still_running:
            self.stale = True
            return
        entry[1] = True
        self.changed = True
        expected = (self.proc.expected_s if key == "order" or step is None
                    else self.sdef(step).expected_s)
        if not expected:
            return  # expected_s was removed from the definition: the deadline is dropped
        late = max(0.0, self.now - entry[0])
        self.emit(Publish({"type": "order_jeopardy", "order_id": order.order_id,
                           "external_id": order.external_id, "step": key,
                           "expected_s": expected, "late_s": late, "ts": self.now}))
        what = "the order" if key == "order" else f"step {key}"
        self.notify_crm(f"jeopardy:{key}", str(order.state),
                        f"Order {order.external_id} is in jeopardy: {what} has run past "
                        f"its expected {expected:g} s")
