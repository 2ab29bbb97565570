"""The process engine as a plain object: many cases, no threads, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Driver, normalized, ok_domain, retail_order, thawed
from hypothesis import given, settings
from hypothesis import strategies as st

from app.recovery import needs_resume
from oms import codec, snapshot
from oms.engine import Engine, Turning, new_order
from oms.errors import DomainError
from oms.messages import (
    Cancel,
    CommandResult,
    Publish,
    Reply,
    Resume,
    Send,
    Start,
    Timer,
    TimerFired,
)
from oms.outstanding import REPLY, TIMER, awaiting_reply, command_out, outstanding
from oms.process import builtin_processes, parse_process
from oms.states import OrderState, StepStatus
from oms.templates import FACTS, Template, compile_template, order_facts, resolve

PROCS = builtin_processes()
RETAIL, TELECOM = PROCS["retail"], PROCS["telecom"]
DECLINED = CommandResult("", False, None, DomainError("payment_declined", "no", False))
UNAVAILABLE = CommandResult("", False, None, DomainError("unavailable", "down", True))
BACKORDERED = CommandResult("", True, {"reservation_id": "r-9", "status": "backordered"})


def retail(overrides: dict[str, Any] | None = None) -> Driver:
    return Driver(RETAIL, retail_order(), ok_domain(overrides))


def published(d: Driver, kind: str) -> list[dict[str, Any]]:
    return [fx.payload for fx in d.effects if isinstance(fx, Publish)
            and fx.payload["type"] == kind]


def test_retail_happy_path() -> None:
    d = retail()
    d.start()
    assert d.order.state == OrderState.IN_PROGRESS
    assert [s.op for s in d.sent if s.system != "crm"] == [
        "reserve_stock", "create_invoice", "capture_payment", "create_shipment"]
    assert d.order.steps["await_delivery"].wait == "shipment_delivered"
    d.event("shipment_delivered", {"shipment_id": "s"})
    order = d.order
    assert order.state == OrderState.COMPLETED
    assert [h["state"] for h in order.history] == ["acknowledged", "inProgress", "completed"]
    assert order.summary is not None
    assert set(order.summary["results"]) == {"reservation_id", "invoice_id", "payment_id",
                                             "shipment_id", "tracking_number"}
    assert order.summary["total_minor"] == 2 * 1000 + 550
    assert all(it["state"] == "completed" for it in order.items)
    crm = [s.args["state"] for s in d.sent if s.system == "crm"]
    assert crm == ["inProgress", "completed"]
    assert len(published(d, "order_summary")) == 1
    assert order.finished


def test_arguments_come_from_order_and_earlier_results() -> None:
    d = retail()
    d.start()
    by_op = {s.op: s for s in d.sent}
    assert by_op["reserve_stock"].args["items"] == [
        {"product_id": "p-1", "quantity": 2}, {"product_id": "p-2", "quantity": 1}]
    invoice_id = d.order.steps["create_invoice"].result["invoice_id"]
    assert by_op["capture_payment"].args == {"invoice_id": invoice_id, "amount_minor": 2550,
                                             "currency": "EUR"}
    reservation = d.order.steps["reserve_stock"].result["reservation_id"]
    assert by_op["create_shipment"].args["reservation_id"] == reservation


def test_command_ids_are_stable_and_distinct() -> None:
    d = retail()
    d.start()
    ids = [s.command_id for s in d.sent]
    assert len(ids) == len(set(ids))
    assert "o-1:reserve_stock" in ids


def test_backorder_holds_until_stock_reserved() -> None:
    d = retail({"reserve_stock": BACKORDERED})
    d.start()
    assert (d.order.state, d.order.state_reason) == (OrderState.HELD, "awaiting_stock")
    assert [s.op for s in d.sent if s.system != "crm"] == ["reserve_stock"]
    d.event("stock_reserved", {"reservation_id": "r-9"}, system="warehouse")
    assert d.order.state == OrderState.IN_PROGRESS
    assert "create_shipment" in d.ops()
    assert [s.args["state"] for s in d.sent if s.system == "crm"] == [
        "inProgress", "held", "inProgress"]


def test_event_arriving_before_the_wait_is_kept() -> None:
    d = retail({"create_shipment": None})  # shipment reply not yet back
    d.start()
    d.event("shipment_delivered", {"shipment_id": "s"})
    assert d.order.early_events
    cid = next(s.command_id for s in d.sent if s.op == "create_shipment")
    d.feed(CommandResult(cid, True, {"shipment_id": "s", "tracking_number": "t"}))
    assert d.order.state == OrderState.COMPLETED


def test_decline_compensates_completed_steps_in_reverse() -> None:
    d = retail({"capture_payment": DECLINED})
    d.start()
    assert (d.order.state, d.order.state_reason) == (OrderState.FAILED, "payment_declined")
    ops = [s.op for s in d.sent if s.system != "crm"]
    assert ops == ["reserve_stock", "create_invoice", "capture_payment", "void_invoice",
                   "release_stock"]
    statuses = {k: s.status for k, s in d.order.steps.items()}
    assert statuses == {"reserve_stock": StepStatus.COMPENSATED,
                        "create_invoice": StepStatus.COMPENSATED,
                        "capture_payment": StepStatus.FAILED,
                        "create_shipment": StepStatus.SKIPPED,
                        "await_delivery": StepStatus.SKIPPED}
    assert d.order.failure["step"] == "capture_payment"
    assert all(it["state"] == "failed" for it in d.order.items)


def test_retryable_failure_backs_off_and_resends_same_command() -> None:
    replies = iter([UNAVAILABLE, UNAVAILABLE])

    def flaky(cmd: Send) -> CommandResult | None:
        if cmd.op == "create_invoice":
            res = next(replies, None)
            if res is not None:
                return res._replace(command_id=cmd.command_id)
        return ok_domain()(cmd)

    d = Driver(RETAIL, retail_order(), flaky)
    d.start()
    assert [t.token[0] for t in d.timers] == ["retry"]
    first_retry_at = d.timers[0].at
    d.fire_timers()
    invoices = [s for s in d.sent if s.op == "create_invoice"]
    assert len(invoices) == 3
    assert len({s.command_id for s in invoices}) == 1
    assert d.order.steps["create_invoice"].attempts == 3
    assert first_retry_at > 1000.0
    assert "create_shipment" in d.ops()


def test_exhausted_retries_fail_the_order() -> None:
    d = retail({"capture_payment": UNAVAILABLE})
    d.start()
    d.fire_timers()
    assert d.order.state == OrderState.FAILED
    assert sum(1 for s in d.sent if s.op == "capture_payment") == RETAIL.step(
        "capture_payment").retry.max_attempts


def test_backoff_grows_and_is_capped() -> None:
    policy = RETAIL.step("reserve_stock").retry
    delays = [policy.delay(n, 0.5) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert max(delays) <= policy.cap_s


def test_late_and_duplicate_results_are_stale() -> None:
    d = retail()
    d.start()
    engine = Engine(RETAIL)
    cid = next(s.command_id for s in d.sent if s.op == "reserve_stock")
    turning = engine.handle(d.order, CommandResult(cid, True, {"reservation_id": "x"}), 2000)
    assert turning.stale and not turning.changed
    turning = engine.handle(d.order, CommandResult("o-1:nope", True, {}), 2000)
    assert turning.stale


def test_resume_resends_in_flight_commands_with_same_ids() -> None:
    d = retail({"create_invoice": None})
    d.start()
    sent = next(s for s in d.sent if s.op == "create_invoice")
    turning = Engine(RETAIL).handle(d.order, Resume(), 3000)
    resent = [fx for fx in turning.effects if isinstance(fx, Send)]
    assert [(s.op, s.command_id, s.args) for s in resent] == [
        (sent.op, sent.command_id, sent.args)]


def test_resume_rearms_backoff_timers() -> None:
    d = retail({"create_invoice": UNAVAILABLE})
    d.start()
    turning = Engine(RETAIL).handle(d.order, Resume(), 1000.5)
    assert [type(fx) for fx in turning.effects] == [Timer]


def test_cancel_before_point_of_no_return_compensates() -> None:
    d = retail({"capture_payment": None})
    d.start()
    d.feed(Cancel("changed my mind", reply_to="r"))
    replies = [fx for fx in d.effects if isinstance(fx, Reply)]
    assert replies[0].payload["type"] == "cancel_accepted"
    assert d.order.state == OrderState.ASSESSING_CANCELLATION  # payment outcome pending
    cid = next(s.command_id for s in d.sent if s.op == "capture_payment")
    d.feed(CommandResult(cid, True, {"payment_id": "pay-1"}))
    assert d.order.state == OrderState.CANCELLED
    undo = [s.op for s in d.sent if s.op in ("refund_payment", "void_invoice", "release_stock")]
    assert undo == ["refund_payment", "void_invoice", "release_stock"]
    assert [h["state"] for h in d.order.history][-3:] == [
        "assessingCancellation", "pendingCancellation", "cancelled"]


def test_cancel_after_point_of_no_return_is_rejected() -> None:
    d = retail()
    d.start()
    d.feed(Cancel(None, reply_to="r"))
    reply = [fx for fx in d.effects if isinstance(fx, Reply)][-1]
    assert reply.payload == {"type": "cancel_rejected", "order_id": "o-1",
                             "reason": "point_of_no_return"}
    assert d.order.state == OrderState.IN_PROGRESS


def test_cancel_of_held_order_releases_stock() -> None:
    d = retail({"reserve_stock": BACKORDERED})
    d.start()
    d.feed(Cancel(None, reply_to="r"))
    assert d.order.state == OrderState.CANCELLED
    assert d.ops()[-2:] == ["release_stock", "notify"]


def test_cancel_of_terminal_order_is_rejected() -> None:
    d = retail({"capture_payment": DECLINED})
    d.start()
    d.feed(Cancel(None, reply_to="r"))
    reply = [fx for fx in d.effects if isinstance(fx, Reply)][-1]
    assert reply.payload["reason"] == "order is already failed"


def test_hold_policy_sends_failed_order_to_fallout() -> None:
    text = (RETAIL_TOML := _retail_text()).replace(
        'failure_policy = "compensate"', 'failure_policy = "hold"')
    assert text != RETAIL_TOML
    proc = parse_process(text, "retail-hold.toml")
    d = Driver(proc, retail_order(), ok_domain({"capture_payment": DECLINED}))
    d.start()
    assert (d.order.state, d.order.state_reason) == (OrderState.HELD, "fallout")
    assert d.order.failure["step"] == "capture_payment"
    assert "void_invoice" not in d.ops()


def _retail_text() -> str:
    from importlib import resources

    return resources.files("oms.processes").joinpath("retail.toml").read_text()


TELECOM_ORDER = {
    "source_system": "crm-ui", "external_id": "t1", "order_type": "telecom",
    "customer": {"id": "c9"},
    "customer_address": {"line1": "x", "city": "y", "postal_code": "1", "country": "DE"},
    "items": [
        {"id": "a", "product_id": "fiber", "quantity": 1, "unit_price_minor": 3000},
        {"id": "m", "action": "modify", "product_id": "tv", "quantity": 1,
         "unit_price_minor": 500, "service_id": "svc-1"},
        {"id": "d", "action": "delete", "product_id": "dsl", "service_id": "svc-2"},
        {"id": "n", "action": "noChange", "product_id": "x"},
    ],
}
UNKNOWN_SERVICE = CommandResult("", False, None, DomainError("unknown_service", "no", False))


def test_telecom_provisions_items_in_parallel_then_invoices() -> None:
    held: list[Send] = []

    def later(cmd: Send) -> CommandResult | None:
        if cmd.system == "provisioning":
            held.append(cmd)
            return None
        return ok_domain()(cmd)

    d = Driver(TELECOM, TELECOM_ORDER, later)
    d.start()
    assert sorted(s.op for s in held) == ["activate_service", "deactivate_service",
                                          "modify_service"]
    assert "create_invoice" not in d.ops()
    assert d.order.steps["provision[n]"].status == StepStatus.SKIPPED
    for cmd in held:
        d.feed(ok_domain()(cmd))
    assert d.order.state == OrderState.COMPLETED
    assert d.order.summary["results"]["service_ids"]


def test_telecom_partial_invoices_only_completed_items() -> None:
    d = Driver(TELECOM, TELECOM_ORDER, ok_domain({"modify_service": UNKNOWN_SERVICE}))
    d.start()
    assert d.order.state == OrderState.PARTIAL
    states = {it["id"]: it["state"] for it in d.order.items}
    assert states == {"a": "completed", "m": "failed", "d": "completed", "n": "completed"}
    invoice = next(s for s in d.sent if s.op == "create_invoice")
    assert [i["id"] for i in invoice.args["items"]] == ["a"]
    assert invoice.args["total_minor"] == 3000


def test_telecom_all_items_failing_fails_and_compensates() -> None:
    order = dict(TELECOM_ORDER, items=TELECOM_ORDER["items"][:2])
    fail_all = {"activate_service": UNKNOWN_SERVICE, "modify_service": UNKNOWN_SERVICE}
    d = Driver(TELECOM, order, ok_domain(fail_all))
    d.start()
    assert d.order.state == OrderState.FAILED
    assert "create_invoice" not in d.ops()


def test_telecom_sequencing_key_is_per_customer() -> None:
    order = new_order("o-7", _normal(TELECOM_ORDER), TELECOM, 1.0)
    assert order.seq_key == "telecom/c9"
    turning = Engine(TELECOM).handle(order, Start(), 2.0)
    assert turning.effects == [] and order.state == OrderState.ACKNOWLEDGED


def _normal(raw: dict[str, Any]) -> dict[str, Any]:
    from helpers import normalized

    return normalized(raw)


# -- property-based: random step graphs, random failures ------------------

@st.composite
def graphs(draw: Any) -> tuple[str, dict[str, str]]:
    n = draw(st.integers(1, 6))
    lines = ["[process]", 'order_type = "random"', "[defaults]",
             "retry = { max_attempts = 2 }"]
    outcomes = {}
    for i in range(n):
        deps = draw(st.lists(st.sampled_from(range(i)), unique=True, max_size=2)) if i else []
        comp = draw(st.booleans())
        lines += [f"[steps.s{i}]", f'system = "sys{i % 2}"', f'op = "op{i}"',
                  f"after = [{', '.join(repr(f's{d}') for d in deps)}]".replace("'", '"')]
        if comp:
            lines.append(f'compensate = {{ op = "undo{i}" }}')
        outcomes[f"op{i}"] = draw(st.sampled_from(["ok", "ok", "ok", "fail", "retry_ok"]))
    return "\n".join(lines), outcomes


@settings(max_examples=150, deadline=None)
@given(graph=graphs())
def test_random_graphs_keep_order_and_compensate_exactly_once(
        graph: tuple[str, dict[str, str]]) -> None:
    text, outcomes = graph
    proc = parse_process(text, "random.toml")
    seen_retry: set[str] = set()
    done_order: list[str] = []

    def domain(cmd: Send) -> CommandResult:
        if cmd.op.startswith("op"):  # 1. every dependency is done before a step is sent
            for dep in proc.step(f"s{cmd.op[2:]}").after:
                assert dep[1:] in done_order, f"{cmd.op} sent before {dep} was done"
        outcome = outcomes.get(cmd.op, "ok")
        if outcome == "fail":
            return CommandResult(cmd.command_id, False, None, DomainError("no", "no", False))
        if outcome == "retry_ok" and cmd.op not in seen_retry:
            seen_retry.add(cmd.op)
            return CommandResult(cmd.command_id, False, None, DomainError("busy", "b", True))
        if cmd.op.startswith("op"):
            done_order.append(cmd.op[2:])
        return CommandResult(cmd.command_id, True, {})

    d = Driver(proc, retail_order(), domain)
    d.start()
    d.fire_timers()
    order = d.order
    # 2. final state matches the outcomes
    failed = any(outcomes.get(f"op{s.name[1:]}") == "fail" and s.status == StepStatus.FAILED
                 for s in order.steps.values())
    assert order.state == (OrderState.FAILED if failed else OrderState.COMPLETED)
    # 3. on failure every applied compensable step is undone exactly once, in reverse
    undo = [s.op[4:] for s in d.sent if s.op.startswith("undo")]
    assert len(undo) == len(set(undo))
    if failed:
        compensable = [n for n in done_order
                       if proc.step(f"s{n}").action.compensate is not None]
        assert undo == list(reversed(compensable))
    else:
        assert undo == []


def test_timer_for_other_attempt_is_stale() -> None:
    d = retail({"create_invoice": UNAVAILABLE})
    d.start()
    turning = Engine(RETAIL).handle(d.order, TimerFired(("retry", "create_invoice", 99)), 5000)
    assert turning.stale and not turning.effects


@pytest.mark.parametrize("proc_name", ["retail", "telecom"])
def test_snapshot_round_trip(proc_name: str) -> None:

    raw = retail_order() if proc_name == "retail" else TELECOM_ORDER
    d = Driver(PROCS[proc_name], raw, ok_domain())
    d.start()
    again = snapshot.decode(snapshot.encode(d.order))
    assert again == thawed(d.order) and snapshot.encode(again) == snapshot.encode(d.order)
    assert again.view() == d.order.view()


def test_open_breaker_makes_steps_wait_without_spending_attempts() -> None:
    blocked = CommandResult("", False, {"retry_after": 2.0},
                            DomainError("circuit_open", "billing circuit breaker is open", True))
    replies = iter([blocked] * 20)  # far more than max_attempts

    def breaker_open(cmd: Send) -> CommandResult | None:
        if cmd.op == "create_invoice":
            res = next(replies, None)
            if res is not None:
                return res._replace(command_id=cmd.command_id)
        return ok_domain()(cmd)

    d = Driver(RETAIL, retail_order(), breaker_open)
    d.start()
    step = d.order.steps["create_invoice"]
    assert (step.attempts, step.error["code"]) == (0, "circuit_open")
    assert d.timers[0].at >= d.now + 1.9
    progress = [e for e in published(d, "order_progress") if e.get("breaker")]
    assert progress == [dict(progress[0], breaker="open", system="billing")]
    d.fire_timers()
    assert d.order.steps["create_invoice"].attempts == 1  # only the real send counted
    assert d.order.state == OrderState.IN_PROGRESS and "create_shipment" in d.ops()


def test_breaker_opens_probes_and_closes() -> None:
    from gateways.breaker import CLOSED, HALF_OPEN, OPEN, Breaker

    b = Breaker(threshold=3, cooldown_s=5)
    assert [b.record(False, 0) for _ in range(3)] == [None, None, OPEN]
    assert not b.allow(1.0) and b.retry_after(1.0) == pytest.approx(4.0)
    assert b.allow(5.0) and b.state == HALF_OPEN
    assert not b.allow(5.1)  # only one probe
    assert b.record(False, 6.0) == OPEN and not b.allow(7.0)
    assert b.allow(11.0) and b.record(True, 11.5) == CLOSED and b.allow(11.6)


def test_event_wait_with_timeout_fails_the_step_when_nothing_comes() -> None:
    text = _retail_text().replace(
        'wait_event = { name = "shipment_delivered", system = "shipping" }',
        'wait_event = { name = "shipment_delivered", system = "shipping", timeout_s = 30 }')
    proc = parse_process(text, "retail-wait.toml")
    d = Driver(proc, retail_order(), ok_domain())
    d.start()
    wait = next(t for t in d.timers if t.token[0] == "wait")
    assert wait.at == pytest.approx(d.order.steps["await_delivery"].retry_at)
    resumed = Engine(proc).handle(d.order, Resume(), d.now)
    assert [fx.token[0] for fx in resumed.effects if isinstance(fx, Timer)] == ["wait"]
    d.fire_timers()
    assert d.order.state == OrderState.FAILED
    assert d.order.steps["await_delivery"].error["code"] == "event_timeout"
    assert "cancel_shipment" in d.ops()  # shipped goods are called back


# -- operator actions and jeopardy -----------------------------------------

def fallout_driver(domain_overrides: dict[str, Any]) -> Driver:
    proc = parse_process(_retail_text().replace('failure_policy = "compensate"',
                                                'failure_policy = "hold"'), "hold.toml")
    return Driver(proc, retail_order(), ok_domain(domain_overrides))


def operate(d: Driver, action: str, step: str | None = None) -> dict[str, Any]:
    from oms.messages import Operate

    d.feed(Operate(action, step, "ann", "customer called", reply_to="r"))
    return [fx for fx in d.effects if isinstance(fx, Reply)][-1].payload


def test_operator_retry_runs_the_failed_step_as_a_new_command() -> None:
    d = fallout_driver({"capture_payment": DECLINED})
    d.start()
    assert (d.order.state, d.order.state_reason) == (OrderState.HELD, "fallout")
    d.domain = ok_domain()  # the customer fixed their card
    reply = operate(d, "retry")
    assert reply["type"] == "operator_accepted"
    captures = [s.command_id for s in d.sent if s.op == "capture_payment"]
    assert captures == ["o-1:capture_payment", "o-1:capture_payment#1"]
    d.event("shipment_delivered", {})
    assert d.order.state == OrderState.COMPLETED
    entry = next(h for h in d.order.history if h.get("action") == "retry")
    assert entry["operator"] == "ann" and entry["reason"] == "customer called"


def test_operator_skip_marks_done_and_goes_on() -> None:
    d = fallout_driver({"capture_payment": DECLINED})
    d.start()
    assert operate(d, "skip", "capture_payment")["type"] == "operator_accepted"
    assert d.order.steps["capture_payment"].status == StepStatus.DONE
    assert "create_shipment" in d.ops()


def test_operator_abort_compensates_then_fails() -> None:
    d = fallout_driver({"capture_payment": DECLINED})
    d.start()
    assert operate(d, "abort")["type"] == "operator_accepted"
    assert d.order.state == OrderState.FAILED
    assert d.ops()[-3:] == ["void_invoice", "release_stock", "notify"]


def test_operator_actions_are_refused_when_they_make_no_sense() -> None:
    d = retail()
    d.start()
    assert operate(d, "retry")["reason"].startswith("only a held order can be retried")
    d.event("shipment_delivered", {})
    assert operate(d, "abort")["reason"] == "order is already completed"
    d2 = fallout_driver({"capture_payment": DECLINED})
    d2.start()
    assert "not the failed step" in operate(d2, "skip", "reserve_stock")["reason"]


def test_jeopardy_fires_once_and_survives_a_restart() -> None:
    text = _retail_text().replace("[steps.await_delivery]",
                                  "[steps.await_delivery]\nexpected_s = 3600")
    proc = parse_process(text, "jeopardy.toml")
    d = Driver(proc, retail_order(), ok_domain())
    d.start()
    timer = next(t for t in d.timers if t.token[0] == "jeopardy")
    resumed = Engine(proc).handle(d.order, Resume(), d.now)  # a restart re-arms it
    assert [fx.token for fx in resumed.effects if isinstance(fx, Timer)] == [timer.token]
    d.fire_timers()
    events = published(d, "order_jeopardy")
    assert len(events) == 1 and events[0]["step"] == "await_delivery"
    assert d.order.state == OrderState.IN_PROGRESS  # not a state change
    assert [s.args["message"] for s in d.sent if s.system == "crm"][-1].startswith(
        "Order ext-1 is in jeopardy")
    again = Engine(proc).handle(d.order, TimerFired(timer.token), d.now + 10)
    assert again.stale and not again.effects
    resumed = Engine(proc).handle(d.order, Resume(), d.now)
    assert not [fx for fx in resumed.effects if isinstance(fx, Timer)]


def test_no_retry_or_skip_while_an_abort_is_compensating() -> None:
    d = fallout_driver({"capture_payment": DECLINED, "void_invoice": None})  # undo in flight
    d.start()
    assert operate(d, "abort")["type"] == "operator_accepted"
    assert (d.order.state, d.order.state_reason) == (OrderState.HELD, "compensating")
    assert operate(d, "retry")["type"] == "operator_rejected"
    assert operate(d, "skip")["type"] == "operator_rejected"


# -- "does this order have something outstanding?" (oms.outstanding) --------


def _asked(order: Any) -> dict[str, bool]:
    """What each place that asks gets: the engine before it undoes, the
    actor before it leaves memory, ``Order.finished``, recovery."""

    asked = {"in_flight": Turning(Engine(RETAIL), order, 0.0).in_flight(),
             "awaiting_reply": awaiting_reply(order), "finished": order.finished,
             "needs_resume": needs_resume(order)}
    out = outstanding(order)  # the same answers, all at once
    assert (out.forward, out.replies) == (asked["in_flight"], asked["awaiting_reply"])
    assert out.notes == (order.state.terminal and not order.finished)
    assert (out.replies or out.timers or order.state in (OrderState.ACKNOWLEDGED,
                                                         OrderState.PENDING)) == (
        asked["needs_resume"])
    return asked


def test_outstanding_commands_are_decided_in_one_function() -> None:

    assert command_out("running", None, None, None) == (True, REPLY)  # at a gateway
    assert command_out("running", None, 5.0, None) == (True, TIMER)  # backing off
    assert command_out("done", None, None, "running") == (False, REPLY)  # an undo out
    assert command_out("done", None, 5.0, "running") == (False, TIMER)  # an undo backing off
    assert command_out("running", "shipment_delivered", 5.0, None) == (False, TIMER)  # deadline
    assert command_out("running", "shipment_delivered", None, None) is None  # only waits
    assert command_out("skipped", None, 5.0, None) is None  # a stale deadline: nothing
    assert command_out("done", None, None, "failed") is None  # fallout: an operator acts


def test_awaiting_reply_is_command_outs_reply() -> None:
    """``awaiting_reply`` writes ``command_out``'s REPLY cases out inline (it
    is asked at every snapshot): for every step and note it answers as
    ``command_out`` does, whatever the fields, the enum members or their
    plain string values (a decoded record may hold either)."""
    from itertools import product
    from types import SimpleNamespace

    from oms.states import Undo

    statuses = [*StepStatus, *(s.value for s in StepStatus)]
    comps = [None, *Undo, *(u.value for u in Undo)]
    checked = 0
    for status, wait, retry_at, comp in product(statuses, [None, "shipment_delivered"],
                                                [None, 5.0], comps):
        out = command_out(status, wait, retry_at, comp)
        step = SimpleNamespace(status=status, wait=wait, retry_at=retry_at, comp=comp)
        idle = SimpleNamespace(status=StepStatus.DONE, wait=None, retry_at=None, comp=None)
        order = SimpleNamespace(steps={"a": idle, "b": step}, notes=[])
        assert awaiting_reply(order) == (out is not None and out[1] == REPLY), step  # type: ignore[arg-type]
        if wait is None and comp is None:  # a CRM note: the same fields, less two
            note = SimpleNamespace(status=status, retry_at=retry_at)
            order = SimpleNamespace(steps={"a": idle}, notes=[note])
            assert awaiting_reply(order) == (out is not None and out[1] == REPLY), note  # type: ignore[arg-type]
        checked += 1
    assert checked == len(statuses) * 2 * 2 * len(comps)


def test_a_wait_skipped_by_compensation_leaves_nothing_to_resume() -> None:
    """They disagreed: recovery resumed an order for a ``retry_at`` left on a
    wait that compensation had skipped (the others saw nothing outstanding)."""
    d = retail({"capture_payment": DECLINED})
    d.start()  # failed: compensated; the snapshot below is built by hand
    d.order.state = OrderState.HELD  # as if an undo had failed and the order were held
    step = d.order.steps["await_delivery"]
    step.status, step.wait, step.retry_at = StepStatus.SKIPPED, None, 5.0
    assert _asked(d.order) == {"in_flight": False, "awaiting_reply": False,
                               "finished": False, "needs_resume": False}


def test_a_command_backing_off_is_in_flight_but_awaits_no_reply() -> None:
    """Compensation waits for its outcome, the actor may leave memory (a
    timer brings it back) and recovery re-arms that timer."""
    d = retail({"create_invoice": UNAVAILABLE})
    d.start()
    step = d.order.steps["create_invoice"]
    assert step.status == StepStatus.RUNNING and step.retry_at is not None
    asked = _asked(d.order)
    assert asked == {"in_flight": True, "awaiting_reply": False, "finished": False,
                     "needs_resume": True}


def test_a_finished_order_with_a_crm_note_backing_off_is_not_finished() -> None:
    d = retail({"notify": UNAVAILABLE})
    d.start()
    d.event("shipment_delivered", {"shipment_id": "s"})
    assert d.order.state == OrderState.COMPLETED
    assert any(n.retry_at is not None for n in d.order.notes)
    assert _asked(d.order) == {"in_flight": False, "awaiting_reply": False,
                               "finished": False, "needs_resume": True}


# -- effects are data (actors.effects runs them after the commit) --------------


def test_a_turn_returns_its_effects_as_data_in_the_order_they_must_run() -> None:
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    engine = Engine(RETAIL)
    turning = engine.handle(order, Start(), 2.0)
    assert turning.changed and not turning.stale
    assert [type(fx) for fx in turning.effects] == [Publish, Send, Publish, Send]
    state, note, progress, command = turning.effects
    assert state == Publish({"type": "order_state", "order_id": "o-1", "external_id": "ext-1",
                             "state": "inProgress", "previous_state": "acknowledged",
                             "ts": 2.0})
    assert (note.system, note.command_id, note.args["state"]) == ("crm", "o-1:notify:0",
                                                                 "inProgress")
    assert progress.payload["step"] == "reserve_stock" and progress.payload["status"] == "running"
    assert command._replace(raw=None) == Send(
        "warehouse", "o-1:reserve_stock", "reserve_stock",
        {"items": [{"product_id": "p-1", "quantity": 2}, {"product_id": "p-2", "quantity": 1}],
         "delivery_address": order.delivery_address}, 5.0)
    # the step's kept bytes ride along, for the gateway to send as they are
    assert command.raw is order.steps["reserve_stock"].args
    assert bytes(command.raw) == codec.pack(command.args)
    turning = engine.handle(order, Cancel("changed my mind", reply_to="R"), 3.0)
    kinds = [(type(fx).__name__, fx.payload.get("state") or fx.payload.get("step"))
             for fx in turning.effects]
    assert kinds[:2] == [("Publish", "assessingCancellation"), ("Reply", "assessingCancellation")]
    assert turning.effects[1] == Reply("R", {"type": "cancel_accepted", "order_id": "o-1",
                                             "state": "assessingCancellation"})
    assert set(kinds[2:]) == {("Publish", s) for s in (
        "create_invoice", "capture_payment", "create_shipment", "await_delivery")}
    assert not any(isinstance(fx, Send) for fx in turning.effects)  # the reservation is out


def test_a_stale_reply_changes_nothing_and_asks_for_no_effect() -> None:
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    engine = Engine(RETAIL)
    engine.handle(order, Start(), 2.0)
    version = order.version
    turning = engine.handle(order, CommandResult("o-1:create_invoice", True, {}), 3.0)
    assert turning.stale and not turning.changed and turning.effects == []
    assert order.version == version


def test_a_back_off_is_a_timer_effect_with_its_token() -> None:
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    engine = Engine(RETAIL)
    engine.handle(order, Start(), 2.0)
    turning = engine.handle(order, UNAVAILABLE._replace(command_id="o-1:reserve_stock"), 3.0)
    assert [type(fx) for fx in turning.effects] == [Timer]
    (timer,) = turning.effects
    assert timer.token == ("retry", "reserve_stock", 1) and timer.at > 3.0
    assert order.steps["reserve_stock"].retry_at == timer.at


# -- templates are parsed once per engine (oms.templates.Template) ------------

_names = st.sampled_from(["order", "steps", "item", "result", "args", "total_minor", "id",
                          "currency", "x", ""])
_refs = st.lists(_names, min_size=1, max_size=4).map(lambda p: "$" + ".".join(p))
_leaves = st.one_of(_refs, st.text(max_size=5), st.integers(), st.none(), st.booleans())
_templates = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=12)
_values = st.recursive(st.one_of(st.integers(), st.text(max_size=4), st.none()),
                       lambda inner: st.dictionaries(_names, inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(template=_templates, scopes=st.dictionaries(_names, _values, max_size=6))
def test_a_parsed_template_fills_exactly_as_resolve_does(template: Any,
                                                         scopes: dict[str, Any]) -> None:

    expected = resolve(template, scopes)
    assert compile_template(template)(scopes) == expected
    assert repr(compile_template(template)(scopes)) == repr(expected)  # keys in the same order
    parsed = Template(template)
    assert parsed.fill(scopes) == expected


def test_only_the_facts_a_template_names_are_built_and_they_are_the_full_facts() -> None:

    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    full = order_facts(order)
    assert set(full) == set(FACTS)
    for step in RETAIL.steps:
        if step.action is None:
            continue
        parsed = Template(step.action.args)
        assert parsed.facts is not None and parsed.facts <= set(FACTS)
        assert order_facts(order, parsed.facts) == {k: full[k] for k in parsed.facts}
    assert Template("$order").facts is None  # the whole scope: every fact
    assert Template({"a": "$order.nope"}).facts == frozenset({"nope"})
    assert order_facts(order, {"nope"}) == {}  # names no fact: resolves to None as before


def test_the_facts_kept_for_an_order_are_only_those_that_never_change() -> None:
    from oms.states import ItemState, set_item_state
    from oms.templates import CHANGING

    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    cache: dict[str, Any] = {}
    names = {"stock_items", "total_minor", "completed_items", "completed_total_minor"}
    first = order_facts(order, names, cache)
    assert set(cache) == names - CHANGING and first["completed_items"] == []
    for item in order.items:
        set_item_state(item, ItemState.IN_PROGRESS)
    set_item_state(order.items[0], ItemState.COMPLETED)
    later = order_facts(order, names, cache)
    assert [it["id"] for it in later["completed_items"]] == [order.items[0]["id"]]
    assert later["completed_total_minor"] == 2 * 1000
    assert later == {k: v for k, v in order_facts(order).items() if k in names}


# -- the per-message path (session 6): what its cuts touch ---------------------


def test_an_ok_reply_while_backing_off_is_applied_and_ends_the_back_off() -> None:
    """``on_step_result`` clears ``retry_at`` only when set: a success that
    comes while the step backs off (the first send's reply, late) is applied,
    its back-off over; a failure then is stale."""
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    engine = Engine(RETAIL)
    engine.handle(order, Start(), 2.0)
    engine.handle(order, UNAVAILABLE._replace(command_id="o-1:reserve_stock"), 3.0)
    assert order.steps["reserve_stock"].retry_at is not None
    late_failure = engine.handle(order, UNAVAILABLE._replace(command_id="o-1:reserve_stock"), 3.1)
    assert late_failure.stale and not late_failure.changed
    turning = engine.handle(order, CommandResult("o-1:reserve_stock", True,
                                                 {"reservation_id": "r"}), 3.2)
    step = order.steps["reserve_stock"]
    assert not turning.stale and step.retry_at is None and step.status == StepStatus.DONE
    assert [fx.op for fx in turning.effects if isinstance(fx, Send)] == ["create_invoice"]
    again = engine.handle(order, CommandResult("o-1:reserve_stock", True, {}), 3.3)
    assert again.stale and not again.changed and again.effects == []


@pytest.mark.parametrize("command_id", [
    "", ":", "o-1", "o-1:", "o-1::", "o-10:reserve_stock", "o-:reserve_stock",
    "o-1:reserve_stock#", "o-1:reserve_stock#1", "o-1:reserve_stock#x", "o-1:reserve_stock:undo",
    "o-1:notify:", "o-1:notify:9", "o-1:notify:-1", "o-1:notify:0x", "o-1:~" + "0" * 32,
    "o-1:reserve_stock\x00", "O-1:reserve_stock"])
def test_a_malformed_or_unknown_reply_id_is_stale_with_any_data(command_id: str) -> None:
    order = new_order("o-1", normalized(retail_order()), RETAIL, 1.0)
    engine = Engine(RETAIL)
    engine.handle(order, Start(), 2.0)
    before = snapshot.encode(order)
    for data in (None, {}, {"reservation_id": float("nan")}):
        turning = engine.handle(order, CommandResult(command_id, True, data), 3.0)
        assert turning.stale and not turning.changed and turning.effects == []
    assert snapshot.encode(order) == before


@pytest.mark.parametrize("key", ["}; import os; x = {", "a\nb", "'", '"', "\\", "k0", "v0",
                                 "scopes", "_isinstance", "return", "", " ", "$order.id"])
def test_a_map_template_keeps_any_key_and_path_as_data(key: str) -> None:
    """A map template is a generated function (``oms.templates._compile_map``):
    keys and path names are bound names, never source text."""
    template = {key: f"$order.{key}", "x": "$order", key + "!": [f"${key}", key]}
    scopes: dict[str, Any] = {"order": {key: 1, "id": 2}, key: {"a": 3}}
    filled = compile_template(template)(scopes)
    assert repr(filled) == repr(resolve(template, scopes))
    if "." not in key:  # (a dot in a key is a path in a reference)
        assert filled[key] == 1 and filled[key + "!"] == [{"a": 3}, key]


def test_a_map_template_of_many_keys_fills_as_resolve_does() -> None:
    template = {f"k{n}": f"$order.f{n % 7}.x" if n % 3 else n for n in range(3000)}
    scopes = {"order": {f"f{n}": {"x": n} if n % 2 else n for n in range(7)}}
    assert repr(compile_template(template)(scopes)) == repr(resolve(template, scopes))
