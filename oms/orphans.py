"""Stored orders under a changed process definition (issue 12, defect 18).

An order keeps the steps it was created with. When the definition changes
(a step removed or renamed, a per-item action removed, a wait turned into a
command) an order's step may have no definition any more: an *orphan*. It
must never crash the order. The rules, a mixin of ``oms.engine.Turning``
(see ``oms.engine_base``):

- An orphan that is running finishes as its command's outcome says (default
  timeout and retry policy); an orphan wait still takes its event.
- An orphan that has still to run, or failed, puts the order in fallout with
  error ``definition_changed``: the operator does it by hand and skips it,
  or aborts. It is never sent (its arguments are unknown).
- An applied orphan cannot be undone automatically: its undo goes to
  fallout the same way (an orphan wait has nothing to undo).
- Dependencies on steps the order does not have are met (steps added to a
  definition apply to new orders only).
"""

from __future__ import annotations

from typing import Any

from oms.engine_base import TurnBase
from oms.fallout import DEFINITION_CHANGED
from oms.model import Step
from oms.process import RetryPolicy, StepDef
from oms.states import OrderState, Phase, Reason, StepStatus, Undo, set_undo

S = OrderState


def _orphan_def(name: str) -> StepDef:
    return StepDef(name, (), None, None, None, None, None, 5.0, RetryPolicy(), None, None)


def defined_in(sdef: StepDef | None, step: Step) -> bool:
    """Whether ``step`` (as stored) still fits its definition."""
    if sdef is None:
        return False
    if step.op.startswith("await:"):
        return sdef.wait_event is not None
    if step.item_id is not None:
        if sdef.per_item is None:
            return False
        return step.op == "none" or any(a.op == step.op for a in sdef.per_item.values())
    return sdef.action is not None and sdef.action.op == step.op


class OrphanMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    def defined(self, step: Step) -> bool:
        key = (step.name, step.op, step.item_id is None)
        known = self.known.get(key)
        if known is None:
            known = self.known[key] = defined_in(self.defs.get(step.name), step)
        return known

    def sdef(self, step: Step) -> StepDef:
        """The step's definition, or an empty one for an orphan (by the
        stored step's shape, once per engine)."""
        key = (step.name, step.op, step.item_id is None)
        sdef = self.sdefs.get(key)
        if sdef is None:
            sdef = self.sdefs[key] = (self.defs[step.name] if self.defined(step)
                                      else _orphan_def(step.name))
        return sdef

    def check_orphans(self) -> bool:
        """Hold the order for the first orphan that has still to run or
        failed; True if the order is (now) held for one."""
        order = self.order
        if order.phase != Phase.RUN or order.state not in (S.IN_PROGRESS, S.HELD):
            return False
        pending, failed = StepStatus.PENDING, StepStatus.FAILED
        for step in order.steps.values():
            if (step.status is pending or step.status is failed) and not self.defined(step):
                self.hold_orphan(step)
                return True
        return False

    def hold_orphan(self, step: Step) -> None:
        """Fallout for an orphan that has still to run or failed (once)."""
        order = self.order
        failure = order.failure or {}
        code = (failure.get("error") or {}).get("code")
        if not (order.state == S.HELD and failure.get("step") == step.key
                and code == DEFINITION_CHANGED):
            order.failure = {"step": step.key, "error": self.orphan_error(step)}
            if step.error is not None:
                order.failure["earlier_error"] = step.error
            self.changed = True
            self.hold(Reason.FALLOUT)

    def orphan_error(self, step: Step) -> dict[str, Any]:
        return {"code": DEFINITION_CHANGED, "retryable": False,
                "message": f"step {step.key} ({step.op}) is not in the current definition of "
                           f"{self.order.order_type!r}: it was removed or changed"}

    def orphan_undo(self, step: Step) -> None:
        """An applied orphan's undo is unknown: fallout for an operator."""
        step.retry_at = None
        set_undo(step, Undo.FAILED)
        step.error = self.orphan_error(step)
        self.order.failure = {"step": step.key, "error": step.error, "compensation": True}
        self.changed = True
        self.hold(Reason.FALLOUT)
