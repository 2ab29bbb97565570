"""Operator actions and jeopardy: the parts of the engine that people drive
or watch. Mixed into ``oms.engine.Turning``; pure like the rest of it.

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

from oms.messages import Operate, Publish, Reply, Timer
from oms.model import Step
from oms.states import Ev, OrderState, StepStatus

S = OrderState


class OperatorMixin:
    """Needs the attributes and helpers of ``oms.engine.Turning``."""

    order: Any
    proc: Any
    defs: Any
    now: float
    changed: bool
    stale: bool

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
                              "operator": msg.operator, "reason": msg.reason or ""})
        self.changed = True
        if msg.action == "abort":
            order.failure = dict(order.failure or {}, aborted_by=msg.operator)
            self.begin_compensation("failed")
        else:
            self.operate_on_failed(msg)
        answer("operator_accepted", state=str(order.state))

    def operate_problem(self, msg: Operate) -> str | None:
        order = self.order
        if msg.action not in ("retry", "skip", "abort"):
            return f"unknown action {msg.action!r}"
        if order.state.terminal:
            return f"order is already {order.state}"
        if msg.action == "abort":
            return "order is already being compensated" if order.phase != "run" else None
        if order.state != S.HELD or order.state_reason != "fallout" or not order.failure:
            return "only an order held as fallout has a failed step to retry or skip"
        failed = order.steps.get(order.failure["step"])
        if failed is None:
            return "the failed step is unknown"
        if order.failure.get("compensation"):
            if failed.comp != "failed":
                return "the failed compensation is already being retried"
        elif order.phase != "run":
            return "order is being compensated"
        if msg.action == "skip" and msg.step and msg.step != order.failure["step"]:
            return f"step {msg.step!r} is not the failed step {order.failure['step']!r}"
        return None

    def operate_on_failed(self, msg: Operate) -> None:
        order = self.order
        step: Step = order.steps[order.failure["step"]]
        compensation = bool(order.failure.get("compensation"))
        order.failure = None
        step.error = None
        if compensation:  # a compensation failed for good
            step.gen += 1
            step.comp = "done" if msg.action == "skip" else "running"
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
        else:
            step.gen += 1
            step.status, step.attempts = StepStatus.PENDING, 0
            self.launch(step, self.defs[step.name])
        self.transition_back()
        self.advance()

    def transition_back(self) -> None:
        if self.order.state == S.HELD:
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
        expected = (self.proc.expected_s if key == "order"
                    else self.defs[step.name].expected_s)
        late = max(0.0, self.now - entry[0])
        self.emit(Publish({"type": "order_jeopardy", "order_id": order.order_id,
                           "external_id": order.external_id, "step": key,
                           "expected_s": expected, "late_s": late, "ts": self.now}))
        what = "the order" if key == "order" else f"step {key}"
        self.notify_crm(f"jeopardy:{key}", str(order.state),
                        f"Order {order.external_id} is in jeopardy: {what} has run past "
                        f"its expected {expected:g} s")
