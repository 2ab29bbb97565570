"""CRM notifications: a note per notified state (and per jeopardy), sent
as a command of its own outside the process graph, retried by the
process's ``notify_retry``. A mixin of ``oms.engine.Turning`` (see
``oms.engine_base``)."""

from __future__ import annotations

from typing import Any

from oms.engine_base import TurnBase
from oms.messages import CommandResult, Send
from oms.model import Step, kept
from oms.states import STEP_DONE, STEP_RUNNING, OrderState, StepStatus

_new = tuple.__new__  # _new(Send, (...)): as ``oms.engine_base._new``


class NoteMixin(TurnBase):
    __slots__ = ()  # as ``TurnBase``

    def notify(self, state: OrderState, previous: OrderState) -> None:
        text = state._value_
        self.notify_crm(f"notify:{text}", text,
                        f"Order {self.order.external_id} is {text} (was {previous!s})")

    def notify_crm(self, key: str, state: str, message: str) -> None:
        order = self.order
        args = {
            "customer_id": order.customer_id, "order_id": order.order_id,
            "external_id": order.external_id, "state": state, "message": message,
        }
        note = Step(key, "notify", self.proc.notify_system, self.proc.notify_op,
                    status=STEP_RUNNING, attempts=1, args=kept(args))
        self.changed = True
        order.notes.append(note)
        self.send_note(note, len(order.notes) - 1, args)

    def send_note(self, note: Step, idx: int, args: dict[str, Any] | None = None) -> None:
        """Send (or resend) a CRM note: ``args`` its map if at hand, else read
        from the note."""
        if args is None:
            args = note.arguments()
            assert args is not None
        self.effects.append(_new(Send, (note.system, f"{self.order.order_id}:notify:{idx}",
                                        note.op, args, self.proc.notify_timeout_s,
                                        note.kept_args())))

    def on_note_result(self, note: Step, idx: int, res: CommandResult) -> None:
        if note.status != STEP_RUNNING or (note.retry_at is not None and not res.ok):
            self.stale = True
            return
        self.changed = True
        note.retry_at = None
        policy = self.proc.notify_retry
        if res.ok:
            note.result, note.applied = res.data or {}, True
            self.set_status(note, STEP_DONE)
            return
        if self.retry_later(note, res, policy, "note", idx):
            return
        self.set_status(note, StepStatus.FAILED)
