"""What every part of a turn of the engine shares: the order, the effects,
and the choke points through which each kind of order state changes.

``TurnBase`` holds one message's worth of work on one order. The parts of
the engine (``oms.engine_run``, ``oms.engine_events``, ``oms.engine_undo``,
``oms.engine_notes``, ``oms.operator``, ``oms.orphans``) are mixins of it,
assembled into ``oms.engine.Turning``; the methods one part calls in another
are declared here (below "seams"), so each part is typed on its own.

State changes, each in one place:
- order state (and its reason): ``transition`` (``oms.states.next_state``);
- ``state_reason`` alone, while the order stays held: ``set_reason``;
- a step's status: ``set_status`` (``oms.states.set_step_status``, plus its
  ``order_progress`` event);
- an item's state: ``oms.states.set_item_state``; a step's undo:
  ``oms.states.set_undo``; the phase: ``oms.states.set_phase``.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import TYPE_CHECKING, Any

from msgspec import Raw

from oms import states, untrusted
from oms.engine_plan import StepPlan, action_of
from oms.errors import CIRCUIT_OPEN, DomainError
from oms.messages import CommandResult, Effect, Publish, Send, Sequence, Timer
from oms.model import Order, Step
from oms.outstanding import forward_in_flight
from oms.process import Action, ProcessDef, RetryPolicy, StepDef
from oms.states import (
    ORDER_HELD,
    PHASE_FINISH,
    REASON_INTERNAL_ERROR,
    STEP_DONE,
    STEP_FAILED,
    STEP_SKIPPED,
    Ev,
    OrderState,
    StepStatus,
    set_step_status,
)
from oms.templates import Template

if TYPE_CHECKING:
    from oms.engine import Engine

S = OrderState
_new = tuple.__new__
"""``_new(Publish, (payload,))``: an effect without the Python frame of its
NamedTuple's generated ``__new__`` (which does only this; ``oms.edge`` and
``actors`` do the same), about 200 ns less each, some 20 effects an order."""


MAX_KEY_IN_ID = 200
"""Longest step key a command id carries as it is: a per-item step's key holds
its item id (up to 1,000 characters), and a reply's ``command_id`` may have
1,000 at most (contract §3); a longer key is carried as a digest."""


def id_key(key: str) -> str:
    """A step's key as its command ids carry it (``Turning.find`` maps it back)."""
    if len(key) <= MAX_KEY_IN_ID:
        return key
    return "~" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                 digest_size=16).hexdigest()


def _spread(command_id: str, attempt: int) -> float:
    """Deterministic jitter in [0, 1): pure, yet different per command."""
    return zlib.crc32(f"{command_id}/{attempt}".encode()) / 2**32


