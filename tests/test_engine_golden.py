"""The engine's outputs, pinned: effects, flags and resulting orders of whole
runs, so that a change meant to make the engine cheaper is proved to change
nothing it produces.

Each scenario feeds orders through the pure engine and records, per message,
the message, the effects in order, ``changed`` and ``stale``, and the whole
order after it (every field but the unstored ``plan``); the trace is reduced
to a SHA-256 pinned below. Enum members are recorded as their string value
(the snapshot and the wire carry that), so a record format that stores a
plain string where an enum was is no change; any value, order of effects or
order of keys in a map that differs is.

The scenarios: sample retail and telecom orders (``oms.sample``, back-orders
among them) answered by a domain that succeeds, fails, retries or opens its
breaker at random (seeded), with cancels, operator actions and restarts
(``Resume`` from a reloaded snapshot); and 400 seeds of the randomized run
of ``test_engine_fuzz`` (crashes, timers, events, hold and compensate
policies, partial item failure, jeopardy).

When a change is *meant* to alter the output, run this module with
``GOLDEN_DUMP=DIR`` on the code before and after and diff the files it
writes (one JSON line per message); then update the digests here.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import normalized, retail_order
from test_engine import RETAIL, TELECOM
from test_engine_fuzz import Run

from oms import snapshot
from oms.engine import Engine, hold_internal_error, new_order
from oms.errors import DomainError
from oms.messages import (
    Cancel,
    CommandResult,
    DomainEvent,
    Operate,
    Resume,
    Send,
    Start,
    Timer,
    TimerFired,
    Turn,
)
from oms.model import Order
from oms.process import ProcessDef
from oms.sample import sample_orders
from oms.templates import Template, order_facts, resolve


def plain(value: Any) -> Any:
    """A JSON-able form that keeps every value, type of number and key order."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return ["f", repr(value)]
    if isinstance(value, dict):
        return ["d", [[plain(k), plain(v)] for k, v in value.items()]]
    if type(value) is Send:  # its raw bytes are its args' own (checked), not recorded
        assert value.raw is None or bytes(value.raw) == msgspec.msgpack.encode(value.args)
        return [type(value).__name__, [plain(v) for v in value[:-1]]]
    if hasattr(value, "_fields"):  # messages and effects (NamedTuples)
        return [type(value).__name__, [plain(v) for v in value]]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, DomainError):
        return ["err", plain(value.to_wire())]
    if isinstance(value, msgspec.Raw):  # a step's kept arguments: the map they encode
        return plain(msgspec.msgpack.decode(value))
    struct_fields = getattr(type(value), "__struct_fields__", None)  # Order, Step (msgspec)
    if struct_fields is not None:
        return [type(value).__name__, [[name, plain(getattr(value, name))]
                                       for name in struct_fields if name != "plan"]]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [type(value).__name__, [[f.name, plain(getattr(value, f.name))]
                                       for f in dataclasses.fields(value) if f.name != "plan"]]
    return ["other", type(value).__name__, repr(value)]


class Trace:
    def __init__(self, name: str) -> None:
        self.hash = hashlib.sha256()
        folder = os.environ.get("GOLDEN_DUMP")
        self.dump = open(Path(folder) / f"{name}.jsonl", "w") if folder else None  # noqa: SIM115

    def add(self, msg: Any, turning: Any, order: Order) -> None:
        line = json.dumps([plain(msg), plain(turning.effects), turning.changed, turning.stale,
                           plain(order)], separators=(",", ":"))
        self.hash.update(line.encode())
        self.hash.update(b"\n")
        if self.dump is not None:
            self.dump.write(line + "\n")

    def digest(self) -> str:
        if self.dump is not None:
            self.dump.close()
        return self.hash.hexdigest()


ERRORS = [DomainError("unavailable", "down", True), DomainError("refused", "no", False),
          DomainError("circuit_open", "open", True)]


