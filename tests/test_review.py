"""Defects found by a hostile review, each held by a real-socket test."""

from __future__ import annotations

from typing import Any

from gateways.client import wait_terminal


def telecom_order(ext: str, item_ids: list[str], customer: str = "sub-r1") -> dict[str, Any]:
    return {"source_system": "web", "external_id": ext, "order_type": "telecom",
            "customer": {"id": customer},
            "customer_address": {"line1": "1 Main St", "city": "Berlin",
                                 "postal_code": "10115", "country": "DE"},
            "items": [{"id": i, "product_id": "FIBER-1000", "quantity": 1,
                       "unit_price_minor": 100} for i in item_ids]}


def test_an_item_id_with_a_hash_sign_does_not_leave_its_step_waiting_forever(
        service: Any, client: Any) -> None:
    """A per-item step's command id carries the item id (``O..:activate[line#1]``);
    the reply must find its step, not be dropped as stale (the order would
    wait for a reply that had come, with no timeout left to end the wait)."""
    reply = client.submit(telecom_order("hash-1", ["line#1", "tv#2"]))
    assert reply["type"] == "accepted", reply
    views = wait_terminal(client, [reply["order_id"]], timeout=20)
    view = views[reply["order_id"]]
    assert view["state"] == "completed", view


class _PoisonPending(frozenset):
    """Notify states whose check raises for ``pending``: the order's handler
    raises while it learns it must wait its turn (a bug, as in
    test_failure_rule's poison order)."""

    def __contains__(self, state: object) -> bool:
        if state == "pending":
            raise RuntimeError("poison: the handler fails on the wait for a turn")
        return frozenset.__contains__(self, state)


def test_a_retried_internal_error_hold_waits_for_its_sequencing_turn(
        make_service: Any, eps: Any, sim_config: Any) -> None:
    """Two telecom orders of one customer; the first runs (no domain system
    answers: it stays in flight), the second's handler raises while it is
    told to wait, so it is held as internal_error without ever having had
    its turn. An operator's retry must put it back to waiting for the turn,
    not run it beside the first (orders of one customer run one at a time)."""
    import dataclasses

    from conftest import SimThread
    from helpers import poll_until

    from gateways.client import Client
    from oms.engine import Engine

    svc = make_service(passivate_after_s=0.1)
    good = svc.octx.engines["telecom"]
    svc.octx.engines["telecom"] = Engine(dataclasses.replace(
        good.proc, notify_states=_PoisonPending(good.proc.notify_states)))
    with Client(eps.intake, timeout=10) as client:
        first = client.submit(telecom_order("seq-1", ["fiber"], customer="sub-seq"))
        second = client.submit(telecom_order("seq-2", ["tv"], customer="sub-seq"))
        a, b = first["order_id"], second["order_id"]
        poll_until(lambda: client.get(b)["order"].get("state_reason") == "internal_error")
        svc.octx.engines["telecom"] = good  # the bug is fixed; the held order reloads with it
        poll_until(lambda: b not in svc.router.live_ids())
        assert client.get(a)["order"]["state"] == "inProgress"  # still has the turn
        reply = client.request({"type": "retry_step", "order_id": b, "operator": "ops"})
        assert reply["type"] == "operator_accepted", reply
        view = client.get(b)["order"]
        assert view["state"] == "pending", view["state"]
        assert {s["status"] for s in view["steps"] if s["name"].startswith("provision")} == {
            "pending"}, view["steps"]
        assert client.get(a)["order"]["state"] == "inProgress"
        sim = SimThread(sim_config)  # the domain systems answer: the first ends, then the second
        try:
            views = wait_terminal(client, [a, b], timeout=40)
        finally:
            sim.stop()
        assert views[a]["state"] == views[b]["state"] == "completed"


def test_counts_after_a_restart_with_a_finished_orders_notice_outstanding(
        make_service: Any, eps: Any, sim_config: Any) -> None:
    """An order completed, its CRM notice still out (CRM does not answer)
    when the service stops; after the restart the notice is delivered and
    the order leaves the active set. ``order_counts`` counts unfinished
    orders by state: a ``completed`` entry must not stay behind for good."""
    import dataclasses

    from conftest import SimThread
    from helpers import poll_until, retail_order

    from gateways.client import Client

    no_crm = dataclasses.replace(sim_config, systems={
        k: v for k, v in sim_config.systems.items() if k != "crm"})
    sim = SimThread(no_crm)
    try:
        svc = make_service()
        with Client(eps.intake, timeout=10) as client:
            oid = client.submit(retail_order("notice-1"))["order_id"]
            poll_until(lambda: client.get(oid)["order"]["state"] == "completed")
        svc.stop()
    finally:
        sim.stop()
    sim = SimThread(sim_config)
    try:
        svc = make_service()
        with Client(eps.intake, timeout=10) as client:
            poll_until(lambda: svc.router.counts.in_flight == 0 and not svc.router.live_ids())
            counts = client.request({"type": "order_counts"})
            assert counts["counts"] == {} and counts["in_flight"] == 0, counts
    finally:
        sim.stop()


