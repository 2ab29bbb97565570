"""The order as the service stores it, and the views the contract shows.

An ``Order`` is plain data owned by exactly one order actor at a time. It is
its own snapshot record: ``Order`` and ``Step`` are ``msgspec.Struct``
classes that msgspec encodes as msgpack arrays, fields in the order written
here, and decodes straight back into these classes (``oms.snapshot``, which
also reads the older map records). So the field order is the record format
(version ``RECORD_VERSION``, the array's first element): a field is only
ever added at the end, with a default; anything else is a new version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from oms.fallout import fallout_view
from oms.outstanding import delivering_notes
from oms.states import TERMINAL, OrderState, Phase, StepStatus, Target, Undo

RECORD_VERSION = 2
"""The snapshot record format: 1, a map with short keys (read, no longer
written); 2, the ``Order`` as an array, tagged with this number."""


def charges(items: list[dict[str, Any]]) -> int:
    """What items cost: unit price times quantity, over add and modify items."""
    return sum(
        it.get("unit_price_minor", 0) * it.get("quantity", 1)
        for it in items
        if it["action"] in ("add", "modify")
    )


class RecordVersionError(ValueError):
    """A snapshot written by a newer, unknown format."""


_encode_args = msgspec.msgpack.Encoder().encode  # as ``oms.snapshot.encode``'s: the same bytes
_decode_args = msgspec.msgpack.Decoder().decode


def kept(args: dict[str, Any]) -> dict[str, Any] | msgspec.Raw:
    """A step's arguments as its ``Step.args`` keeps them: encoded now,
    while the map just built is in the cache, so that each of the order's
    later snapshots (7 a retail order, 1,024 orders in flight) copies these
    bytes instead of reading the map's objects again, cold by then. A map
    msgspec cannot encode is kept as it is (its snapshot then fails as it
    always did: the order's failure rule)."""
    try:
        return msgspec.Raw(_encode_args(args))
    except (TypeError, ValueError, OverflowError):
        return args


class Step(msgspec.Struct, array_like=True):
    """One step instance of an order's process.

    key: unique within the order: the step name, or ``name[item_id]`` for a
      per-item step.
    gen: bumped when an operator re-runs a failed step, so the re-run is a
      new logical command with a new ``command_id``.
    retry_at: when a retry (or compensation retry) is due, while backing off.
    done_seq: completion order, so compensation runs in reverse.
    wait: the domain event this step waits for, if any.
    comp: compensation status (``Undo``): None, "running", "done" or "failed".
    args: the command's arguments as launched (``kept``): in memory encoded
      once, as ``msgspec.Raw``, which every later snapshot copies verbatim
      (the same bytes as the map); a record decodes them as a map. Read them
      with ``arguments``.

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
    args: dict[str, Any] | msgspec.Raw | None = None  # (decoded: a map, or refused)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    applied: bool = False
    done_seq: int = 0
    retry_at: float | None = None
    wait: str | None = None
    comp: Undo | None = None
    comp_attempts: int = 0

    def kept_args(self) -> msgspec.Raw | None:
        """The command's arguments as kept bytes (``kept``), if they are: what
        the gateway sends as they are (``oms.messages.Send.raw``)."""
        args = self.args
        return args if type(args) is msgspec.Raw else None

    def arguments(self) -> dict[str, Any] | None:
        """The command's arguments as a map (a resend, an undo's ``$args``)."""
        args = self.args
        if isinstance(args, msgspec.Raw):
            decoded: dict[str, Any] = _decode_args(args)  # the map it was, to its keys' types
            return decoded
        return args

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


class Order(msgspec.Struct, array_like=True, tag=RECORD_VERSION, dict=True):
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
    steps: dict[str, Step] = {}
    history: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    phase: Phase = Phase.RUN
    target: Target | None = None
    failure: dict[str, Any] | None = None
    cancel: dict[str, Any] | None = None
    seq_key: str | None = None
    turn: bool = False
    early_events: list[dict[str, Any]] = []
    notes: list[Step] = []
    done_counter: int = 0
    version: int = 0
    jeopardy: dict[str, Any] = {}  # key -> [deadline, fired]
    # New fields go here, at the end, each with a default (see the module's docstring).

    # Not stored, not compared: the engine's view of its (fixed) set of steps,
    # rebuilt after a load (oms.engine_plan.StepPlan). An attribute of the
    # instance's ``__dict__`` (``dict=True``), so msgspec never encodes it;
    # None (this class attribute) until the engine sets it.
    if TYPE_CHECKING:
        plan: Any = None
    else:
        plan = None

    @property
    def customer_id(self) -> str:
        return str(self.customer.get("id", ""))

    @property
    def total_minor(self) -> int:
        return charges(self.items)

    @property
    def finished(self) -> bool:
        """Terminal, and no CRM notification still being delivered."""
        return self.state in TERMINAL and not delivering_notes(self)  # (no enum property)

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
            out["failure"] = failure_view(self.failure)
        block = fallout_view(self, point_of_no_return)
        if block is not None:
            out["fallout"] = block
        return out


def failure_view(failure: Any) -> Any:
    """An order's ``failure`` as §1 gives it: always a ``step`` and an
    ``error`` (nil for an order aborted with no failed step, whose record
    holds ``aborted_by`` alone), so is each ``previous``."""
    if not isinstance(failure, dict):
        return failure
    out = {"step": None, "error": None, **failure}
    if isinstance(failure.get("previous"), dict):
        out["previous"] = failure_view(failure["previous"])
    return out