class Shop:
    """Sample orders through one engine each, with a seeded domain."""

    def __init__(self, trace: Trace, proc: ProcessDef, seed: int) -> None:
        self.trace, self.proc = trace, proc
        self.engine = Engine(proc)
        self.rng = random.Random(seed)
        self.now = 1000.0

    def feed(self, order: Order, msg: Any) -> list[Any]:
        self.now += 0.25
        turning = self.engine.handle(order, msg, self.now)
        self.trace.add(msg, turning, order)
        return list(turning.effects)

    def answer(self, cmd: Send) -> CommandResult:
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            error = rng.choice(ERRORS)
            data = {"retry_after": 0.5} if error.code == "circuit_open" else None
            return CommandResult(cmd.command_id, False, data, error)
        data: dict[str, Any] = {
            "reserve_stock": {"reservation_id": f"r{rng.randint(1, 99)}",
                              "status": rng.choice(["reserved"] * 4 + ["backordered"])},
            "create_invoice": {"invoice_id": f"inv{rng.randint(1, 99)}"},
            "capture_payment": {"payment_id": "pay"},
            "create_shipment": {"shipment_id": "s", "tracking_number": "T1"},
            "activate_service": {"service_id": f"svc{rng.randint(1, 99)}"},
            "modify_service": {"previous_attributes": {"speed": "old"}},
            "deactivate_service": {"product_id": "p-old", "attributes": {}},
        }.get(cmd.op, {})
        return CommandResult(cmd.command_id, True, data)

    def run(self, n: int, raw: dict[str, Any]) -> None:
        rng = self.rng
        order = new_order(f"O{n:06d}", normalized(raw), self.proc, self.now)
        out: list[Any] = []
        timers: list[Timer] = []
        pending = self.feed(order, Start())
        if order.seq_key and not order.turn:
            pending += self.feed(order, Turn(go=True))
        for _ in range(200):
            out = [fx for fx in pending if isinstance(fx, Send)]
            timers += [fx for fx in pending if isinstance(fx, Timer)]
            pending = []
            r = rng.random()
            if r < 0.03:
                pending += self.feed(order, Cancel("changed my mind", None, None))
            elif r < 0.05:
                order = snapshot.decode(snapshot.encode(order))  # a restart
                out.clear()
                timers.clear()
                pending += self.feed(order, Resume())
                continue
            elif r < 0.07 and order.state == "held":
                pending += self.feed(order, Operate(rng.choice(["retry", "skip", "abort"]),
                                                    None, "ann", "why", None))
            for cmd in out:
                pending += self.feed(order, self.answer(cmd))
            if not pending and timers:
                pending += self.feed(order, TimerFired(timers.pop(0).token))
            if pending:
                continue
            waits = [s for s in order.steps.values() if s.status == "running" and s.wait]
            if waits:
                system = "warehouse" if waits[0].wait == "stock_reserved" else "shipping"
                pending += self.feed(order, DomainEvent(f"e{n}", system, waits[0].wait,
                                                        {"at": n}))
            elif order.state == "held":
                pending += self.feed(order, Operate("skip", None, "ann", "stuck", None))
            else:
                break


def shop(name: str, count: int, telecom_ratio: float, scarce_ratio: float) -> str:
    trace = Trace(name)
    shops = {"retail": Shop(trace, RETAIL, 7), "telecom": Shop(trace, TELECOM, 8)}
    for n, raw in enumerate(sample_orders(count, seed=3, source="golden", prefix="G-",
                                          telecom_ratio=telecom_ratio,
                                          scarce_ratio=scarce_ratio)):
        shops[raw["order_type"]].run(n, raw)
    return trace.digest()


class TracedRun(Run):
    trace: Trace

    def feed(self, msg: Any) -> Any:
        turning = super().feed(msg)
        self.trace.add(msg, turning, self.order)
        return turning

    def crash(self, dropped: tuple[Any, ...] = ()) -> None:  # as Run.crash, recorded
        self.now += 0.01
        turning = hold_internal_error(self.engine, self.order, "X: boom", dropped, self.now)
        self.trace.add(["crash", list(dropped)], turning, self.order)
        self.effects(turning)


