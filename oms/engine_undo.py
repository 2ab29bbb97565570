"""Cancellation and compensation: a cancel before the point of no return,
then the applied steps undone newest first, then ``cancelled`` or
``failed``. A mixin of ``oms.engine.Turning`` (see ``oms.engine_base``)."""

from __future__ import annotations

from oms import fallout
from oms.engine_base import TurnBase
from oms.messages import Cancel, CommandResult, Reply
from oms.model import Step
from oms.states import (
    Ev,
    OrderState,
    Phase,
    Reason,
    StepStatus,
    Target,
    Undo,
    set_phase,
    set_undo,
)

S = OrderState
MAX_REASON = 1000  # a cancel reason kept in the order, in characters


class UndoMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    def on_cancel(self, msg: Cancel) -> None:
        order = self.order
        problem = fallout.cancel_problem(order, self.proc.point_of_no_return)
        if problem:
            self.emit(Reply(msg.reply_to, {"type": "cancel_rejected",
                                           "order_id": order.order_id, "reason": problem}))
            return
        reason = msg.reason[:MAX_REASON] if isinstance(msg.reason, str) else None
        if msg.operator:  # an operator's cancel is in the history like their other actions
            order.history.append({"state": str(order.state), "ts": self.now,
                                  "action": "cancel", "operator": msg.operator,
                                  "reason": reason or ""})
        order.cancel = {"reason": reason, "ts": self.now}
        self.transition(Ev.CANCEL, reason)
        self.emit(Reply(msg.reply_to, {"type": "cancel_accepted", "order_id": order.order_id,
                                       "state": str(order.state)}))
        self.begin_compensation(Target.CANCELLED)

    def begin_compensation(self, target: Target) -> None:
        order = self.order
        set_phase(order, Phase.COMPENSATE, target)
        self.changed = True
        for step in order.steps.values():
            if step.status == StepStatus.PENDING:
                self.set_status(step, StepStatus.SKIPPED)
            elif step.status == StepStatus.RUNNING and step.wait is not None:
                step.wait = None
                self.set_status(step, StepStatus.DONE if step.applied else StepStatus.SKIPPED)
        if order.state in (S.IN_PROGRESS, S.HELD) and target == Target.FAILED:
            self.set_reason(Reason.COMPENSATING)  # not fallout any more: no operator needed
        self.compensate_next()

    def compensate_next(self) -> None:
        order = self.order
        if self.in_flight():
            return  # outcomes of commands already sent decide what to undo
        if order.state == S.ASSESSING_CANCELLATION:
            self.transition(Ev.CANCEL_ACCEPT, order.state_reason)
        if any(s.comp == Undo.RUNNING for s in order.steps.values()):
            return
        if any(s.comp == Undo.FAILED for s in order.steps.values()):
            return  # held as fallout until an operator acts
        todo = [s for s in order.steps.values()
                if s.applied and s.status == StepStatus.DONE and s.comp is None]
        for step in sorted(todo, key=lambda s: -s.done_seq):
            if not self.defined(step) and not step.op.startswith("await:"):
                self.orphan_undo(step)
                return
            action = self.action(step)
            if action is not None and action.compensate is not None:
                set_undo(step, Undo.RUNNING)
                step.comp_attempts = 1
                self.changed = True
                self.send_comp(step)
                return
        self.finish_compensation()

    def send_comp(self, step: Step) -> None:
        action = self.action(step)
        assert action is not None and action.compensate is not None
        op, template = action.compensate
        args = self.fill(template, step)
        timeout = self.sdef(step).timeout_s
        self.send(step.system, f"{self.command_id(step)}:undo", op, args, timeout)

    def on_comp_result(self, step: Step, res: CommandResult) -> None:
        if step.comp != Undo.RUNNING or (step.retry_at is not None and not res.ok):
            self.stale = True
            return
        self.changed = True
        step.retry_at = None
        policy = self.sdef(step).retry
        if res.ok:
            set_undo(step, Undo.DONE)
            self.set_status(step, StepStatus.COMPENSATED)
            self.compensate_next()
            return
        if self.retry_later(step, res, policy, "comp", step.key):
            return
        set_undo(step, Undo.FAILED)
        order = self.order  # ``previous``: what is being undone, its failure again once
        order.failure = {"step": step.key, "error": step.error, "compensation": True,
                         "previous": fallout.undone(order.failure)}  # this one is settled
        self.hold(Reason.FALLOUT)

    def finish_compensation(self) -> None:
        order = self.order
        if order.target == Target.CANCELLED:
            if order.state == S.HELD:  # every undo settled while held (internal_error)
                self.transition(Ev.CANCEL_ACCEPT, (order.cancel or {}).get("reason"))
            self.transition(Ev.CANCELLED, order.state_reason)
        else:
            failure = order.failure or {}
            code = (failure.get("error") or {}).get("code")
            self.transition(Ev.FAIL, code or (Reason.ABORTED if "aborted_by" in failure
                                              else None))