def test_sighup_with_a_malformed_client_key_keeps_the_service_and_its_keys(
        procs: Any, tmp_path: Any) -> None:
    """A ``*.key`` file in the clients folder that is not a key (half copied,
    empty) when SIGHUP comes: the reload is refused with a log line and the
    keys in use stay; the service must not stop."""
    import signal

    from conftest import Endpoints
    from helpers import curve_keys, poll_until

    from gateways.client import Client

    keys = curve_keys(tmp_path / "keys", ["web"])
    folder = keys.folder
    eps = Endpoints()
    svc = procs(eps.serve_args(tmp_path / "data") + [
        "--curve-server-key", str(folder / "server" / "server.key_secret"),
        "--curve-clients", str(keys.allowed)], "serve")
    with Client(eps.intake, curve=keys.opts("web")) as web:
        web.wait_ready(30)
        (keys.allowed / "broken.key").write_text("")  # an empty file, mid-copy
        svc.p.send_signal(signal.SIGHUP)
        poll_until(lambda: svc.p.poll() is not None or b"keys not reloaded"
                   in svc.log.read_bytes(), timeout=20)
        assert svc.p.poll() is None, "the service stopped on a SIGHUP"
        assert web.request({"type": "get_order", "order_id": "x"})["code"] == "not_found"
    assert svc.terminate() == 0


class _PoisonState(frozenset):
    """Notify states whose check raises for one state (a handler bug)."""

    poison = "assessingCancellation"

    def __contains__(self, state: object) -> bool:
        if state == self.poison:
            raise RuntimeError(f"poison: the handler fails on {state}")
        return frozenset.__contains__(self, state)


def test_retry_of_an_internal_error_hold_over_fallout_returns_to_the_fallout(
        make_service: Any, sim: Any, eps: Any, tmp_path: Any) -> None:
    """An order in fallout (a failed step, hold policy) whose handler then
    raises (here on a cancel) is held as internal_error with the fallout's
    failure as ``previous``. Retry resumes it from its last durable snapshot:
    that is the fallout again (its failed step named, for the operator), not
    ``inProgress`` with a failed step nothing will ever run again."""
    import dataclasses

    from helpers import poll_until, retail_order
    from test_operations import control, hold_policy

    from gateways.client import Client
    from oms.engine import Engine

    svc = make_service(processes=hold_policy(tmp_path / "procs"), passivate_after_s=0.1)
    control(eps.systems["billing"], capture_payment=[1.0, "payment_declined"])
    with Client(eps.intake) as client:
        oid = client.submit(retail_order("fo-crash"))["order_id"]
        poll_until(lambda: client.get(oid)["order"].get("state_reason") == "fallout")
        good = svc.octx.engines["retail"]
        svc.octx.engines["retail"] = Engine(dataclasses.replace(
            good.proc, notify_states=_PoisonState(good.proc.notify_states)))
        poll_until(lambda: oid not in svc.router.live_ids())  # reloads with the bad engine
        assert client.request({"type": "cancel_order", "order_id": oid})["code"] == "internal"
        poll_until(lambda: client.get(oid)["order"].get("state_reason") == "internal_error")
        svc.octx.engines["retail"] = good  # the bug is fixed
        poll_until(lambda: oid not in svc.router.live_ids())
        control(eps.systems["billing"], capture_payment=[0])  # and the card works now
        reply = client.request({"type": "retry_step", "order_id": oid, "operator": "ann"})
        assert reply["type"] == "operator_accepted", reply
        view = client.get(oid)["order"]
        assert (view["state"], view.get("state_reason")) == ("held", "fallout"), (
            view["state"], [(s["name"], s["status"]) for s in view["steps"]])
        assert view["failure"]["step"] == "capture_payment"
        reply = client.request({"type": "retry_step", "order_id": oid, "operator": "ann"})
        assert reply["type"] == "operator_accepted", reply
        poll_until(lambda: client.get(oid)["order"]["state"] == "completed")


