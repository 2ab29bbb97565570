"""Moving an order forward: start, resume, launch the steps whose
dependencies are settled, take command results, complete. A mixin of
``oms.engine.Turning`` (see ``oms.engine_base``)."""

from __future__ import annotations

import logging
from typing import Any

from oms import untrusted
from oms.engine_base import TurnBase, id_key
from oms.engine_plan import StepPlan, action_of
from oms.errors import INVALID_REPLY, DomainError
from oms.messages import CommandResult, Send, Sequence, Timer
from oms.model import Step, kept
from oms.order_rules import MAX_AMOUNT_MINOR
from oms.process import StepDef
from oms.states import (
    ITEM_COMPLETED,
    ITEM_FAILED,
    ITEM_IN_PROGRESS,
    ORDER_ACKNOWLEDGED,
    ORDER_HELD,
    ORDER_IN_PROGRESS,
    PHASE_COMPENSATE,
    PHASE_RUN,
    STEP_DONE,
    STEP_FAILED,
    STEP_PENDING,
    STEP_RUNNING,
    STEP_SKIPPED,
    Ev,
    ItemState,
    OrderState,
    Phase,
    Reason,
    StepStatus,
    Target,
    Undo,
    set_item_state,
)

logger = logging.getLogger("oms.engine")
S = OrderState
_new = tuple.__new__  # _new(Send, (...)): as ``oms.engine_base._new``
AMOUNT_OUT_OF_RANGE = "amount_out_of_range"


class RunMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        order = self.order
        if order.state != ORDER_ACKNOWLEDGED:
            self.stale = True
            return
        if order.seq_key and not order.turn:
            return  # the sequencer sends Turn (the order entered its queue at commit)
        self.begin()

    def on_turn(self, go: bool) -> None:
        order = self.order
        if not go:
            if order.state == S.ACKNOWLEDGED:
                self.transition(Ev.WAIT_TURN)
            return
        if order.turn:
            self.stale = True
            return
        order.turn = True
        self.changed = True
        if order.state in (S.ACKNOWLEDGED, S.PENDING):
            self.begin()
        elif order.state.terminal:
            self.emit(Sequence(order.seq_key or "", enter=False))

    def begin(self) -> None:
        if not 0 <= self.total_minor() <= MAX_AMOUNT_MINOR:  # accepted before the bound
            self.order.failure = {"step": None, "error": {
                "code": AMOUNT_OUT_OF_RANGE, "retryable": False,
                "message": f"the order total is outside 0..{MAX_AMOUNT_MINOR} (int64)"}}
            self.begin_compensation(Target.FAILED)  # nothing ran: straight to failed
            return
        self.transition(Ev.START)
        self.start_run()

    def start_run(self) -> None:
        """What starting does after the order's move to inProgress (also when an
        operator resumes an order held before it started)."""
        if self.proc.expected_s:
            self.expect("order", self.proc.expected_s)
        for it in self.order.items:
            set_item_state(it, ITEM_IN_PROGRESS)
        self.advance()

    def on_resume(self) -> None:
        """Re-send what was in flight and re-arm timers, from the snapshot."""
        order = self.order
        if order.state in (S.ACKNOWLEDGED, S.PENDING):
            if order.seq_key and not order.turn:
                return  # the sequencer, rebuilt at start, sends Turn
            if order.state == S.ACKNOWLEDGED:
                self.begin()
                return
        self.resend_in_flight()

    def resend_in_flight(self) -> None:
        """Every command, undo and CRM note in flight is sent again (same
        ``command_id``) and every back-off and deadline re-armed: after a
        restart, or when an order leaves an ``internal_error`` hold (the crash
        may have dropped a reply, which would then never come:
        ``TurnBase.transition`` and ``set_reason`` call it)."""
        order = self.order
        for step in order.steps.values():
            self.resume_step(step)
        self.rearm_jeopardy()
        for idx, note in enumerate(order.notes):
            if note.status == StepStatus.RUNNING and not self.rearm(
                    note, ("note", idx, note.attempts)):
                self.send_note(note, idx)

    def resume_step(self, step: Step) -> None:
        """Its wait deadline, its command or its undo, from the snapshot."""
        if step.wait is not None and step.retry_at is not None:
            self.emit(Timer(step.retry_at, ("wait", step.key, 0)))
        if (step.status == StepStatus.RUNNING and step.wait is None
                and not self.rearm(step, ("retry", step.key, step.attempts))):
            self.send_step(step)
        if step.comp == Undo.RUNNING and not self.defined(step):
            self.orphan_undo(step)
        elif step.comp == Undo.RUNNING and not self.rearm(
                step, ("comp", step.key, step.comp_attempts)):
            self.send_comp(step)

    def rearm(self, step: Step, token: tuple[Any, ...]) -> bool:
        """Re-arm a back-off timer; False: no back-off, send again now."""
        if step.retry_at is None:
            return False
        self.emit(Timer(step.retry_at, token))
        return True

    # -- moving forward ----------------------------------------------------

    def advance(self) -> None:
        """Launch every pending step whose dependencies are settled; complete
        the order once every step is settled. Runs for nearly every message:
        plain loops over the order's ``StepPlan`` (generator expressions cost
        more than the comparisons they wrap)."""
        order = self.order
        phase = order.phase
        if phase == PHASE_COMPENSATE:
            self.compensate_next()
            return
        if phase != PHASE_RUN or order.state not in (ORDER_IN_PROGRESS, ORDER_HELD):
            return
        plan = order.plan  # ``self.step_plan()``, inlined
        if plan is None or plan.defs is not self.defs:
            plan = self.step_plan()
        pending, failed = STEP_PENDING, STEP_FAILED
        for step in plan.orphans:
            if step.status is pending or step.status is failed:
                self.hold_orphan(step)  # oms.orphans
                return
        self.launch_ready(plan)
        if order.phase == PHASE_RUN and self.all_settled(plan.last_first):
            self.complete()

    def launch_ready(self, plan: StepPlan) -> None:
        """Launch the pending steps whose dependencies are settled, in
        definition order."""
        pending, done, skipped, failed = STEP_PENDING, STEP_DONE, STEP_SKIPPED, STEP_FAILED
        partial = self.proc.item_failure == "partial"
        for sdef, group, deps, single in plan.launch:
            if single is not None:  # most definitions: one step (not per item)
                if single.status is not pending:
                    continue
            else:
                for step in group:
                    if step.status is pending:
                        break
                else:
                    continue  # nothing of this step waits to run
            for dep in deps:  # ``all_settled(deps)``, inlined
                status = dep.status
                if status is done or status is skipped or (
                        status is failed and partial and dep.item_id is not None):
                    continue
                break
            else:
                if single is not None:  # (pending: seen above)
                    self.launch(single, sdef)
                    continue
                for step in group:
                    if step.status is pending:
                        self.launch(step, sdef)

    def launch(self, step: Step, sdef: StepDef) -> None:
        if sdef.wait_event is not None:
            self.expect(step.key, sdef.expected_s)
            step.wait = sdef.wait_event
            self.set_status(step, STEP_RUNNING)
            if not self.take_early_event(step) and sdef.wait_timeout_s:
                step.retry_at = self.now + sdef.wait_timeout_s  # the wait's deadline
                self.emit(Timer(step.retry_at, ("wait", step.key, 0)))
            return
        if sdef.expected_s:
            self.expect(step.key, sdef.expected_s)
        # ``sdef`` is the step's definition (``self.sdef(step)``): its action and
        # timeout are read off it, as ``action`` and ``send_step`` would
        action = sdef.action if sdef.per_item is None else action_of(sdef, self.item(step))
        assert action is not None
        args = self.fill(action.args, step)
        step.args = kept(args)  # (each snapshot copies its bytes, and the gateway sends them)
        step.attempts = 1
        self.set_status(step, STEP_RUNNING)
        self.effects.append(_new(Send, (step.system, self.command_id(step), step.op, args,
                                        sdef.timeout_s, step.kept_args())))

    def send_step(self, step: Step) -> None:
        sdef = self.sdef(step)
        args = step.arguments()
        assert args is not None
        self.send(step.system, self.command_id(step), step.op, args, sdef.timeout_s,
                  step.kept_args())

    def complete(self) -> None:
        if self.order.state == ORDER_HELD:  # every step settled while held (internal_error)
            self.transition(Ev.RESUME)
        for it in self.order.items:  # (a loop: a generator costs more than it checks)
            if it["state"] == ITEM_FAILED:
                self.transition(Ev.PARTIAL)
                return
        self.transition(Ev.COMPLETE)

    def finish_items(self, state: OrderState) -> None:
        completed, partial = state == S.COMPLETED, state == S.PARTIAL
        for it in self.order.items:
            if completed or (partial and it["state"] != ITEM_FAILED):
                set_item_state(it, ITEM_COMPLETED)
            elif state == S.CANCELLED:
                set_item_state(it, ItemState.CANCELLED)
            elif state == S.FAILED:
                set_item_state(it, ItemState.FAILED)

    def summary(self) -> dict[str, Any]:
        order = self.order
        return {
            "state": str(order.state),
            "completed_ts": self.now,
            "total_minor": total if 0 <= (total := self.total_minor()) <= MAX_AMOUNT_MINOR
            else None,
            "currency": order.currency,
            "items": [{"id": it["id"], "state": it["state"]} for it in order.items],
            "results": order.results,
        }

    # -- results -----------------------------------------------------------

    def find(self, command_id: str) -> tuple[str, Step | None, int]:
        """Which command an id names: ("step"|"comp"|"note", step, index)."""
        order = self.order
        size = len(order.order_id)  # the id starts with "ORDER:"
        if command_id[size:size + 1] != ":" or not command_id.startswith(order.order_id):
            return "none", None, -1
        rest = command_id[size + 1:]
        kind = "step"
        if ":" in rest:  # a note or an undo (a step's own command has none, as a rule)
            if rest.startswith("notify:"):
                number = rest[7:]
                idx = int(number) if number.isdigit() else -1
                ok = 0 <= idx < len(order.notes)
                return ("note", order.notes[idx], idx) if ok else ("none", None, -1)
            if rest.endswith(":undo"):
                kind, rest = "comp", rest[:-5]
        key, gen = rest, ""
        if "#" in rest:  # an item id may hold "#" too: the last one is the retry
            key, _, gen = rest.rpartition("#")  # generation only if digits follow it
            if not gen.isdigit():
                key, gen = rest, ""
        step = order.steps.get(key)
        if step is None and key.startswith("~"):  # a long key, carried as a digest (id_key)
            step = next((s for s in order.steps.values() if id_key(s.key) == key), None)
        if step is None or step.gen != (int(gen) if gen else 0):
            return "none", None, -1
        return kind, step, -1

    def on_result(self, res: CommandResult) -> None:
        # the reply's fields read once (a NamedTuple's field is a descriptor
        # that Python 3.11 does not specialise: unpacking is cheaper)
        command_id, ok, data, _error, data_fit = res
        kind, step, idx = self.find(command_id)
        if step is None:
            self.stale = True
            return
        # (a gateway's checked data is fit: edge.fit_to_keep)
        problem = untrusted.data_problem({} if data is None else data) if (
            ok and not data_fit) else None
        if problem:  # a contract violation: retried like an outage, never kept
            logger.warning("order %s: reply to %s refused: %s", self.order.order_id,
                           command_id, problem, extra={"order_id": self.order.order_id})
            res = CommandResult(command_id, False, None,
                                DomainError(INVALID_REPLY, f"the reply's {problem}", True))
        if kind == "note":
            self.on_note_result(step, idx, res)
        elif kind == "comp":
            self.on_comp_result(step, res)
        else:
            self.on_step_result(step, res)

    def on_step_result(self, step: Step, res: CommandResult) -> None:
        _command_id, ok, data, _error, _data_fit = res  # read once, as in ``on_result``
        busy = step.status != STEP_RUNNING or step.wait is not None or step.applied
        if busy or (step.retry_at is not None and not ok):
            self.stale = True
            return
        self.changed = True
        if step.retry_at is not None:  # (a msgspec Struct's field is dear to write)
            step.retry_at = None
        if ok:
            self.applied(step, data or {})
        else:
            if self.retry_later(step, res, self.sdef(step).retry, "retry", step.key):
                return
            self.set_status(step, StepStatus.FAILED)
            self.step_failed(step)
        self.advance()

    def applied(self, step: Step, data: dict[str, Any]) -> None:
        order = self.order
        step.result, step.error, step.applied = data, None, True
        order.done_counter += 1
        step.done_seq = order.done_counter
        sdef = self.sdef(step)
        hold = sdef.hold
        if hold and order.phase == PHASE_RUN and data.get(hold.field) == hold.equals:
            step.wait = hold.until_event
            if not self.take_early_event(step):
                self.hold(hold.reason)
            return
        self.step_done(step, sdef)

    def step_done(self, step: Step, sdef: StepDef | None = None) -> None:
        """Done: its results collected, its item completed with its last step
        (``sdef``: the step's definition, ``self.sdef(step)``, if at hand)."""
        self.set_status(step, STEP_DONE)
        if sdef is None:
            sdef = self.sdef(step)
        item = None if step.item_id is None else self.item(step)
        action = sdef.action if sdef.per_item is None else action_of(sdef, item)
        result = step.result
        if action is not None and result is not None:
            results, per_item = self.order.results, step.item_id is not None
            for key, field in action.collect.items():
                value = result.get(field)
                if per_item:
                    results.setdefault(key, []).append(value)
                else:
                    results[key] = value
        if item is not None and self.order.phase == PHASE_RUN:
            mine = [s for s in self.order.steps.values() if s.item_id == step.item_id]
            if all(s.status in (STEP_DONE, STEP_SKIPPED) for s in mine):
                set_item_state(item, ITEM_COMPLETED)

    def step_failed(self, step: Step) -> None:
        order = self.order
        if order.phase != Phase.RUN:
            return
        failure = {"step": step.key, "error": step.error}
        item = self.item(step)
        if item is not None and self.proc.item_failure == "partial":
            set_item_state(item, ItemState.FAILED)
            working = {s.item_id for s in order.steps.values()
                       if s.item_id is not None and s.status != StepStatus.SKIPPED}
            if any(it["state"] != ItemState.FAILED for it in order.items if it["id"] in working):
                return
        order.failure = failure
        if self.proc.failure_policy == "hold":
            self.hold(Reason.FALLOUT)
        else:
            self.fail(failure)

    def hold(self, reason: str) -> None:
        if self.order.state == ORDER_HELD:
            self.set_reason(reason)
        else:
            self.transition(Ev.HOLD, reason)

    def fail(self, failure: dict[str, Any] | None) -> None:
        if failure is not None:
            self.order.failure = failure
        self.begin_compensation(Target.FAILED)