def fuzz(name: str, seeds: range) -> str:
    trace = Trace(name)
    for seed in seeds:
        one = TracedRun(seed)
        one.trace = trace
        one.chaos()
        one.drain()
    return trace.digest()


GOLDEN = {
    "retail": "db21a197f3626a14c612a1f868ff32e9ae79ee0a2c0d7de6ca8e6a048c57cd80",
    "telecom": "3aeed7e198807bf515f5fc2b82ce860bb1842702493aa0dd2ce59051f730ed70",
    "mixed": "599f46f12f7f59fc3700d9fb0b361beebf7db0c0c7afac90250ab350becaa76f",
    "fuzz": "b5cbf4065a8b721840258b256a86dc5b47ec3044130bcfb90e92c41386b23c02",
}

SCENARIOS = {
    "retail": lambda: shop("retail", 150, 0.0, 0.1),
    "telecom": lambda: shop("telecom", 100, 1.0, 0.0),
    "mixed": lambda: shop("mixed", 150, 0.3, 0.2),
    "fuzz": lambda: fuzz("fuzz", range(400)),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_the_engine_produces_exactly_what_it_did(name: str) -> None:
    assert SCENARIOS[name]() == GOLDEN[name], (
        f"the engine's outputs for {name!r} changed: see this module's docstring")


# -- the shortcuts the engine's hot paths take, on hostile values --------------


def test_odd_item_ids_name_their_own_step_undo_and_generation() -> None:
    """``find`` skips the note and undo checks when no colon follows the
    order id, and the retry generation when no '#' is in the key: item ids
    holding ':', '#', 'notify:' or ':undo' still name their own step."""
    items = [{"id": i, "product_id": "fiber", "quantity": 1, "unit_price_minor": 100}
             for i in ("a:undo", "b#7", "notify:1", "c#x", "~d")]
    raw = {"source_system": "s", "external_id": "e", "order_type": "telecom",
           "customer": {"id": "c"}, "items": items,
           "customer_address": {"line1": "x", "city": "y", "postal_code": "1",
                                "country": "DE"}}
    order = new_order("o:1", normalized(raw), TELECOM, 1.0)
    turning = Engine(TELECOM).handle(order, Start(), 2.0)
    steps = [s for s in order.steps.values() if s.item_id is not None]
    assert len(steps) == len(items)
    for step in steps:
        cid = turning.command_id(step)
        assert turning.find(cid) == ("step", step, -1), cid
        assert turning.find(f"{cid}:undo") == ("comp", step, -1), cid
        step.gen = 2
        assert turning.find(cid) == ("none", None, -1), cid  # an earlier generation's
        assert turning.find(turning.command_id(step)) == ("step", step, -1), cid
        step.gen = 0
    assert turning.find("o:1notify:0")[0] == "none"  # the colon after the id is required
    assert turning.find("o:2:notify:0")[0] == "none"


def test_a_template_reads_nothing_of_the_kept_facts_but_what_it_names() -> None:
    """A template naming only facts that never change gets the order's kept
    facts as its scope; a name that is no fact stays None, whatever is kept."""
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    raw = {"cur": "$order.currency", "none": "$order.nope", "deep": "$order.customer.id",
           "whole": "$order.items.0", "const": 5}
    template = Template(raw)
    assert template.fixed
    kept: dict[str, Any] = {"total_minor": 1, "stock_items": []}
    scope = template.order_scope(order, kept)
    expected = resolve(raw, {"order": order_facts(order)})
    assert template.fill({"order": scope}) == expected
    assert expected == {"cur": "EUR", "none": None, "deep": "c-1", "whole": None, "const": 5}
    assert not Template({"done": "$order.completed_items"}).fixed  # it changes: built anew
    assert not Template({"all": "$order"}).fixed