class _CountedId(str):
    """An order id that counts how often it is compared for equality."""

    __slots__ = ()
    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedId.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_one_customers_long_queue_costs_the_sequencer_linear_work() -> None:
    """A channel may queue up to --max-in-flight telecom orders behind one
    customer id. Each enter, leave and the rebuild at start must not scan
    the customer's whole queue: 50,000 waiting orders took the event loop
    (every order, the intake, the writer) 31 s to rebuild at a restart and
    19 s to enter, quadratic in the queue's length."""
    import threading

    from actors.sequencer import Sequencer

    n = 4000
    ids = [_CountedId(f"O{i:012d}") for i in range(1, n + 1)]
    last = threading.Event()

    def deliver(order_id: str, _turn: Any) -> bool:
        if order_id is ids[-1]:
            last.set()
        return True

    seq = Sequencer.launch(deliver)
    try:
        _CountedId.compared = 0
        seq.preload([("telecom/c1", oid, False) for oid in ids])
        assert last.wait(60)
        rebuilt = _CountedId.compared
        last.clear()
        _CountedId.compared = 0
        for oid in ids:
            seq.request("telecom/c2", oid, True)
        assert last.wait(60)
        entered = _CountedId.compared
    finally:
        seq.actor_ref.stop()
    assert rebuilt < 20 * n and entered < 20 * n, (rebuilt, entered)


def test_undos_settling_while_held_as_internal_error_end_the_cancel() -> None:
    """A cancelled order's handler raised while an undo was out: it is held as
    internal_error, and the outstanding replies still drive it (as a forward
    run completes while so held). The last undo's reply must end it
    ``cancelled``, not raise IllegalTransition (held --cancelled-->), which
    crashed the order a second time, dropped that reply and left it held."""
    from helpers import Driver, ok_domain, retail_order
    from test_engine import RETAIL

    from oms.engine import hold_internal_error
    from oms.messages import Cancel, CommandResult

    d = Driver(RETAIL, retail_order(), ok_domain({"capture_payment": None,
                                                 "release_stock": None}))
    d.start()
    d.feed(Cancel("changed my mind", reply_to="r"))
    capture = next(s.command_id for s in d.sent if s.op == "capture_payment")
    d.feed(CommandResult(capture, True, {"payment_id": "pay-1"}))
    assert d.order.state == "pendingCancellation"
    release = next(s.command_id for s in d.sent if s.op == "release_stock")
    turning = hold_internal_error(d.engine, d.order, "KeyError: 'x'", (), d.now)
    assert turning.changed and d.order.state == "held"
    d.feed(CommandResult(release, True, {}))
    assert (d.order.state, d.order.state_reason) == ("cancelled", "changed my mind")


def test_retry_after_repeated_internal_errors_over_fallout_returns_to_the_fallout() -> None:
    """Held as internal_error twice in a row (each hold keeps the one before
    as ``previous``): retry still finds the fallout under them."""
    from test_engine import DECLINED, fallout_driver

    from oms.engine import hold_internal_error
    from oms.messages import Operate

    d = fallout_driver({"capture_payment": DECLINED})
    d.start()
    assert (d.order.state, d.order.state_reason) == ("held", "fallout")
    for _ in range(2):
        hold_internal_error(d.engine, d.order, "KeyError: 'x'", (), d.now)
    d.feed(Operate("retry", None, "ann", "fixed", "r"))
    assert (d.order.state, d.order.state_reason) == ("held", "fallout")
    assert d.order.failure is not None and d.order.failure["step"] == "capture_payment"


def test_retry_of_an_order_whose_start_raised_runs_it_to_its_end(
        make_service: Any, sim: Any, eps: Any) -> None:
    """A handler that raised on an order's start (test_failure_rule's poison
    definition) holds it as internal_error before it began: its items are
    still ``acknowledged``. After the fix, retry runs it; it must be able to
    complete (acknowledged -> completed is no item move: completing raised
    again, dropped the last reply and held it again, for ever)."""
    import dataclasses

    from helpers import poll_until, retail_order

    from gateways.client import Client, wait_terminal
    from oms.engine import Engine

    svc = make_service(passivate_after_s=0.1)
    good = svc.octx.engines["retail"]
    svc.octx.engines["retail"] = Engine(dataclasses.replace(good.proc, expected_s="soon"))
    with Client(eps.intake, timeout=10) as client:
        oid = client.submit(retail_order("start-crash"))["order_id"]
        poll_until(lambda: client.get(oid)["order"].get("state_reason") == "internal_error")
        svc.octx.engines["retail"] = good
        poll_until(lambda: oid not in svc.router.live_ids())
        reply = client.request({"type": "retry_step", "order_id": oid, "operator": "ann"})
        assert reply["type"] == "operator_accepted", reply
        view = wait_terminal(client, [oid], timeout=20)[oid]
        assert view["state"] == "completed", (view["state"], view.get("state_reason"))
        assert {it["state"] for it in view["items"]} == {"completed"}
    assert svc.metrics.order_crashes._value.get() == 1


