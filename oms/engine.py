"""The process engine: one order, one message, a list of effects. Pure.

``Engine(proc).handle(order, message, now)`` mutates the order in place and
returns the effects to carry out *after* the new snapshot is persisted
(send a command, publish an event, arm a timer, reply). It never does I/O and
never reads a clock: ``now`` comes in. Every order state change goes through
``oms.states.next_state`` (the one transition table).

Command ids are derived from persisted data only, so they are the same on
every retry and after a restart (contract §3):
``ORDER:STEP`` (``#GEN`` appended after an operator re-run),
``ORDER:STEP:undo`` for its compensation, ``ORDER:notify:N`` for CRM.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from oms import fallout, untrusted
from oms.errors import CIRCUIT_OPEN, DomainError
from oms.messages import (
    Cancel,
    CommandResult,
    DomainEvent,
    Operate,
    Publish,
    Reply,
    Resume,
    Send,
    Sequence,
    Start,
    Timer,
    TimerFired,
    Turn,
)
from oms.model import Order, Step
from oms.operator import OperatorMixin
from oms.orphans import OrphanMixin
from oms.process import Action, ProcessDef, RetryPolicy, StepDef
from oms.states import Ev, ItemState, OrderState, StepStatus, next_state
from oms.templates import lookup, order_facts, resolve
from oms.validation import MAX_AMOUNT_MINOR

logger = logging.getLogger(__name__)
S = OrderState
INTERNAL_ERROR = "internal_error"  # state_reason of an order whose handler raised
OPERATOR_HOLDS = ("fallout", INTERNAL_ERROR)  # only an operator ends these
INVALID_REPLY = "invalid_reply"
AMOUNT_OUT_OF_RANGE = "amount_out_of_range"
MAX_EARLY_EVENTS = 16
MAX_EARLY_BYTES = 64 * 1024  # early events kept per order, encoded
MAX_REASON = 1000  # a cancel reason kept in the order, in characters


def new_order(order_id: str, req: dict[str, Any], proc: ProcessDef, now: float) -> Order:
    """The order as acknowledged: its items and its expanded step list."""
    items = [dict(it, state=str(ItemState.ACKNOWLEDGED)) for it in req["items"]]
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
        history=[{"state": str(S.ACKNOWLEDGED), "ts": now}],
    )
    for sdef in proc.steps:
        if sdef.per_item is not None:
            for it in items:
                action = sdef.per_item.get(it["action"])
                key = f"{sdef.name}[{it['id']}]"
                step = Step(key, sdef.name, action.system if action else "",
                            action.op if action else "none", item_id=it["id"])
                if action is None:
                    step.status = StepStatus.SKIPPED
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


def _spread(command_id: str, attempt: int) -> float:
    """Deterministic jitter in [0, 1): pure, yet different per command."""
    return zlib.crc32(f"{command_id}/{attempt}".encode()) / 2**32


class Engine:
    """Runs orders of one process definition."""

    def __init__(self, proc: ProcessDef) -> None:
        self.proc = proc
        self.defs = {s.name: s for s in proc.steps}
        self.known: dict[tuple[str, str, bool], bool] = {}  # see oms.orphans

    def handle(self, order: Order, msg: Any, now: float) -> Turning:
        """Apply one message; the returned ``Turning`` holds the effects."""
        turning = Turning(self, order, now)
        turning.handle(msg)
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
    if order.state.terminal:  # finished, only notices still out: nothing to hold
        turning.stale = True
        return turning
    order.failure = {"step": None, "previous": order.failure,
                     "error": {"code": INTERNAL_ERROR, "message": error[:500],
                               "retryable": False}}
    if any(isinstance(m, Turn) and m.go for m in dropped):
        order.turn = True
    if order.state == S.HELD:
        order.state_reason = INTERNAL_ERROR
        order.history.append({"state": str(S.HELD), "ts": now, "reason": INTERNAL_ERROR})
    else:
        turning.transition(Ev.HOLD, INTERNAL_ERROR)
    turning.changed = True
    order.updated_ts, order.version = now, order.version + 1
    return turning


class Turning(OperatorMixin, OrphanMixin):
    """One message's worth of work on one order.

    effects: what to do once the new snapshot is durable.
    changed: whether the order changed (and so must be persisted).
    stale: the message matched nothing (a late or duplicate reply).
    """

    def __init__(self, engine: Engine, order: Order, now: float) -> None:
        self.proc = engine.proc
        self.defs = engine.defs
        self.known = engine.known
        self.order = order
        self.now = now
        self.effects: list[Any] = []
        self.changed = False
        self.stale = False

    # -- dispatch ----------------------------------------------------------

    def handle(self, msg: Any) -> None:
        if isinstance(msg, Resume | Operate):
            self.check_orphans()  # after a definition change (oms.orphans)
        if isinstance(msg, CommandResult):
            self.on_result(msg)
        elif isinstance(msg, DomainEvent):
            self.on_event(msg)
        elif isinstance(msg, TimerFired):
            self.on_timer(msg.token)
        elif isinstance(msg, Start):
            self.on_start()
        elif isinstance(msg, Turn):
            self.on_turn(msg.go)
        elif isinstance(msg, Cancel):
            self.on_cancel(msg)
        elif isinstance(msg, Operate):
            self.on_operate(msg)
        elif isinstance(msg, Resume):
            self.on_resume()
        else:
            raise TypeError(f"an order cannot handle {type(msg).__name__}")
        if self.changed:
            self.order.updated_ts = self.now
            self.order.version += 1

    # -- helpers -----------------------------------------------------------

    def emit(self, effect: Any) -> None:
        self.effects.append(effect)

    def transition(self, event: Ev, reason: str | None = None) -> None:
        """The order's one state-change path: table, history, event, CRM."""
        order = self.order
        old = order.state
        new = next_state(old, event)
        order.state, order.state_reason = new, reason
        entry: dict[str, Any] = {"state": str(new), "ts": self.now}
        if reason:
            entry["reason"] = reason
        order.history.append(entry)
        self.changed = True
        payload: dict[str, Any] = {
            "type": "order_state", "order_id": order.order_id,
            "external_id": order.external_id, "state": str(new),
            "previous_state": str(old), "ts": self.now,
        }
        if reason:
            payload["state_reason"] = reason
        self.emit(Publish(payload))
        if new.terminal:
            self.finish_items(new)
            order.phase = "finish"
            order.summary = self.summary()
            self.emit(Publish({"type": "order_summary", "order_id": order.order_id,
                               "external_id": order.external_id, "summary": order.summary}))
            if order.seq_key:  # with or without its turn: a pending order leaves too
                self.emit(Sequence(order.seq_key, enter=False))
        if str(new) in self.proc.notify_states:
            self.notify(new, old)

    def set_status(self, step: Step, status: StepStatus) -> None:
        step.status = status
        self.changed = True
        if step.name == "notify":
            return
        self.emit(Publish({"type": "order_progress", "order_id": self.order.order_id,
                           "external_id": self.order.external_id, "step": step.key,
                           "status": str(status), "ts": self.now}))

    def command_id(self, step: Step) -> str:
        base = f"{self.order.order_id}:{step.key}"
        return f"{base}#{step.gen}" if step.gen else base

    def item(self, step: Step) -> dict[str, Any] | None:
        if step.item_id is None:
            return None
        return next(it for it in self.order.items if it["id"] == step.item_id)

    def action(self, step: Step) -> Action | None:
        sdef = self.sdef(step)
        if sdef.per_item is not None:
            item = self.item(step)
            return sdef.per_item.get(item["action"]) if item else None
        return sdef.action

    def scopes(self, step: Step | None = None) -> dict[str, Any]:
        steps = {k: s.result for k, s in self.order.steps.items() if s.result is not None}
        out: dict[str, Any] = {"order": order_facts(self.order), "steps": steps}
        if step is not None:
            out["item"] = self.item(step)
            out["result"] = step.result or {}
            out["args"] = step.args or {}
        return out

    def send(self, system: str, command_id: str, op: str, args: dict[str, Any],
             timeout: float) -> None:
        self.emit(Send(system, command_id, op, args, timeout))

    def retry_later(self, step: Step, res: CommandResult, policy: RetryPolicy, command_id: str,
                    kind: str, ref: Any) -> bool:
        """Arm a retry timer if the error allows one; False: failed for good.

        ``circuit_open`` (the gateway's breaker) waits for its ``retry_after``
        and costs no attempt: an outage of a domain system makes orders wait.
        """
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

    def steps_of(self, name: str) -> list[Step]:
        return [s for s in self.order.steps.values() if s.name == name]

    def by_name(self) -> dict[str, list[Step]]:
        """The order's steps grouped by step name (one pass)."""
        out: dict[str, list[Step]] = {}
        for step in self.order.steps.values():
            group = out.get(step.name)
            if group is None:
                out[step.name] = [step]
            else:
                group.append(step)
        return out

    def settled(self, step: Step) -> bool:
        status = step.status
        if status is StepStatus.DONE or status is StepStatus.SKIPPED:
            return True
        return (status is StepStatus.FAILED and self.proc.item_failure == "partial"
                and step.item_id is not None)

    def in_flight(self) -> bool:
        """A forward command was sent whose outcome is not known yet."""
        return any(s.status == StepStatus.RUNNING and s.wait is None
                   for s in self.order.steps.values())

    # -- lifecycle ---------------------------------------------------------

    def on_start(self) -> None:
        order = self.order
        if order.state != S.ACKNOWLEDGED:
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
        if not 0 <= self.order.total_minor <= MAX_AMOUNT_MINOR:  # accepted before the bound
            self.order.failure = {"step": None, "error": {
                "code": AMOUNT_OUT_OF_RANGE, "retryable": False,
                "message": f"the order total is outside 0..{MAX_AMOUNT_MINOR} (int64)"}}
            self.begin_compensation("failed")  # nothing ran: straight to failed
            return
        self.transition(Ev.START)
        self.expect("order", self.proc.expected_s)
        for it in self.order.items:
            it["state"] = str(ItemState.IN_PROGRESS)
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
        for step in order.steps.values():
            if step.wait is not None and step.retry_at is not None:
                self.emit(Timer(step.retry_at, ("wait", step.key, 0)))
            if step.status == StepStatus.RUNNING and step.wait is None:
                self.resend(step, ("retry", step.key, step.attempts),
                            lambda s=step: self.send_step(s))
            if step.comp == "running" and not self.defined(step):
                self.orphan_undo(step)
            elif step.comp == "running":
                self.resend(step, ("comp", step.key, step.comp_attempts),
                            lambda s=step: self.send_comp(s))
        self.rearm_jeopardy()
        for idx, note in enumerate(order.notes):
            if note.status == StepStatus.RUNNING:
                self.resend(note, ("note", idx, note.attempts),
                            lambda n=note, i=idx: self.send_note(n, i))

    def resend(self, step: Step, token: tuple, send: Any) -> None:
        if step.retry_at is not None:
            self.emit(Timer(step.retry_at, token))
        else:
            send()

    # -- moving forward ----------------------------------------------------

    def advance(self) -> None:
        order = self.order
        if order.phase == "compensate":
            self.compensate_next()
            return
        if order.phase != "run" or order.state not in (S.IN_PROGRESS, S.HELD):
            return
        if self.check_orphans():
            return
        # plain loops: this runs for nearly every message, and generator
        # expressions cost more than the comparisons they wrap
        groups = self.by_name()  # the set of steps is fixed; their statuses are not
        settled, pending = self.settled, StepStatus.PENDING
        for sdef in self.proc.steps:
            waiting = [s for s in groups.get(sdef.name, ()) if s.status is pending]
            if not waiting or not self.deps_settled(sdef, groups):
                continue
            for step in waiting:
                if step.status is pending:
                    self.launch(step, sdef)
        if order.phase != "run":
            return
        for step in order.steps.values():
            if not settled(step):
                return
        self.complete()

    def deps_settled(self, sdef: StepDef, groups: dict[str, list[Step]]) -> bool:
        settled = self.settled
        for dep in sdef.after:
            for step in groups.get(dep, ()):
                if not settled(step):
                    return False
        return True

    def launch(self, step: Step, sdef: StepDef) -> None:
        if sdef.wait_event is not None:
            self.expect(step.key, sdef.expected_s)
            step.wait = sdef.wait_event
            self.set_status(step, StepStatus.RUNNING)
            if not self.take_early_event(step) and sdef.wait_timeout_s:
                step.retry_at = self.now + sdef.wait_timeout_s  # the wait's deadline
                self.emit(Timer(step.retry_at, ("wait", step.key, 0)))
            return
        self.expect(step.key, sdef.expected_s)
        action = self.action(step)
        assert action is not None
        step.args = resolve(action.args, self.scopes(step))
        step.attempts = 1
        self.set_status(step, StepStatus.RUNNING)
        self.send_step(step)

    def send_step(self, step: Step) -> None:
        sdef = self.sdef(step)
        assert step.args is not None
        self.send(step.system, self.command_id(step), step.op, step.args, sdef.timeout_s)

    def complete(self) -> None:
        if self.order.state == S.HELD:  # every step settled while held (internal_error)
            self.transition(Ev.RESUME)
        if any(it["state"] == ItemState.FAILED for it in self.order.items):
            self.transition(Ev.PARTIAL)
        else:
            self.transition(Ev.COMPLETE)

    def finish_items(self, state: OrderState) -> None:
        for it in self.order.items:
            if state == S.COMPLETED or (state == S.PARTIAL and it["state"] != ItemState.FAILED):
                it["state"] = str(ItemState.COMPLETED)
            elif state == S.CANCELLED:
                it["state"] = str(ItemState.CANCELLED)
            elif state == S.FAILED:
                it["state"] = str(ItemState.FAILED)

    def summary(self) -> dict[str, Any]:
        order = self.order
        return {
            "state": str(order.state),
            "completed_ts": self.now,
            "total_minor": total if 0 <= (total := order.total_minor) <= MAX_AMOUNT_MINOR
            else None,
            "currency": order.currency,
            "items": [{"id": it["id"], "state": it["state"]} for it in order.items],
            "results": order.results,
        }

    # -- results -----------------------------------------------------------

    def find(self, command_id: str) -> tuple[str, Step | None, int]:
        """Which command an id names: ("step"|"comp"|"note", step, index)."""
        prefix = f"{self.order.order_id}:"
        if not command_id.startswith(prefix):
            return "none", None, -1
        rest = command_id[len(prefix):]
        if rest.startswith("notify:"):
            idx = int(rest[7:]) if rest[7:].isdigit() else -1
            ok = 0 <= idx < len(self.order.notes)
            return ("note", self.order.notes[idx], idx) if ok else ("none", None, -1)
        kind = "step"
        if rest.endswith(":undo"):
            kind, rest = "comp", rest[:-5]
        key, _, gen = rest.partition("#")
        step = self.order.steps.get(key)
        if step is None or step.gen != (int(gen) if gen.isdigit() else 0):
            return "none", None, -1
        return kind, step, -1

    def on_result(self, res: CommandResult) -> None:
        kind, step, idx = self.find(res.command_id)
        if step is None:
            self.stale = True
            return
        problem = untrusted.data_problem({} if res.data is None else res.data) if res.ok else None
        if problem:  # a contract violation: retried like an outage, never kept
            logger.warning("order %s: reply to %s refused: %s", self.order.order_id,
                           res.command_id, problem, extra={"order_id": self.order.order_id})
            res = CommandResult(res.command_id, False, None,
                                DomainError(INVALID_REPLY, f"the reply's {problem}", True))
        if kind == "note":
            self.on_note_result(step, idx, res)
        elif kind == "comp":
            self.on_comp_result(step, res)
        else:
            self.on_step_result(step, res)

    def on_step_result(self, step: Step, res: CommandResult) -> None:
        busy = step.status != StepStatus.RUNNING or step.wait is not None or step.applied
        if busy or (step.retry_at is not None and not res.ok):
            self.stale = True
            return
        sdef = self.sdef(step)
        self.changed = True
        step.retry_at = None
        if res.ok:
            self.applied(step, res.data or {})
        else:
            if self.retry_later(step, res, sdef.retry, self.command_id(step), "retry",
                                step.key):
                return
            self.set_status(step, StepStatus.FAILED)
            self.step_failed(step)
        self.advance()

    def applied(self, step: Step, data: dict[str, Any]) -> None:
        order = self.order
        step.result, step.error, step.applied = data, None, True
        order.done_counter += 1
        step.done_seq = order.done_counter
        hold = self.sdef(step).hold
        if hold and order.phase == "run" and data.get(hold.field) == hold.equals:
            step.wait = hold.until_event
            if not self.take_early_event(step):
                self.hold(hold.reason)
            return
        self.step_done(step)

    def step_done(self, step: Step) -> None:
        self.set_status(step, StepStatus.DONE)
        action = self.action(step)
        if action is not None and step.result is not None:
            for key, field in action.collect.items():
                value = step.result.get(field)
                if step.item_id is not None:
                    self.order.results.setdefault(key, []).append(value)
                else:
                    self.order.results[key] = value
        item = self.item(step)
        if item is not None and self.order.phase == "run":
            mine = [s for s in self.order.steps.values() if s.item_id == step.item_id]
            if all(s.status in (StepStatus.DONE, StepStatus.SKIPPED) for s in mine):
                item["state"] = str(ItemState.COMPLETED)

    def step_failed(self, step: Step) -> None:
        order = self.order
        if order.phase != "run":
            return
        failure = {"step": step.key, "error": step.error}
        item = self.item(step)
        if item is not None and self.proc.item_failure == "partial":
            item["state"] = str(ItemState.FAILED)
            working = {s.item_id for s in order.steps.values()
                       if s.item_id is not None and s.status != StepStatus.SKIPPED}
            if any(it["state"] != ItemState.FAILED for it in order.items if it["id"] in working):
                return
        order.failure = failure
        if self.proc.failure_policy == "hold":
            self.hold("fallout")
        else:
            self.fail(failure)

    def hold(self, reason: str) -> None:
        if self.order.state == S.HELD:
            self.order.state_reason = reason
            self.changed = True
        else:
            self.transition(Ev.HOLD, reason)

    # -- domain events -----------------------------------------------------

    def on_event(self, ev: DomainEvent) -> None:
        """Apply an event to the step that waits for it from its sender
        (``ev.system``, the domain system the endpoint authenticated), keep
        it bounded if a step will wait for it later, else ignore it."""
        order = self.order
        problem = untrusted.data_problem(ev.data)
        data = ev.data if problem is None else {"dropped": problem}
        if problem:
            self.log_event(ev, f"its data is not kept: {problem}")
        for step in order.steps.values():
            if self.event_matches(step, ev.name, ev.system):
                self.consume(step, data)
                self.advance()
                return
        refused = self.event_refusal(ev.name, ev.system)
        if refused:
            self.stale = True
            self.log_event(ev, f"ignored: {refused}")
            return
        early = order.early_events
        early.append({"system": ev.system, "name": ev.name, "data": data})
        sizes = [untrusted.size_of(e) for e in early]
        dropped = 0
        while len(early) > MAX_EARLY_EVENTS or sum(sizes) > MAX_EARLY_BYTES:
            early.pop(0)
            sizes.pop(0)
            dropped += 1
        if dropped:
            self.log_event(ev, f"kept early; the {dropped} oldest early event(s) dropped "
                           f"(at most {MAX_EARLY_EVENTS} and {MAX_EARLY_BYTES} bytes are kept)")
        self.changed = True

    def log_event(self, ev: DomainEvent, what: str) -> None:
        order_id = self.order.order_id
        logger.warning("order %s: event %s %s from %s %s", order_id, ev.event_id[:100],
                       ev.name[:100], ev.system[:100], what, extra={"order_id": order_id})

    def wait_source(self, step: Step) -> tuple[str, str] | None:
        """The (event, domain system) a step waits for or may hold for."""
        if self.defined(step):
            sdef = self.defs[step.name]
            if sdef.wait_event is not None:
                return sdef.wait_event, sdef.wait_system or step.system
            if sdef.hold is not None:
                return sdef.hold.until_event, sdef.hold.system or step.system
        # an orphan, or a hold its definition no longer has: what the snapshot says
        return (step.wait, step.system) if step.wait else None

    def event_matches(self, step: Step, name: str, system: str) -> bool:
        if step.status != StepStatus.RUNNING or step.wait != name:
            return False
        source = self.wait_source(step)
        return source is not None and source[1] == system

    def event_refusal(self, name: str, system: str) -> str | None:
        """Why an event no step waits for now is not kept for later."""
        order = self.order
        if order.state.terminal or order.phase != "run":
            return f"the order is {order.state} ({order.phase})"
        senders = set()
        for step in order.steps.values():
            if step.status in (StepStatus.PENDING, StepStatus.RUNNING):
                source = self.wait_source(step)
                if source is not None and source[0] == name:
                    senders.add(source[1])
        if system in senders:
            return None
        if senders:
            return f"{name} is awaited from {', '.join(sorted(senders))}, not from {system}"
        return f"no step of this order waits for {name}"

    def take_early_event(self, step: Step) -> bool:
        for i, ev in enumerate(self.order.early_events):
            if self.event_matches(step, ev["name"], ev["system"]):
                del self.order.early_events[i]
                self.consume(step, ev["data"])
                return True
        return False

    def consume(self, step: Step, data: dict[str, Any]) -> None:
        step.wait, step.retry_at = None, None
        self.changed = True
        if not step.applied:  # a wait step: the event is its result
            step.result, step.applied = data, True
        self.step_done(step)
        holding = any(s.wait and s.applied for s in self.order.steps.values())
        if (self.order.state == S.HELD and self.order.state_reason not in OPERATOR_HOLDS
                and not holding):
            self.transition(Ev.RESUME)  # a wait's hold ends with its event

    # -- timers ------------------------------------------------------------

    def on_timer(self, token: tuple[Any, ...]) -> None:
        kind, ref, attempt = token
        if kind == "jeopardy":
            self.on_jeopardy(ref)
            return
        if kind == "note":
            note = self.order.notes[ref] if 0 <= ref < len(self.order.notes) else None
            if note and note.status == StepStatus.RUNNING and note.attempts == attempt:
                note.retry_at, note.attempts = None, note.attempts + 1
                self.changed = True
                self.send_note(note, ref)
                return
        step = self.order.steps.get(ref)
        if kind == "wait" and step is not None and step.wait and step.retry_at is not None:
            step.wait, step.retry_at = None, None
            step.error = {"code": "event_timeout", "retryable": False,
                          "message": f"no {step.wait} event in time"}
            self.set_status(step, StepStatus.FAILED)
            self.step_failed(step)
            self.advance()
            return
        if step is not None and step.retry_at is not None:
            if kind == "retry" and step.status == StepStatus.RUNNING and step.attempts == attempt:
                step.retry_at, step.attempts = None, step.attempts + 1
                self.changed = True
                self.send_step(step)
                return
            if kind == "comp" and step.comp == "running" and step.comp_attempts == attempt:
                step.retry_at, step.comp_attempts = None, step.comp_attempts + 1
                self.changed = True
                self.send_comp(step)
                return
        self.stale = True

    # -- failure, cancellation, compensation ------------------------------

    def fail(self, failure: dict[str, Any] | None) -> None:
        if failure is not None:
            self.order.failure = failure
        self.begin_compensation("failed")

    def on_cancel(self, msg: Cancel) -> None:
        order = self.order

        def reject(reason: str) -> None:
            self.emit(Reply(msg.reply_to, {"type": "cancel_rejected",
                                           "order_id": order.order_id, "reason": reason}))

        problem = fallout.cancel_problem(order, self.proc.point_of_no_return)
        if problem:
            reject(problem)
            return
        reason = msg.reason[:MAX_REASON] if isinstance(msg.reason, str) else None
        if msg.operator:  # an operator's cancel is in the history like their other actions
            order.history.append({"state": str(order.state), "ts": self.now, "action": "cancel",
                                  "operator": msg.operator, "reason": reason or ""})
        order.cancel = {"reason": reason, "ts": self.now}
        self.transition(Ev.CANCEL, reason)
        self.emit(Reply(msg.reply_to, {"type": "cancel_accepted", "order_id": order.order_id,
                                       "state": str(order.state)}))
        self.begin_compensation("cancelled")

    def begin_compensation(self, target: str) -> None:
        order = self.order
        order.phase, order.target = "compensate", target
        self.changed = True
        for step in order.steps.values():
            if step.status == StepStatus.PENDING:
                self.set_status(step, StepStatus.SKIPPED)
            elif step.status == StepStatus.RUNNING and step.wait is not None:
                step.wait = None
                self.set_status(step, StepStatus.DONE if step.applied else StepStatus.SKIPPED)
        if order.state in (S.IN_PROGRESS, S.HELD) and target == "failed":
            order.state_reason = "compensating"  # not fallout any more: no operator needed
        self.compensate_next()

    def compensate_next(self) -> None:
        order = self.order
        if self.in_flight():
            return  # outcomes of commands already sent decide what to undo
        if order.state == S.ASSESSING_CANCELLATION:
            self.transition(Ev.CANCEL_ACCEPT, order.state_reason)
        if any(s.comp == "running" for s in order.steps.values()):
            return
        if any(s.comp == "failed" for s in order.steps.values()):
            return  # held as fallout until an operator acts
        todo = [s for s in order.steps.values()
                if s.applied and s.status == StepStatus.DONE and s.comp is None]
        for step in sorted(todo, key=lambda s: -s.done_seq):
            if not self.defined(step) and not step.op.startswith("await:"):
                self.orphan_undo(step)
                return
            action = self.action(step)
            if action is not None and action.compensate is not None:
                step.comp, step.comp_attempts = "running", 1
                self.changed = True
                self.send_comp(step)
                return
        self.finish_compensation()

    def send_comp(self, step: Step) -> None:
        action = self.action(step)
        assert action is not None and action.compensate is not None
        op, template = action.compensate
        args = resolve(template, self.scopes(step))
        timeout = self.sdef(step).timeout_s
        self.send(step.system, f"{self.command_id(step)}:undo", op, args, timeout)

    def on_comp_result(self, step: Step, res: CommandResult) -> None:
        if step.comp != "running" or (step.retry_at is not None and not res.ok):
            self.stale = True
            return
        self.changed = True
        step.retry_at = None
        policy = self.sdef(step).retry
        if res.ok:
            step.comp = "done"
            self.set_status(step, StepStatus.COMPENSATED)
            self.compensate_next()
            return
        if self.retry_later(step, res, policy, f"{self.command_id(step)}:undo", "comp",
                            step.key):
            return
        step.comp = "failed"
        self.order.failure = {"step": step.key, "error": step.error, "compensation": True}
        self.hold("fallout")

    def finish_compensation(self) -> None:
        order = self.order
        if order.target == "cancelled":
            self.transition(Ev.CANCELLED, order.state_reason)
        else:
            failure = order.failure or {}
            code = (failure.get("error") or {}).get("code")
            self.transition(Ev.FAIL, code or ("aborted" if "aborted_by" in failure else None))

    # -- CRM notifications -------------------------------------------------

    def notify(self, state: OrderState, previous: OrderState) -> None:
        self.notify_crm(f"notify:{state}", str(state),
                        f"Order {self.order.external_id} is {state} (was {previous})")

    def notify_crm(self, key: str, state: str, message: str) -> None:
        order = self.order
        note = Step(key, "notify", self.proc.notify_system, self.proc.notify_op,
                    status=StepStatus.RUNNING, attempts=1)
        note.args = {
            "customer_id": order.customer_id, "order_id": order.order_id,
            "external_id": order.external_id, "state": state, "message": message,
        }
        self.changed = True
        order.notes.append(note)
        self.send_note(note, len(order.notes) - 1)

    def send_note(self, note: Step, idx: int) -> None:
        assert note.args is not None
        self.send(note.system, f"{self.order.order_id}:notify:{idx}", note.op, note.args,
                  self.proc.notify_timeout_s)

    def on_note_result(self, note: Step, idx: int, res: CommandResult) -> None:
        if note.status != StepStatus.RUNNING or (note.retry_at is not None and not res.ok):
            self.stale = True
            return
        self.changed = True
        note.retry_at = None
        policy = self.proc.notify_retry
        if res.ok:
            note.status, note.result, note.applied = StepStatus.DONE, res.data or {}, True
            return
        if self.retry_later(note, res, policy, f"{self.order.order_id}:notify:{idx}", "note",
                            idx):
            return
        note.status = StepStatus.FAILED
