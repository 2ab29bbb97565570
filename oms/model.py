"""The order as the service stores it, and the views the contract shows.

An ``Order`` is plain data owned by exactly one order actor at a time. Its
snapshot record (``to_record``/``from_record``) is what LMDB holds, with a
format version ``v`` so later releases can read older snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oms.fallout import fallout_view
from oms.outstanding import delivering_notes
from oms.states import OrderState, Phase, StepStatus, Target, Undo

RECORD_VERSION = 1


def charges(items: list[dict[str, Any]]) -> int:
    """What items cost: unit price times quantity, over add and modify items."""
    return sum(
        it.get("unit_price_minor", 0) * it.get("quantity", 1)
        for it in items
        if it["action"] in ("add", "modify")
    )


class RecordVersionError(ValueError):
    """A snapshot written by a newer, unknown format."""


@dataclass(slots=True)
class Step:
    """One step instance of an order's process.

    key: unique within the order: the step name, or ``name[item_id]`` for a
      per-item step.
    gen: bumped when an operator re-runs a failed step, so the re-run is a
      new logical command with a new ``command_id``.
    retry_at: when a retry (or compensation retry) is due, while backing off.
    done_seq: completion order, so compensation runs in reverse.
    wait: the domain event this step waits for, if any.
    comp: compensation status (``Undo``): None, "running", "done" or "failed".

    ``status`` changes only in ``oms.states.set_step_status``, ``comp`` only
    in ``oms.states.set_undo``.
    """

    key: str
    name: str
    system: str
    op: str
    item_id: str | None = None
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    gen: int = 0
    args: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    applied: bool = False
    done_seq: int = 0
    retry_at: float | None = None
    wait: str | None = None
    comp: Undo | None = None
    comp_attempts: int = 0

    def to_record(self) -> list[Any]:
        return [
            self.key, self.name, self.system, self.op, self.item_id, str(self.status),
            self.attempts, self.gen, self.args, self.result, self.error, self.applied,
            self.done_seq, self.retry_at, self.wait, self.comp, self.comp_attempts,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Step:
        step = cls(*rec)
        step.status = StepStatus(step.status)
        return step

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.key,
            "system": self.system,
            "op": self.op,
            "status": str(self.status),
            "attempts": self.attempts,
        }
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(slots=True)
class Order:
    """An order and its progress through its process.

    phase: "run" while the process moves forward, "compensate" while
      completed steps are being undone, "finish" once terminal (``Phase``).

    Each kind of state changes in one function: ``state`` in
    ``oms.engine_base.TurnBase.transition`` (table ``oms.states.TRANSITIONS``),
    ``state_reason`` in ``oms.states.set_reason``, ``phase`` and ``target`` in
    ``oms.states.set_phase``, an item's ``state`` in ``oms.states.set_item_state``.
    seq_key: the value of the process's sequencing key, if it has one.
    turn: whether the sequencer has let this order run.
    early_events: domain events that arrived before a step waited for them.
    notes: CRM notifications (steps of their own, outside the process graph).
    """

    order_id: str
    source_system: str
    external_id: str
    order_type: str
    customer: dict[str, Any]
    customer_address: dict[str, Any]
    delivery_address: dict[str, Any]
    currency: str
    items: list[dict[str, Any]]
    attributes: dict[str, Any]
    created_ts: float
    state: OrderState = OrderState.ACKNOWLEDGED
    state_reason: str | None = None
    updated_ts: float = 0.0
    steps: dict[str, Step] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    phase: Phase = Phase.RUN
    target: Target | None = None
    failure: dict[str, Any] | None = None
    cancel: dict[str, Any] | None = None
    seq_key: str | None = None
    turn: bool = False
    early_events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Step] = field(default_factory=list)
    done_counter: int = 0
    version: int = 0
    jeopardy: dict[str, Any] = field(default_factory=dict)  # key -> [deadline, fired]
    plan: Any = field(default=None, repr=False, compare=False)  # not stored: the engine's
    # view of its (fixed) set of steps, rebuilt after a load (oms.engine_run.StepPlan)

    @property
    def customer_id(self) -> str:
        return str(self.customer.get("id", ""))

    @property
    def total_minor(self) -> int:
        return charges(self.items)

    @property
    def finished(self) -> bool:
        """Terminal, and no CRM notification still being delivered."""
        return self.state.terminal and not delivering_notes(self)

    def to_record(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "id": self.order_id, "src": self.source_system, "ext": self.external_id,
            "type": self.order_type, "cust": self.customer, "caddr": self.customer_address,
            "daddr": self.delivery_address, "cur": self.currency, "items": self.items,
            "attrs": self.attributes, "cts": self.created_ts, "state": str(self.state),
            "reason": self.state_reason, "uts": self.updated_ts,
            "steps": [s.to_record() for s in self.steps.values()],
            "hist": self.history, "res": self.results, "sum": self.summary,
            "phase": self.phase, "target": self.target, "fail": self.failure,
            "cancel": self.cancel, "seq": self.seq_key, "turn": self.turn,
            "early": self.early_events, "notes": [n.to_record() for n in self.notes],
            "dc": self.done_counter, "ver": self.version, "jep": self.jeopardy,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Order:
        if rec.get("v") != RECORD_VERSION:
            raise RecordVersionError(f"unknown snapshot format version {rec.get('v')!r}")
        steps = [Step.from_record(s) for s in rec["steps"]]
        return cls(
            order_id=rec["id"], source_system=rec["src"], external_id=rec["ext"],
            order_type=rec["type"], customer=rec["cust"], customer_address=rec["caddr"],
            delivery_address=rec["daddr"], currency=rec["cur"], items=rec["items"],
            attributes=rec["attrs"], created_ts=rec["cts"], state=OrderState(rec["state"]),
            state_reason=rec["reason"], updated_ts=rec["uts"],
            steps={s.key: s for s in steps}, history=rec["hist"], results=rec["res"],
            summary=rec["sum"], phase=rec["phase"], target=rec["target"],
            failure=rec["fail"], cancel=rec["cancel"], seq_key=rec["seq"], turn=rec["turn"],
            early_events=rec["early"], notes=[Step.from_record(n) for n in rec["notes"]],
            done_counter=rec["dc"], version=rec["ver"], jeopardy=rec.get("jep", {}),
        )

    def summary_view(self) -> dict[str, Any]:
        """The list view: no steps, items or history."""
        out: dict[str, Any] = {
            "order_id": self.order_id,
            "source_system": self.source_system,
            "external_id": self.external_id,
            "order_type": self.order_type,
            "state": str(self.state),
            "customer_id": self.customer_id,
            "created_ts": self.created_ts,
            "updated_ts": self.updated_ts,
        }
        if self.state_reason:
            out["state_reason"] = self.state_reason
        if self.summary is not None:
            out["summary"] = self.summary
        return out

    def view(self, point_of_no_return: str | None = None) -> dict[str, Any]:
        """The full order view of ``get_order`` (contract §1); while held, a
        ``fallout`` block (``oms.fallout``) says what an operator can do."""
        out = self.summary_view()
        out["items"] = [
            {
                "id": it["id"],
                "action": it["action"],
                "product_id": it["product_id"],
                "quantity": it.get("quantity", 1),
                "state": it.get("state", "acknowledged"),
            }
            for it in self.items
        ]
        out["steps"] = [s.view() for s in self.steps.values()] + [n.view() for n in self.notes]
        out["history"] = self.history
        if self.failure is not None:
            out["failure"] = self.failure
        block = fallout_view(self, point_of_no_return)
        if block is not None:
            out["fallout"] = block
        return out