class TurnBase:
    """One message's worth of work on one order.

    effects: what to do once the new snapshot is durable.
    changed: whether the order changed (and so must be persisted).
    stale: the message matched nothing (a late or duplicate reply).

    Slotted, as each part (mixin) and ``Turning`` are (``__slots__ = ()``):
    one is made per message, and a slotted object is made and read faster
    than one with a ``__dict__`` (about 300 ns less a message).
    """

    __slots__ = ("changed", "defs", "effects", "known", "now", "order", "proc", "sdefs",
                 "stale", "templates")

    def __init__(self, engine: Engine, order: Order, now: float,
                 effects: list[Effect] | None = None) -> None:
        self.proc: ProcessDef = engine.proc
        self.defs: dict[str, StepDef] = engine.defs
        self.known: dict[tuple[str, str, bool], bool] = engine.known
        self.sdefs: dict[tuple[str, str, bool], StepDef] = engine.sdefs
        self.templates = engine.templates
        self.order = order
        self.now = now
        self.effects: list[Effect] = [] if effects is None else effects
        self.changed = False
        self.stale = False

    def emit(self, effect: Effect) -> None:
        self.effects.append(effect)

    # -- the choke points ----------------------------------------------------

    def transition(self, event: Ev, reason: str | None = None) -> None:
        """The order's one state-change path: table, history, event, CRM."""
        order = self.order
        old = order.state
        new = states.next_state(old, event)
        crashed = old == ORDER_HELD and order.state_reason == REASON_INTERNAL_ERROR
        reason = None if reason is None else str(reason)
        order.state = new
        states.set_reason(order, reason)
        text = new._value_  # its plain string, shared (``str(new)`` makes a copy each time)
        entry: dict[str, Any] = {"state": text, "ts": self.now}
        if reason:
            entry["reason"] = reason
        order.history.append(entry)
        self.changed = True
        payload: dict[str, Any] = {
            "type": "order_state", "order_id": order.order_id,
            "external_id": order.external_id, "state": text,
            "previous_state": str(old), "ts": self.now,
        }
        if reason:
            payload["state_reason"] = reason
        self.effects.append(_new(Publish, (payload,)))
        if crashed and new != ORDER_HELD:  # it leaves the internal_error hold:
            self.resend_in_flight()  # a reply the crash dropped would never come
        if new in states.TERMINAL:
            self.finish_items(new)
            states.set_phase(order, PHASE_FINISH)
            order.summary = self.summary()
            self.effects.append(_new(Publish, ({
                "type": "order_summary", "order_id": order.order_id,
                "external_id": order.external_id, "summary": order.summary},)))
            if order.seq_key:  # with or without its turn: a pending order leaves too
                self.emit(Sequence(order.seq_key, enter=False))
        if text in self.proc.notify_states:
            self.notify(new, old)

    def set_reason(self, reason: str) -> None:
        """A held order stays held for another reason: ``oms.states.set_reason``."""
        crashed = self.order.state_reason == REASON_INTERNAL_ERROR
        states.set_reason(self.order, reason)
        self.changed = True
        if crashed and reason != REASON_INTERNAL_ERROR:  # as in ``transition``
            self.resend_in_flight()

    def set_status(self, step: Step, status: StepStatus) -> None:
        set_step_status(step, status)
        self.changed = True
        if step.name == "notify":
            return
        order = self.order
        self.effects.append(_new(Publish, ({
            "type": "order_progress", "order_id": order.order_id,
            "external_id": order.external_id, "step": step.key, "status": status._value_,
            "ts": self.now},)))  # (``_value_``: the member's own plain string, not a copy)

    # -- reading the order -------------------------------------------------

    def command_id(self, step: Step) -> str:
        key = step.key
        base = f"{self.order.order_id}:{key if len(key) <= MAX_KEY_IN_ID else id_key(key)}"
        return f"{base}#{step.gen}" if step.gen else base

    def total_minor(self) -> int:
        """``order.total_minor``, kept with the order's facts that never change
        (``StepPlan.facts``: an order's items and their prices are fixed)."""
        facts = self.step_plan().facts
        total = facts.get("total_minor")
        if total is None:
            total = facts["total_minor"] = self.order.total_minor
        return total

    def item(self, step: Step) -> dict[str, Any] | None:
        if step.item_id is None:
            return None
        return next(it for it in self.order.items if it["id"] == step.item_id)

    def action(self, step: Step) -> Action | None:
        sdef = self.sdef(step)
        return action_of(sdef, self.item(step)) if sdef.per_item is not None else sdef.action

    def fill(self, template: Any, step: Step | None = None) -> Any:
        """A template filled from what it may name (``oms.templates``): only
        the scopes, the order's facts and the steps' results it names are
        built, and it is parsed once per engine."""
        parsed = self.templates.get(id(template))
        if parsed is None:
            parsed = self.templates[id(template)] = Template(template)
        scopes: dict[str, Any] = {}
        if parsed.names_order:
            order = self.order
            plan = order.plan  # ``self.step_plan()``, inlined
            if plan is None or plan.defs is not self.defs:
                plan = self.step_plan()
            scopes["order"] = parsed.order_scope(order, plan.facts)
        if parsed.names_steps:
            steps, wanted = self.order.steps, parsed.steps
            if wanted is None:
                scopes["steps"] = {k: s.result for k, s in steps.items() if s.result is not None}
            else:  # (a loop: a comprehension is a call of its own)
                results = scopes["steps"] = {}
                for k in wanted:
                    s = steps.get(k)
                    if s is not None and s.result is not None:
                        results[k] = s.result
        if step is not None and parsed.names_own:
            names = parsed.scopes
            if "item" in names:
                scopes["item"] = self.item(step)
            if "result" in names:
                scopes["result"] = step.result or {}
            if "args" in names:
                scopes["args"] = step.arguments() or {}
        return parsed.fill(scopes)

    def step_plan(self) -> StepPlan:
        """The order's ``StepPlan`` under this engine (kept on the order)."""
        plan = self.order.plan
        if plan is None or plan.defs is not self.defs:
            plan = self.order.plan = StepPlan(self)
        return plan

    def steps_of(self, name: str) -> list[Step]:
        return [s for s in self.order.steps.values() if s.name == name]

    def settled(self, step: Step) -> bool:
        status = step.status
        if status is STEP_DONE or status is STEP_SKIPPED:
            return True
        return (status is STEP_FAILED and self.proc.item_failure == "partial"
                and step.item_id is not None)

    def all_settled(self, steps: list[Step]) -> bool:
        """``settled`` for each of ``steps`` (inlined: it runs for nearly every
        message)."""
        done, skipped, failed = STEP_DONE, STEP_SKIPPED, STEP_FAILED
        partial = self.proc.item_failure == "partial"
        for step in steps:
            status = step.status
            if status is done or status is skipped:
                continue
            if status is failed and partial and step.item_id is not None:
                continue
            return False
        return True

    def in_flight(self) -> bool:
        """A forward command was sent whose outcome is not known yet
        (``oms.outstanding``)."""
        return forward_in_flight(self.order)

    # -- commands and retries ----------------------------------------------

    def send(self, system: str, command_id: str, op: str, args: dict[str, Any],
             timeout: float, raw: Raw | None = None) -> None:
        """``raw``: a step's kept arguments (``Step.kept_args``), if any."""
        self.effects.append(_new(Send, (system, command_id, op, args, timeout, raw)))

    def retry_later(self, step: Step, res: CommandResult, policy: RetryPolicy, kind: str,
                    ref: Any) -> bool:
        """Arm a retry timer if the error allows one; False: failed for good.

        ``circuit_open`` (the gateway's breaker) waits for its ``retry_after``
        and costs no attempt: an outage of a domain system makes orders wait.
        The jitter is derived from the command's id (``res.command_id``, the
        id ``find`` matched to this step, undo or note).
        """
        command_id = res.command_id
        error = res.error or DomainError("unknown", "no error given", False)
        attr = "comp_attempts" if kind == "comp" else "attempts"
        attempt = getattr(step, attr)
        first_block = (step.error or {}).get("code") != CIRCUIT_OPEN
        step.error = error.to_wire()
        if error.code == CIRCUIT_OPEN:
            data = res.data if isinstance(res.data, dict) else {}
            wait = untrusted.retry_after(data.get("retry_after"))
            step.retry_at = self.now + wait * (1 + 0.2 * _spread(command_id, attempt))
            attempt -= 1  # the re-send after the wait reuses this attempt's number
            setattr(step, attr, attempt)
            if first_block and kind == "retry":
                self.emit(Publish({"type": "order_progress", "order_id": self.order.order_id,
                                   "external_id": self.order.external_id, "step": step.key,
                                   "status": str(step.status), "ts": self.now,
                                   "breaker": "open", "system": step.system}))
        elif error.retryable and attempt < policy.max_attempts:
            step.retry_at = self.now + policy.delay(attempt, _spread(command_id, attempt))
        else:
            return False
        self.emit(Timer(step.retry_at, (kind, ref, attempt)))
        return True

    # -- seams: implemented by the parts (see the module docstring); declared
    # here only, so that each part is typed on its own and none shadows another

    def advance(self) -> None:
        raise NotImplementedError  # oms.engine_run

    def launch(self, step: Step, sdef: StepDef) -> None:
        raise NotImplementedError  # oms.engine_run

    def send_step(self, step: Step) -> None:
        raise NotImplementedError  # oms.engine_run

    def step_done(self, step: Step, sdef: StepDef | None = None) -> None:
        raise NotImplementedError  # oms.engine_run

    def step_failed(self, step: Step) -> None:
        raise NotImplementedError  # oms.engine_run

    def hold(self, reason: str) -> None:
        raise NotImplementedError  # oms.engine_run

    def on_resume(self) -> None:
        raise NotImplementedError  # oms.engine_run

    def start_run(self) -> None:
        raise NotImplementedError  # oms.engine_run

    def resend_in_flight(self) -> None:
        raise NotImplementedError  # oms.engine_run

    def fail(self, failure: dict[str, Any] | None) -> None:
        raise NotImplementedError  # oms.engine_run

    def finish_items(self, state: OrderState) -> None:
        raise NotImplementedError  # oms.engine_run

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError  # oms.engine_run

    def on_comp_result(self, step: Step, res: CommandResult) -> None:
        raise NotImplementedError  # oms.engine_undo

    def on_note_result(self, note: Step, idx: int, res: CommandResult) -> None:
        raise NotImplementedError  # oms.engine_notes

    def on_jeopardy(self, key: str) -> None:
        raise NotImplementedError  # oms.operator

    def consume(self, step: Step, data: dict[str, Any]) -> None:
        raise NotImplementedError  # oms.engine_events

    def take_early_event(self, step: Step) -> bool:
        raise NotImplementedError  # oms.engine_events

    def begin_compensation(self, target: states.Target) -> None:
        raise NotImplementedError  # oms.engine_undo

    def compensate_next(self) -> None:
        raise NotImplementedError  # oms.engine_undo

    def send_comp(self, step: Step) -> None:
        raise NotImplementedError  # oms.engine_undo

    def notify(self, state: OrderState, previous: OrderState) -> None:
        raise NotImplementedError  # oms.engine_notes

    def notify_crm(self, key: str, state: str, message: str) -> None:
        raise NotImplementedError  # oms.engine_notes

    def send_note(self, note: Step, idx: int, args: dict[str, Any] | None = None) -> None:
        raise NotImplementedError  # oms.engine_notes

    def expect(self, key: str, expected_s: float | None) -> None:
        raise NotImplementedError  # oms.operator (jeopardy)

    def rearm_jeopardy(self) -> None:
        raise NotImplementedError  # oms.operator (jeopardy)

    def defined(self, step: Step) -> bool:
        raise NotImplementedError  # oms.orphans

    def sdef(self, step: Step) -> StepDef:
        raise NotImplementedError  # oms.orphans

    def check_orphans(self) -> bool:
        raise NotImplementedError  # oms.orphans

    def hold_orphan(self, step: Step) -> None:
        raise NotImplementedError  # oms.orphans

    def orphan_undo(self, step: Step) -> None:
        raise NotImplementedError  # oms.orphans