def test_cancel_of_an_internal_error_hold_resends_what_the_crash_dropped(
        make_service: Any, sim: Any, eps: Any) -> None:
    """The handler raised on a command's reply (create_invoice's: launching
    the next step fails under a poison definition), so that reply was dropped
    and the order held as internal_error with the command still out. A
    channel's cancel must not wait for that reply for ever (no operator action
    is possible once it is being cancelled): what was in flight is sent again
    (same command_id), as retry does. (The poison only hits launching
    capture_payment, which a cancel skips.)"""
    import dataclasses

    from helpers import poll_until, retail_order

    from gateways.client import Client, wait_terminal
    from oms.engine import Engine

    svc = make_service(passivate_after_s=0.1)
    good = svc.octx.engines["retail"]
    steps = tuple(dataclasses.replace(s, expected_s="soon") if s.name == "capture_payment"
                  else s for s in good.proc.steps)
    svc.octx.engines["retail"] = Engine(dataclasses.replace(good.proc, steps=steps))
    with Client(eps.intake, timeout=10) as client:
        oid = client.submit(retail_order("drop-1"))["order_id"]
        poll_until(lambda: client.get(oid)["order"].get("state_reason") == "internal_error")
        # (it stays in memory with the poison engine: it awaits create_invoice's reply,
        # dropped, for ever; the hold's CRM note `notify:held` settles once CRM answers)
        def running() -> list[str]:
            return [s["name"] for s in client.get(oid)["order"]["steps"]
                    if s["status"] == "running"]
        poll_until(lambda: running() == ["create_invoice"])
        reply = client.request({"type": "cancel_order", "order_id": oid, "reason": "no"})
        assert reply["type"] == "cancel_accepted", reply
        view = wait_terminal(client, [oid], timeout=20)[oid]
        assert view["state"] == "cancelled"


def test_an_internal_error_hold_that_ends_by_itself_resends_its_crm_notes() -> None:
    """The crash dropped a CRM note's reply; the order, held as internal_error,
    still had a command out whose reply then completes it with no operator
    action. The dropped note must be sent again, or it stays ``running`` for
    ever and the finished order never leaves memory, the active set and the
    admission count (until a restart)."""
    from helpers import Driver, ok_domain, retail_order
    from test_engine import RETAIL

    from oms.engine import hold_internal_error
    from oms.messages import CommandResult

    d = Driver(RETAIL, retail_order(), ok_domain({"notify": None, "create_shipment": None}))
    d.start()
    note = next(s.command_id for s in d.sent if s.op == "notify")  # its reply: dropped
    shipment = next(s.command_id for s in d.sent if s.op == "create_shipment")
    hold_internal_error(d.engine, d.order, "KeyError: 'x'", (), d.now)
    d.feed(CommandResult(shipment, True, {"shipment_id": "s1", "tracking_number": "t"}))
    d.event("shipment_delivered", {"shipment_id": "s1"})
    assert d.order.state == "completed"
    assert [s.command_id for s in d.sent].count(note) == 2  # sent again


