"""The snapshot record with settled steps kept encoded (``oms.snapshot_kept``):
the same bytes as the plain record, and the definitions that may not keep."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import msgspec
import pytest
from helpers import Driver, ok_domain, retail_order
from test_engine import TELECOM, TELECOM_ORDER, _retail_text

from oms import snapshot, snapshot_kept
from oms.engine import Engine
from oms.messages import Cancel, Operate
from oms.model import Order
from oms.process import ProcessDef, builtin_processes, parse_process
from oms.states import OrderState, StepStatus

PROCS = builtin_processes()


class Saving(Driver):
    """A driver that takes a snapshot after every message, as an order actor
    does after a slice, with its settled steps kept: check mode (on for the
    suite) raises if the bytes differ from the plain record."""

    kept = 0  # snapshots that used a kept step or note

    def feed(self, msg: object) -> None:
        domain = self.domain
        self.domain = lambda cmd: None  # one message at a time: replies below
        replies = []

        def answer(cmd: object) -> None:
            res = domain(cmd)  # type: ignore[arg-type]
            if res is not None:
                replies.append(res)

        self.domain = answer  # type: ignore[assignment]
        super().feed(msg)
        self.domain = domain
        self.save()
        for res in replies:
            self.feed(res)

    def save(self) -> bytes:
        raw = snapshot_kept.encode(self.order)
        assert raw == snapshot.encode(self.order)
        kept = self.order.__dict__.get(snapshot_kept.KEPT)
        if kept and any(type(p) is msgspec.Raw for p in [*kept.steps.values(), *kept.notes]):
            self.kept += 1
        return raw


def test_check_mode_is_on_for_the_suite() -> None:
    assert snapshot_kept.CHECK is not None


def test_the_builtin_definitions_keep_settled_steps() -> None:
    assert all(snapshot_kept.keepable(p) for p in PROCS.values())
    assert all(Engine(p).keeps_encoded for p in PROCS.values())


def test_a_retail_order_keeps_its_done_steps_and_notes_and_writes_the_same_bytes() -> None:
    d = Saving(PROCS["retail"], retail_order(), ok_domain())
    d.start()
    d.event("shipment_delivered", {"shipment_id": "s"})
    assert d.order.state == OrderState.COMPLETED
    kept = d.order.__dict__[snapshot_kept.KEPT]
    assert all(type(p) is msgspec.Raw for p in kept.steps.values())  # all done by now
    assert d.kept >= 4


def test_a_telecom_order_keeps_its_skipped_and_done_steps() -> None:
    d = Saving(TELECOM, TELECOM_ORDER, ok_domain())
    d.start()
    assert d.order.state == OrderState.COMPLETED
    assert d.kept >= 3


def test_compensation_drops_what_is_kept() -> None:
    """A decline after three done steps: their undo changes them."""
    from test_engine import DECLINED

    d = Saving(PROCS["retail"], retail_order(), ok_domain({"capture_payment": DECLINED}))
    d.start()  # reserve and invoice done and kept, payment declined: compensation
    assert d.order.state == OrderState.FAILED
    assert d.order.steps["reserve_stock"].status == StepStatus.COMPENSATED
    assert snapshot_kept.KEPT not in d.order.__dict__


def test_an_operator_action_or_a_cancel_drops_what_is_kept() -> None:
    d = Saving(PROCS["retail"], retail_order(), lambda cmd: None if cmd.op == "capture_payment"
               else ok_domain()(cmd))
    d.start()
    assert d.kept
    Driver.feed(d, Operate("retry", None, "ann", "r", None))  # no snapshot after it
    assert snapshot_kept.KEPT not in d.order.__dict__
    d.save()
    assert snapshot_kept.KEPT in d.order.__dict__
    Driver.feed(d, Cancel("c", None, None))  # before the point of no return
    assert snapshot_kept.KEPT not in d.order.__dict__
    assert d.order.state == OrderState.ASSESSING_CANCELLATION and d.order.target is not None
    d.save()  # compensating: nothing is kept
    assert snapshot_kept.KEPT not in d.order.__dict__


def test_check_mode_catches_a_kept_step_that_changed_behind_its_back() -> None:
    """What check mode is for: a step changed after it was kept (here by the
    test itself, as a change the rule missed would) fails the snapshot."""
    d = Driver(PROCS["retail"], retail_order(), ok_domain())
    d.start()
    snapshot_kept.encode(d.order)
    d.order.steps["reserve_stock"].result["status"] = "changed"  # type: ignore[index]
    with _reported() as reports, pytest.raises(snapshot_kept.KeptMismatch,
                                               match="stale: reserve_stock"):
        snapshot_kept.encode(d.order)
    assert len(reports) == 1 and "reserve_stock" in reports[0]


@contextlib.contextmanager
def _reported() -> Iterator[list[str]]:
    """Check mode reporting to a list, not to the suite's file (which fails
    the test): for the tests that make a difference on purpose."""
    reports: list[str] = []
    saved, snapshot_kept.CHECK = snapshot_kept.CHECK, reports.append
    try:
        yield reports
    finally:
        snapshot_kept.CHECK = saved


def _whole_item() -> str:
    return """
[process]
order_type = "retail"
description = "each item's map itself in a step's arguments"
[defaults]
timeout_s = 5.0
[steps.ship.per_item.add]
system = "shipping"
op = "ship_item"
args = { item = "$item" }
[steps.check]
after = ["ship"]
[steps.check.per_item.add]
system = "warehouse"
op = "check_item"
args = { id = "$item.id" }
"""


def test_a_definition_that_puts_an_items_map_in_arguments_keeps_nothing() -> None:
    """The item's state changes when its last step is done, after its first
    step settled: its kept record would be stale, so nothing is kept (the
    test shows it would be)."""
    proc = parse_process(_whole_item(), "whole-item.toml")
    assert not snapshot_kept.keepable(proc) and not Engine(proc).keeps_encoded
    order = _run_keeping_anyway(proc)
    assert order.state == OrderState.COMPLETED


def test_a_key_collected_by_a_per_item_step_and_another_keeps_nothing() -> None:
    """A per-item step appends to the list another step collected: that
    step's result changes after it settled."""
    text = _retail_text().replace('collect = ["reservation_id"]',
                                  'collect = { lines = "lines" }')
    proc = parse_process(text + """
[steps.label]
after = ["reserve_stock"]
[steps.label.per_item.add]
system = "shipping"
op = "print_label"
args = { id = "$item.id" }
collect = { lines = "label" }
""", "collect.toml")
    assert not snapshot_kept.keepable(proc) and not Engine(proc).keeps_encoded


def _run_keeping_anyway(proc: ProcessDef) -> Order:
    """Drive an order of ``proc`` with its snapshots kept although its engine
    says not to: check mode raises at the first stale record. Then the same
    order again, plain."""
    with _reported(), pytest.raises(snapshot_kept.KeptMismatch, match="stale: ship"):
        Saving(proc, retail_order(), ok_domain()).start()
    d = Driver(proc, retail_order(), ok_domain())
    d.start()
    return d.order
