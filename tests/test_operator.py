"""Operator actions against every state an order can be in (pure engine).

Issue 12 defect 3 (abort of a pending or acknowledged order raised
``IllegalTransition``), issue 13 (skip cannot strand an order, abort on a
compensation fallout, the ``fallout`` block of the view) and the
``internal_error`` hold of a crashed handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import Driver, ok_domain, retail_order
from test_engine import (
    BACKORDERED,
    DECLINED,
    RETAIL,
    TELECOM,
    TELECOM_ORDER,
    UNKNOWN_SERVICE,
    fallout_driver,
)

from oms.errors import DomainError
from oms.messages import Cancel, CommandResult, Operate, Reply, Resume, Sequence, Start, Turn
from oms.process import parse_process
from oms.states import OrderState, StepStatus

S = OrderState
FAILS = CommandResult("", False, None, DomainError("refused", "no", False))


def _pending() -> Driver:
    d = Driver(TELECOM, TELECOM_ORDER, ok_domain())
    d.feed(Start())
    d.feed(Turn(go=False))  # an earlier order of the customer runs
    assert d.order.state == S.PENDING
    return d


def _internal_error() -> Driver:
    """As the runtime leaves an order whose handler crashed."""
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": None}))
    d.start()
    d.order.state, d.order.state_reason = S.HELD, "internal_error"
    d.order.failure = {"error": {"code": "internal_error", "message": "KeyError: 'x'"}}
    return d


def _started(domain: dict[str, Any], proc: Any = RETAIL, raw: Any = None) -> Driver:
    d = Driver(proc, raw or retail_order(), ok_domain(domain))
    d.start()
    return d


def _then(d: Driver, *msgs: Any) -> Driver:
    for msg in msgs:
        d.feed(msg)
    return d


def _comp_fallout(cancelled: bool = False) -> Driver:
    if cancelled:
        d = _started({"capture_payment": None, "void_invoice": FAILS})
        d.feed(Cancel("changed my mind", "c"))
        d.feed(CommandResult("o-1:capture_payment", False, None, DECLINED.error))
    else:
        d = _started({"capture_payment": DECLINED, "void_invoice": FAILS})
    assert (d.order.state, d.order.state_reason) == (S.HELD, "fallout")
    assert d.order.failure["compensation"]
    return d


STATES: dict[str, Callable[[], Driver]] = {
    "acknowledged": lambda: Driver(RETAIL, retail_order(), ok_domain()),
    "pending": _pending,
    "inProgress": lambda: _started({"create_shipment": None}),
    "held/awaiting_stock": lambda: _started({"reserve_stock": BACKORDERED}),
    "held/fallout": lambda: _then(fallout_driver({"capture_payment": DECLINED}), Start()),
    "held/fallout-compensation": _comp_fallout,
    "held/fallout-compensation-of-cancel": lambda: _comp_fallout(cancelled=True),
    "held/internal_error": _internal_error,
    "held/compensating": lambda: _then(
        fallout_driver({"capture_payment": DECLINED, "void_invoice": None}), Start(),
        Operate("abort", None, "ann", None, "x")),
    "assessingCancellation": lambda: _then(_started({"create_invoice": None}),
                                           Cancel(None, "c")),
    "pendingCancellation": lambda: _then(_started({"create_invoice": None,
                                                   "void_invoice": None}),
                                         Cancel(None, "c"),
                                         CommandResult("o-1:create_invoice", True, {})),
    "completed": lambda: _delivered(),  # noqa: PLW0108 - defined below
    "partial": lambda: _started({"modify_service": UNKNOWN_SERVICE}, TELECOM, TELECOM_ORDER),
    "failed": lambda: _started({"capture_payment": DECLINED}),
    "cancelled": lambda: _then(_started({"create_invoice": None}), Cancel(None, "c"),
                               CommandResult("o-1:create_invoice", True, {"invoice_id": "i"})),
}


def _delivered() -> Driver:
    d = _started({})
    d.event("shipment_delivered", {})
    return d


REQUESTS = [(a, s) for a in ("retry", "skip", "abort", "cancel", "explode")
            for s in (None, "capture_payment", "await_delivery", "reserve_stock", "nope")]


def _replies(d: Driver) -> list[dict[str, Any]]:
    return [fx.payload for fx in d.effects if isinstance(fx, Reply)]


@pytest.mark.parametrize("state", list(STATES))
def test_no_operator_request_in_any_state_raises_and_each_gets_one_reply(state: str) -> None:
    for action, step in REQUESTS:
        d = STATES[state]()
        label = state.split("/", maxsplit=1)[0]
        assert str(d.order.state) == label, (state, d.order.state)
        before = len(_replies(d))
        d.feed(Operate(action, step, "ann", "why", "r"))
        replies = _replies(d)[before:]
        assert len(replies) == 1, (state, action, step, replies)
        assert replies[0]["type"] in ("operator_accepted", "operator_rejected")
        if replies[0]["type"] == "operator_rejected":
            assert replies[0]["reason"]
        # whatever was decided, the order can still be driven to its end
        d.domain = ok_domain()
        d.feed(Resume())
        d.fire_timers()
        d.event("shipment_delivered", {})
        d.event("stock_reserved", {}, system="warehouse")
        d.feed(Cancel(None, "c2"))


@pytest.mark.parametrize("state", list(STATES))
def test_the_view_lists_exactly_the_actions_the_engine_accepts(state: str) -> None:
    d = STATES[state]()
    view = d.order.view(RETAIL.point_of_no_return)
    block = view.get("fallout")
    assert (block is not None) == (d.order.state == S.HELD)
    if block is None:
        return
    assert set(block) == {"step", "item", "compensation", "error", "reason", "actions", "hint"}
    assert block["reason"] == d.order.state_reason and block["hint"].endswith(".")
    for action in ("retry", "skip", "abort"):
        probe = STATES[state]()
        probe.feed(Operate(action, None, "ann", None, "r"))
        accepted = _replies(probe)[-1]["type"] == "operator_accepted"
        assert accepted == (action in block["actions"]), (state, action, block)


def test_fallout_block_names_step_error_and_what_to_do() -> None:
    d = fallout_driver({"capture_payment": DECLINED})
    d.start()
    block = d.order.view()["fallout"]
    assert block["step"] == "capture_payment" and block["item"] is None
    assert block["error"] == {"code": "payment_declined", "message": "no"}
    assert not block["compensation"] and block["reason"] == "fallout"
    assert block["actions"] == ["retry", "skip", "abort", "cancel"]
    assert "retry it" in block["hint"]
    comp = _comp_fallout().order.view()["fallout"]
    assert comp["compensation"] and comp["step"] == "create_invoice"
    assert comp["actions"] == ["retry", "skip"] and "abort is not possible" in comp["hint"]
    stock = _started({"reserve_stock": BACKORDERED}).order.view("create_shipment")["fallout"]
    assert stock["step"] == "reserve_stock" and stock["reason"] == "awaiting_stock"
    assert "stock_reserved from warehouse" in stock["hint"]
    assert stock["actions"] == ["skip", "abort", "cancel"]


# -- abort before the order runs (defect 3) --------------------------------

@pytest.mark.parametrize("make", [lambda: Driver(RETAIL, retail_order(), ok_domain()),
                                  _pending])
def test_abort_of_acknowledged_or_pending_order_fails_it_and_gives_up_its_turn(
        make: Callable[[], Driver]) -> None:
    d = make()
    d.feed(Operate("abort", None, "ann", "duplicate order", "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert (d.order.state, d.order.state_reason) == (S.FAILED, "aborted")
    assert not [s for s in d.sent if s.system not in ("crm",)]  # nothing was sent
    if d.order.seq_key:
        assert Sequence(d.order.seq_key, enter=False) in d.effects
    # after a restart, or when its turn comes after all, it does not run
    for msg in (Start(), Resume(), Turn(go=True)):
        d.feed(msg)
    assert d.order.state == S.FAILED
    assert not [s for s in d.sent if s.system not in ("crm",)]


def test_retry_of_the_failed_undo_of_a_cancel_ends_cancelled() -> None:
    d = _comp_fallout(cancelled=True)
    d.domain = ok_domain()
    d.feed(Operate("retry", None, "ann", None, "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.state == S.CANCELLED


def test_abort_of_a_compensation_fallout_says_what_to_do_instead() -> None:
    d = _comp_fallout()
    d.feed(Operate("abort", None, "ann", None, "r"))
    reply = _replies(d)[-1]
    assert reply["type"] == "operator_rejected"
    assert "retry the undo" in reply["reason"] and "skip it" in reply["reason"]
    d.feed(Operate("skip", None, "ann", "voided by hand", "r"))
    assert (d.order.state, d.order.state_reason) == (S.FAILED, "payment_declined")
    assert d.order.failure["step"] == "capture_payment"  # what failed, not the undo
    assert d.order.steps["create_invoice"].status == StepStatus.COMPENSATED


def test_internal_error_hold_can_be_retried_skipped_or_aborted() -> None:
    d = _internal_error()
    d.feed(Operate("retry", None, "ann", None, "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.state == S.IN_PROGRESS
    assert [s.command_id for s in d.sent].count("o-1:create_shipment") == 2  # re-sent
    d = _internal_error()
    d.feed(Operate("abort", None, "ann", None, "r"))
    d.domain = ok_domain()
    d.feed(CommandResult("o-1:create_shipment", False, None, DECLINED.error))
    assert d.order.state == S.FAILED
    d = _internal_error()
    d.order.failure["step"] = "create_shipment"  # the runtime may name the step
    d.feed(Operate("skip", None, "ann", None, "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.steps["create_shipment"].status == StepStatus.DONE


# -- skip cannot strand an order (issue 13) --------------------------------

def test_skipping_a_step_skips_the_wait_that_depends_on_it() -> None:
    d = fallout_driver({"create_shipment": DECLINED})
    d.start()
    assert d.order.failure["step"] == "create_shipment"
    d.feed(Operate("skip", "create_shipment", "ann", "shipped by hand", "r"))
    wait = d.order.steps["await_delivery"]
    assert wait.status == StepStatus.SKIPPED
    assert wait.result == {"skipped_by": "ann", "because": "create_shipment"}
    assert d.order.state == S.COMPLETED


def test_a_stranded_wait_can_be_skipped() -> None:
    d = _started({})
    assert d.order.steps["await_delivery"].wait == "shipment_delivered"
    d.feed(Operate("skip", None, "ann", None, "r"))  # which step? it must be named
    assert "name the step" in _replies(d)[-1]["reason"]
    d.feed(Operate("skip", "await_delivery", "ann", "delivered, says the driver", "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.state == S.COMPLETED


def test_skipping_the_stock_wait_releases_the_hold() -> None:
    d = _started({"reserve_stock": BACKORDERED})
    d.feed(Operate("skip", None, "ann", "reserved by hand", "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.state == S.IN_PROGRESS and "create_invoice" in d.ops()
    assert d.order.steps["reserve_stock"].result["reservation_id"] == "r-9"


# -- a cancelled or aborted pending order leaves its queue (defect 8) -------

class Customer:
    """Telecom orders of one customer: pure engines wired to a real
    ``Sequencer`` whose messages are handled synchronously, and a deliver
    that, like the router, refuses finished orders."""

    def __init__(self, n: int, domain: Any) -> None:
        from actors.sequencer import SeqRequest, Sequencer

        self.request = SeqRequest
        self.seq = Sequencer(self.deliver)
        self.drivers = {}
        for i in range(n):
            raw = dict(TELECOM_ORDER, external_id=f"t{i}")
            d = Driver(TELECOM, raw, domain)
            d.order.order_id = f"o-{i}"
            self.drivers[d.order.order_id] = d
        self.turns: list[tuple[str, bool]] = []

    def deliver(self, order_id: str, msg: Any) -> bool:
        d = self.drivers[order_id]
        if d.order.finished:
            return False
        self.turns.append((order_id, msg.go))
        self.feed(d, msg)
        return True

    def feed(self, d: Driver, msg: Any) -> None:
        seen = len(d.effects)
        d.feed(msg)
        for fx in d.effects[seen:]:
            if isinstance(fx, Sequence):
                self.seq.on_receive(self.request(fx.key, d.order.order_id, fx.enter))

    def enter(self, order_id: str) -> None:
        d = self.drivers[order_id]
        self.seq.on_receive(self.request(d.order.seq_key, order_id, True))
        self.feed(d, Start())


def _no_sequence_turns(d: Driver) -> None:
    d.effects = [fx for fx in d.effects if not isinstance(fx, Sequence)]


@pytest.mark.parametrize("how", ["cancel", "abort"])
def test_cancelled_or_aborted_pending_order_leaves_its_queue_at_once(how: str) -> None:
    held: list[Any] = []

    def domain(cmd: Any) -> Any:
        if cmd.op == "activate_service" and not held:
            held.append(cmd)
            return None  # the first order's provisioning is in flight
        return ok_domain()(cmd)

    c = Customer(3, domain)
    for d in c.drivers.values():
        d.domain = domain
        _no_sequence_turns(d)
    for oid in c.drivers:
        c.enter(oid)
    first, second, third = c.drivers.values()
    assert first.order.state == S.IN_PROGRESS
    assert (second.order.state, third.order.state) == (S.PENDING, S.PENDING)
    msg = Cancel("no", "c") if how == "cancel" else Operate("abort", None, "ann", None, "r")
    c.feed(second, msg)
    assert second.order.state == (S.CANCELLED if how == "cancel" else S.FAILED)
    assert list(c.seq.queues["telecom/c9"]) == ["o-0", "o-2"]  # gone at once, not at a restart
    c.feed(first, ok_domain()(held[0]))
    assert first.order.state == S.COMPLETED
    assert third.order.state == S.COMPLETED  # ran without a restart
    assert "telecom/c9" not in c.seq.queues


def test_a_turn_for_a_finished_order_passes_to_the_next() -> None:
    """A leave that was lost (or an enter that came after it) cannot block the
    queue: a finished head is dropped when its turn cannot be delivered."""
    c = Customer(3, lambda cmd: None)  # no domain system answers
    for oid in ("o-0", "o-1", "o-2"):
        c.seq.on_receive(c.request("telecom/c9", oid, True))
    assert c.turns == [("o-0", True), ("o-1", False), ("o-2", False)]
    c.drivers["o-1"].order.state = S.CANCELLED  # finished; its leave never arrived
    c.seq.on_receive(c.request("telecom/c9", "o-0", False))
    assert c.turns[-1] == ("o-2", True)
    assert list(c.seq.queues["telecom/c9"]) == ["o-2"]
    c.seq.on_receive(c.request("telecom/c9", "o-2", False))
    assert "telecom/c9" not in c.seq.queues


PARALLEL = """
[process]
order_type = "par"
failure_policy = "hold"
[steps.charge]
system = "billing"
op = "capture_payment"
[steps.await_ok]
wait_event = { name = "approved", system = "crm" }
[steps.finish]
after = ["charge", "await_ok"]
system = "shipping"
op = "create_shipment"
"""


def test_skipping_a_wait_of_an_order_held_for_a_failed_step_keeps_it_held() -> None:
    proc = parse_process(PARALLEL, "par.toml")
    d = Driver(proc, retail_order(), ok_domain({"capture_payment": DECLINED}))
    d.start()
    assert (d.order.state, d.order.failure["step"]) == (S.HELD, "charge")
    d.feed(Operate("skip", "await_ok", "ann", None, "r"))
    assert _replies(d)[-1]["type"] == "operator_accepted"
    assert d.order.steps["await_ok"].status == StepStatus.DONE
    assert d.order.steps["charge"].status == StepStatus.FAILED  # not the one skipped
    assert (d.order.state, d.order.state_reason) == (S.HELD, "fallout")
    d.feed(Operate("skip", None, "ann", None, "r"))
    assert d.order.state == S.COMPLETED
