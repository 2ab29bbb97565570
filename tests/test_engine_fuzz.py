"""A randomized run of the pure engine: nothing gets stuck.

Each run drives one order (retail or telecom; hold or compensate policy;
item_failure fail or partial; with or without an order deadline) through a
random mix of replies (ok, retryable, refused, circuit open), timers, domain
events, operator actions, cancels, restarts (the snapshot reloaded, replies
in flight lost, ``Resume``) and crashes (``hold_internal_error`` as the
router calls it, sometimes dropping a reply as a crash on it does). Then the
domain systems answer everything, events come for every wait, and an
operator retries (or skips) whatever is held for one. The order must end
terminal with its CRM notes settled, and it must never send a forward
command of a sequenced order without its turn. Seeded: a failure names its
seed (``run(seed)`` reproduces it).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from helpers import normalized, retail_order
from test_engine import RETAIL, TELECOM, TELECOM_ORDER

from oms import snapshot
from oms.engine import Engine, hold_internal_error, new_order
from oms.errors import DomainError
from oms.messages import (
    Cancel,
    CommandResult,
    DomainEvent,
    Operate,
    Reply,
    Resume,
    Send,
    Start,
    Timer,
    TimerFired,
    Turn,
)
from oms.model import Order
from oms.states import OrderState, StepStatus

DATA = {"reserve_stock": None, "activate_service": {"service_id": "s1"},
        "modify_service": {"previous_attributes": {}},
        "deactivate_service": {"product_id": "p", "attributes": {}}}
OTHER = {"invoice_id": "i", "payment_id": "p", "shipment_id": "s", "tracking_number": "t"}
ERRORS = {"retry": DomainError("unavailable", "x", True),
          "fail": DomainError("refused", "x", False),
          "circuit": DomainError("circuit_open", "x", True)}


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = rng = random.Random(seed)
        base = rng.choice([RETAIL, TELECOM])
        self.proc = dataclasses.replace(
            base, failure_policy=rng.choice(["hold", "compensate"]),
            item_failure=rng.choice(["fail", "partial"]), expected_s=rng.choice([None, 0.05]))
        self.engine = Engine(self.proc)
        raw = retail_order() if base is RETAIL else TELECOM_ORDER
        self.order: Order = new_order("O1", normalized(raw), self.proc, 1000.0)
        self.now = 1000.0
        self.pending: list[Send] = []
        self.timers: list[Timer] = []

    def effects(self, turning: Any) -> Any:
        order = self.order
        for fx in turning.effects:
            if isinstance(fx, Send):
                forward = ":notify:" not in fx.command_id and not fx.command_id.endswith(":undo")
                assert not (forward and order.seq_key and not order.turn), fx.command_id
                self.pending.append(fx)
            elif isinstance(fx, Timer):
                self.timers.append(fx)
        return turning

    def feed(self, msg: Any) -> Any:
        self.now += 0.01
        return self.effects(self.engine.handle(self.order, msg, self.now))

    def crash(self, dropped: tuple[Any, ...] = ()) -> None:
        self.now += 0.01
        self.effects(hold_internal_error(self.engine, self.order, "X: boom", dropped, self.now))

    def answer(self, cmd: Send, kind: str) -> CommandResult:
        if kind == "ok":
            data = DATA.get(cmd.op, OTHER) or {
                "reservation_id": "r1", "status": self.rng.choice(["reserved", "backordered"])}
            return CommandResult(cmd.command_id, True, data)
        data = {"retry_after": 0.1} if kind == "circuit" else None
        return CommandResult(cmd.command_id, False, data, ERRORS[kind])

    def chaos(self) -> None:
        rng = self.rng
        self.feed(Start())
        if self.order.seq_key and not self.order.turn:
            if rng.random() < 0.5:
                self.feed(Turn(go=False))
                for _ in range(rng.randint(0, 3)):
                    self.rare(rng.random())
            self.feed(Turn(go=True))
        for _ in range(rng.randint(5, 60)):
            r = rng.random()
            if r < 0.45 and self.pending:
                cmd = self.pending.pop(rng.randrange(len(self.pending)))
                self.feed(self.answer(cmd, rng.choice(["ok", "ok", "ok", "retry", "fail",
                                                       "circuit"])))
            elif r < 0.6 and self.timers:
                self.feed(TimerFired(self.timers.pop(rng.randrange(len(self.timers))).token))
            elif r < 0.7:
                self.feed(DomainEvent(f"e{rng.random()}", rng.choice(["warehouse", "shipping"]),
                                      rng.choice(["stock_reserved", "shipment_delivered"]), {}))
            elif r < 0.85:
                self.rare(rng.random())
            elif r < 0.87 and self.pending:  # the reply that raised is dropped
                cmd = self.pending.pop(rng.randrange(len(self.pending)))
                self.crash((self.answer(cmd, "ok"),))
            elif r < 0.9:
                self.crash()
            elif r < 0.95:
                self.order = snapshot.decode(snapshot.encode(self.order))  # a restart
                self.pending.clear()
                self.timers.clear()
                self.feed(Resume())

    def rare(self, r: float) -> None:
        if r < 0.3:
            self.crash()
        elif r < 0.8:
            step = self.rng.choice([None, None, *self.order.steps])
            self.feed(Operate(self.rng.choice(["retry", "skip", "abort"]), step, "ann", "r",
                              None))
        else:
            self.feed(Cancel("c", None, None))

    def drain(self) -> None:
        """Everything answered, every wait's event sent, every hold retried."""
        order, ops = self.order, 0
        for n in range(600):
            order = self.order
            if self.pending:
                self.feed(self.answer(self.pending.pop(0), "ok"))
            elif self.timers:
                self.feed(TimerFired(self.timers.pop(0).token))
            elif order.state == OrderState.HELD and order.state_reason in (
                    "internal_error", "fallout") and ops < 30:
                ops += 1
                turning = self.feed(Operate("retry", None, "ann", "r", None))
                if not any(isinstance(fx, Reply) and fx.payload["type"] == "operator_accepted"
                           for fx in turning.effects):
                    self.feed(Operate("skip", None, "ann", "r", None))
            else:
                waits = [s for s in order.steps.values()
                         if s.status == StepStatus.RUNNING and s.wait]
                if not waits:
                    return
                system = "warehouse" if waits[0].wait == "stock_reserved" else "shipping"
                self.feed(DomainEvent(f"d{n}", system, waits[0].wait, {}))


def run(seed: int) -> Order:
    one = Run(seed)
    one.chaos()
    one.drain()
    return one.order


def test_randomized_orders_end_and_never_get_stuck() -> None:
    stuck = []
    for seed in range(1500):
        order = run(seed)
        if not (order.state.terminal and order.finished):
            stuck.append((seed, str(order.state), order.state_reason))
    assert not stuck, stuck[:5]
