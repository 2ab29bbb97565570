"""What an operator may do with an order, and the ``fallout`` block of the
order view. Pure functions of the order's data (and the point of no return
of its process), so the engine's answers and the view's ``actions`` are the
same rules, written once.

- ``retry``: a ``held`` order. With a failed step (or failed compensation)
  that step runs again; without one (``internal_error``) the order resumes
  from its last durable snapshot.
- ``skip``: the failed step, or a step that waits for a domain event (a
  stranded wait, or the wait that holds an order ``awaiting_stock``).
- ``abort``: any unfinished order that is not compensating already.
- ``cancel``: as a channel's ``cancel_order``: before the point of no return.
"""

from __future__ import annotations

from typing import Any

from oms.states import OrderState, Phase, Reason, StepStatus, Undo

S = OrderState
ACTIONS = ("retry", "skip", "abort", "cancel")
DEFINITION_CHANGED = "definition_changed"


def failed_step(order: Any) -> Any:
    """The step named by ``order.failure``, if it still exists."""
    key = (order.failure or {}).get("step")
    return order.steps.get(key) if isinstance(key, str) else None


def undone(failure: Any) -> Any:
    """The failure an order's compensation undoes (a failed step, an abort),
    or None (a cancel), below any failed undo or ``internal_error`` hold
    recorded over it since (each keeps it as ``previous``); an aborted one
    is what it undoes, whatever the abort was of."""
    while isinstance(failure, dict) and "aborted_by" not in failure and (
            failure.get("compensation") or (failure.get("step") is None and (
                failure.get("error") or {}).get("code") == Reason.INTERNAL_ERROR)):
        failure = failure.get("previous")
    return failure


def waiting_steps(order: Any) -> list[Any]:
    """Steps waiting for a domain event (a wait step or a hold)."""
    return [s for s in order.steps.values() if s.status == StepStatus.RUNNING and s.wait]


def skip_target(order: Any, name: str | None) -> tuple[Any, str | None]:
    """The step a ``skip`` would act on, or why there is none."""
    failed = failed_step(order)
    if name is not None:
        step = order.steps.get(name)
        if step is None:
            return None, f"no step {name!r:.100} in this order"
        if step is failed or step in waiting_steps(order):
            return step, None
        if failed is not None:
            return None, f"step {name!r} is not the failed step {failed.key!r}"
        return None, f"step {name!r} has not failed and waits for no event"
    if failed is not None:
        return failed, None
    waits = waiting_steps(order)
    if order.state == S.HELD and len(waits) == 1:
        return waits[0], None
    if waits:
        return None, "name the step to skip: " + ", ".join(s.key for s in waits)
    return None, "no failed step and no step waiting for an event to skip"


def cancel_problem(order: Any, ponr: str | None) -> str | None:
    if order.state.terminal:
        return f"order is already {order.state}"
    if order.phase != Phase.RUN:
        return "order is already being cancelled or compensated"
    if ponr and any(s.name == ponr and s.status not in (StepStatus.PENDING, StepStatus.SKIPPED)
                    for s in order.steps.values()):
        return "point_of_no_return"
    return None


def problem(order: Any, action: str, step: str | None = None,
            ponr: str | None = None) -> str | None:
    """Why ``action`` is refused for this order now; None if it is allowed."""
    if action not in ACTIONS:
        return f"unknown action {action!r:.100}"
    if step is not None and not isinstance(step, str):
        return "step must be a string"
    if action == "cancel":
        return cancel_problem(order, ponr)
    if order.state.terminal:
        return f"order is already {order.state}"
    failed = failed_step(order)
    undo_failed = failed is not None and bool(order.failure.get("compensation"))
    if action == "abort":
        if undo_failed:
            return (f"undoing step {failed.key} failed and abort cannot undo it: retry the "
                    f"undo (retry_step), or undo it by hand and skip it (skip_step)")
        return "order is already being compensated" if order.phase != Phase.RUN else None
    if action == "retry":
        if order.state != S.HELD:
            return f"only a held order can be retried; this one is {order.state}"
        if failed is None:
            if order.state_reason == Reason.INTERNAL_ERROR:
                return None  # resumes from its last durable snapshot
            waits = waiting_steps(order)
            if waits:
                return (f"the order waits for event {waits[0].wait} from "
                        f"{waits[0].system}; nothing to retry: skip the wait or abort")
            return "only an order held as fallout has a failed step to retry"
        if (order.failure.get("error") or {}).get("code") == DEFINITION_CHANGED:
            return (f"step {failed.key} is not in the current process definition: skip it "
                    f"(after doing it by hand) or abort")
        if undo_failed:
            return None if failed.comp == Undo.FAILED else (
                "the failed compensation is already being retried")
        return "order is being compensated" if order.phase != Phase.RUN else None
    # skip
    if undo_failed:
        if step is not None and step != failed.key:
            return f"step {step!r} is not the failed step {failed.key!r}"
        return None if failed.comp == Undo.FAILED else (
            "the failed compensation is already being retried")
    if order.phase != Phase.RUN:
        return "order is being compensated"
    return skip_target(order, step)[1]


def _hint(order: Any, step: Any, actions: list[str]) -> str:
    reason = order.state_reason
    failure = order.failure or {}
    code = (failure.get("error") or {}).get("code")
    if step is not None and failure.get("compensation"):
        return (f"Undoing step {step.key} failed ({code}): retry the undo once its cause is "
                f"fixed, or undo it by hand and skip it; abort is not possible.")
    if code == DEFINITION_CHANGED:
        return (f"Step {step.key if step else '?'} is not in the current process definition: "
                f"do it by hand and skip it, or abort to undo the completed steps.")
    if step is not None and step.status == StepStatus.FAILED:
        return (f"Step {step.key} failed ({code}): retry it once the cause is fixed, skip it "
                f"if it was done by hand, or abort to undo the completed steps.")
    if reason == Reason.INTERNAL_ERROR:
        return ("The service failed while handling this order: retry resumes it from its "
                "last saved state" + ("; abort undoes the completed steps." if "abort" in actions
                                      else "."))
    if step is not None and step.wait:
        return (f"The order waits for event {step.wait} from {step.system}: wait for it, skip "
                f"the wait if it was settled by hand, or " + (
                    "cancel or abort." if "cancel" in actions else "abort."))
    if reason == Reason.COMPENSATING or order.phase != Phase.RUN:
        return "Completed steps are being undone; no action is needed."
    return "Actions possible now: " + (", ".join(actions) or "none") + "."


def fallout_view(order: Any, ponr: str | None = None) -> dict[str, Any] | None:
    """The ``fallout`` block of the order view while the order is held."""
    if order.state != S.HELD:
        return None
    failure = order.failure or {}
    step = failed_step(order)
    if step is None:
        waits = [s for s in waiting_steps(order) if s.applied] or waiting_steps(order)
        step = waits[0] if waits else None
    error = failure.get("error")
    actions = [a for a in ACTIONS if problem(order, a, None, ponr) is None]
    return {
        "step": step.key if step is not None else None,
        "item": step.item_id if step is not None else None,
        "compensation": bool(failure.get("compensation")),
        "error": ({"code": error.get("code"), "message": error.get("message")}
                  if isinstance(error, dict) else None),
        "reason": order.state_reason,
        "actions": actions,
        "hint": _hint(order, step, actions),
    }