def test_two_failed_items_under_a_hold_policy_are_both_fallout(
        make_service: Any, sim: Any, eps: Any, tmp_path: Any) -> None:
    """A per-item process with failure_policy "hold" and item_failure "fail"
    (the default): two items' steps fail for good, in parallel. The order is
    held for one; once the operator has dealt with it, it must be held for
    the other, not go on inProgress with a failed step nothing will run
    again (the second failure overwrote the first: stuck for good, and out
    of the fallout list)."""
    from helpers import poll_until
    from test_chaos import fast_processes
    from test_operations import control

    from gateways.client import Client, wait_terminal

    folder = tmp_path / "procs"
    fast_processes(folder, ("telecom",))
    path = folder / "telecom.toml"
    path.write_text(path.read_text().replace('failure_policy = "compensate"',
                                             'failure_policy = "hold"').replace(
        'item_failure = "partial"', 'item_failure = "fail"'))
    make_service(processes=str(folder))
    control(eps.systems["provisioning"], activate_service=[1.0, "unknown_product"])
    with Client(eps.intake) as client:
        oid = client.submit(telecom_order("two-fail", ["a", "b"]))["order_id"]
        poll_until(lambda: client.get(oid)["order"].get("state_reason") == "fallout" and all(
            s["status"] == "failed" for s in client.get(oid)["order"]["steps"]
            if s["name"].startswith("provision")))
        control(eps.systems["provisioning"], activate_service=[0])
        first = client.get(oid)["order"]["failure"]["step"]
        reply = client.request({"type": "retry_step", "order_id": oid, "operator": "ann"})
        assert reply["type"] == "operator_accepted", reply
        view = client.get(oid)["order"]  # the retry's answer came after its commit
        assert (view["state"], view.get("state_reason")) == ("held", "fallout"), view["state"]
        assert view["failure"]["step"] not in (None, first), view["failure"]
        reply = client.request({"type": "retry_step", "order_id": oid, "operator": "ann"})
        assert reply["type"] == "operator_accepted", reply
        assert wait_terminal(client, [oid], timeout=20)[oid]["state"] == "completed"


def test_an_order_failing_when_its_handler_raised_still_fails_with_its_own_reason() -> None:
    """Compensating after payment_declined when the handler raised: after the
    operator's retry the undos finish and the order is ``failed`` with
    ``state_reason`` ``payment_declined`` (the failure it had), not
    ``internal_error``, and says ``compensating`` meanwhile."""
    from helpers import Driver, ok_domain, retail_order
    from test_engine import DECLINED, RETAIL

    from oms.engine import hold_internal_error
    from oms.messages import CommandResult, Operate

    d = Driver(RETAIL, retail_order(), ok_domain({"capture_payment": DECLINED,
                                                 "void_invoice": None}))
    d.start()
    assert (d.order.state, d.order.state_reason) == ("inProgress", "compensating")
    void = next(s.command_id for s in d.sent if s.op == "void_invoice")
    hold_internal_error(d.engine, d.order, "KeyError: 'x'", (), d.now)
    d.feed(Operate("retry", None, "ann", "fixed", "r"))
    assert (d.order.state, d.order.state_reason) == ("inProgress", "compensating")
    d.feed(CommandResult(void, True, {}))
    assert (d.order.state, d.order.state_reason) == ("failed", "payment_declined")



def test_retry_of_an_internal_error_hold_over_awaiting_stock_keeps_waiting_visibly() -> None:
    """Held awaiting_stock when the handler raised: after the operator's retry
    the order is held awaiting_stock again (as in its snapshot), not
    inProgress while it still waits for stock_reserved; the event then
    lets it go on."""
    from helpers import Driver, ok_domain, retail_order
    from test_engine import BACKORDERED, RETAIL

    from oms.engine import hold_internal_error
    from oms.messages import Operate

    d = Driver(RETAIL, retail_order(), ok_domain({"reserve_stock": BACKORDERED}))
    d.start()
    assert (d.order.state, d.order.state_reason) == ("held", "awaiting_stock")
    hold_internal_error(d.engine, d.order, "KeyError: 'x'", (), d.now)
    d.feed(Operate("retry", None, "ann", "fixed", "r"))
    assert (d.order.state, d.order.state_reason) == ("held", "awaiting_stock")
    d.event("stock_reserved", {"reservation_id": "r-9"}, system="warehouse")
    d.event("shipment_delivered", {"shipment_id": "s1"})
    assert d.order.state == "completed"


def test_an_item_id_of_a_thousand_characters_still_gets_its_replies(
        make_service: Any, sim: Any, eps: Any, tmp_path: Any) -> None:
    """An item id may have 1,000 characters (the order's string limit); the
    command id of its per-item step (``O..:provision[<item id>]``) must
    still fit the 1,000 characters a reply's ``command_id`` may have, or
    every reply is refused at the edge: the provisioning system applies the
    command while the service retries it and records the item as failed."""
    from test_chaos import fast_processes

    from gateways.client import Client, wait_terminal

    make_service(processes=fast_processes(tmp_path / "procs", ("telecom",)))
    with Client(eps.intake) as client:
        reply = client.submit(telecom_order("long-item", ["i" * 1000, "short"]))
        assert reply["type"] == "accepted", reply
        view = wait_terminal(client, [reply["order_id"]], timeout=40)[reply["order_id"]]
    assert view["state"] == "completed", [(s["name"][:20], s["status"]) for s in view["steps"]]
