"""Domain events and timers: a step that waits for an event from its
sender, events kept (bounded) until a step waits for them, retry and wait
deadlines coming due. A mixin of ``oms.engine.Turning`` (see
``oms.engine_base``)."""

from __future__ import annotations

import logging
from typing import Any

from oms import untrusted
from oms.engine_base import TurnBase
from oms.holds import dropped_data, early_taken, released
from oms.messages import DomainEvent
from oms.model import Step
from oms.states import (
    OPERATOR_HOLDS,
    ORDER_HELD,
    STEP_RUNNING,
    Ev,
    OrderState,
    Phase,
    StepStatus,
    Undo,
)

logger = logging.getLogger("oms.engine")
S = OrderState
MAX_EARLY_EVENTS = 16
MAX_EARLY_BYTES = 64 * 1024  # early events kept per order, encoded


class EventMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    # -- domain events -----------------------------------------------------

    def on_event(self, ev: DomainEvent) -> None:
        """Apply an event to the step that waits for it from its sender
        (``ev.system``, the domain system the endpoint authenticated) and
        that it may release (``oms.holds``), keep it bounded if a step will
        wait for it later, else ignore it."""
        order = self.order
        problem = untrusted.data_problem(ev.data)
        data = ev.data if problem is None else dropped_data(ev.data, problem, {
            d.hold.match for d in self.defs.values()
            if d.hold is not None and d.hold.match and d.hold.until_event == ev.name})
        if problem:
            self.log_event(ev, f"its data is not kept: {problem}")
        name = ev.name
        waiting = [(step, self.hold_match(step))  # (``step.wait``: checked first)
                   for step in order.steps.values()
                   if step.wait == name and self.event_matches(step, name, ev.system)]
        if waiting:
            step = released(waiting, data)
            if step is not None:
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
        self.changed = True
        if not (waiting or dropped):
            return
        what = ("kept early: its data names none of the steps waiting for it (a hold_when's "
                "match)") if waiting else "kept early"  # (each waiting: another value)
        if dropped:  # one line an event, however many reasons (a flood logs one a event)
            what += (f"; the {dropped} oldest early event(s) dropped (at most "
                     f"{MAX_EARLY_EVENTS} and {MAX_EARLY_BYTES} bytes are kept)")
        self.log_event(ev, what)

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
        if step.status != STEP_RUNNING or step.wait != name:
            return False
        source = self.wait_source(step)
        return source is not None and source[1] == system

    def event_refusal(self, name: str, system: str) -> str | None:
        """Why an event no step waits for now is not kept for later."""
        order = self.order
        if order.state.terminal or order.phase != Phase.RUN:
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

    def hold_match(self, step: Step) -> str | None:
        """The ``match`` of the definition's hold a step waits in, if any."""
        if step.applied and self.defined(step):  # (a wait_event step is not, as it waits)
            hold = self.defs[step.name].hold
            if hold is not None and hold.until_event == step.wait:
                return hold.match
        return None

    def take_early_event(self, step: Step) -> bool:
        """A kept event consumed as the step begins to wait (``oms.holds``)."""
        early = self.order.early_events
        fits = [(i, ev["data"]) for i, ev in enumerate(early)
                if self.event_matches(step, ev["name"], ev["system"])]
        i = early_taken(step, self.hold_match(step), fits) if fits else None
        if i is None:
            return False
        self.consume(step, early.pop(i)["data"])
        return True

    def consume(self, step: Step, data: dict[str, Any]) -> None:
        step.wait, step.retry_at = None, None
        self.changed = True
        if not step.applied:  # a wait step: the event is its result
            step.result, step.applied = data, True
        self.step_done(step)
        order = self.order
        if order.state == ORDER_HELD and order.state_reason not in OPERATOR_HOLDS and not any(
                s.wait and s.applied for s in order.steps.values()):  # no other hold
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
            step.error = {"code": "event_timeout", "retryable": False,
                          "message": f"no {step.wait} event in time"}
            step.wait, step.retry_at = None, None
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
            if kind == "comp" and step.comp == Undo.RUNNING and step.comp_attempts == attempt:
                step.retry_at, step.comp_attempts = None, step.comp_attempts + 1
                self.changed = True
                self.send_comp(step)
                return
        self.stale = True
