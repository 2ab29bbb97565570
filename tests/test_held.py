"""Order actors that take a message in place (``PooledActor.hold``): a reply,
event or note for an idle order actor is handled by the code that delivers
it on the loop thread, and its slice ends at the end of the loop's phase.
Hostile cases, over a real service (sockets, LMDB, simulators): a crash in a
handler run in place (from a gateway's read and from the writer's
post-commit effects), mail that arrives while the actor is held, a note or a
reply for a retired or passivated order, an in-place delivery nested inside
another order's crash handling, and a SIGTERM in the middle of a burst of
orders followed by a restart."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pykka
import pytest
from conftest import Endpoints
from helpers import poll_until, retail_order
from test_operations import control, no_restock  # noqa: F401
from test_recovery import serve

from actors.inbox import tell
from actors.order import Flushed
from actors.pool import PooledActor
from gateways.client import Client, wait_terminal
from oms.engine import Engine
from oms.messages import Cancel, CommandResult, DomainEvent, TimerFired
from oms.sample import sample_orders

BACKORDERED = [{"id": "a", "product_id": "SKU-901", "quantity": 10**9}]


class _Poison(frozenset):
    """Notify states whose check raises for one state: the order's handler
    raises when the order enters it (a handler bug)."""

    poison = ""

    def __contains__(self, state: object) -> bool:
        if state == self.poison:
            raise RuntimeError(f"poison: the handler fails on {state}")
        return frozenset.__contains__(self, state)


def poisoned(svc: Any, state: str) -> Engine:
    """Swap the retail engine for one whose handler raises entering ``state``
    (orders spawned from now on get it); returns the good one."""
    good = svc.octx.engines["retail"]
    notify = type("Poison", (_Poison,), {"poison": state})(good.proc.notify_states)
    svc.octx.engines["retail"] = Engine(dataclasses.replace(good.proc, notify_states=notify))
    return good


def crashed_in(caplog: pytest.LogCaptureFixture, order_id: str) -> tuple[str, str]:
    """The message type the logged crash of ``order_id`` names, and the
    function that caught the handler's error (the top of its traceback):
    ``run_held`` when taken in place, ``_run_slice`` in a slice."""
    records = [r for r in caplog.records
               if order_id in r.getMessage() and "handler raised" in r.getMessage()]
    assert records and records[0].exc_info
    tb = records[0].exc_info[2]
    assert tb is not None
    return records[0].getMessage().split(" on ")[1].split(";")[0], tb.tb_frame.f_code.co_name


def on_loop(svc: Any, call: Any) -> Any:
    return svc.loop.run_sync(call)


def held_for_stock(svc: Any, client: Client, ext: str) -> str:
    """An order held for stock the simulator never restocks: idle, durable."""
    oid: str = client.submit(retail_order(ext, items=BACKORDERED))["order_id"]
    poll_until(lambda: client.get(oid)["order"]["state"] == "held" and oid in svc.router.idle)
    return oid


def held_by_its_crash(client: Client, caplog: pytest.LogCaptureFixture, ext: str
                      ) -> tuple[str, tuple[str, str]]:
    """A retail order submitted, then held as ``internal_error`` by its
    handler's crash: its id, and where it crashed (``crashed_in``)."""
    oid: str = client.submit(retail_order(ext))["order_id"]
    view = poll_until(lambda: (o := client.get(oid)["order"]).get(
        "state_reason") == "internal_error" and o)
    assert view["state"] == "held"
    return oid, crashed_in(caplog, oid)


def completes_after(svc: Any, client: Client, good: Any, ext: str) -> None:
    """With the good engine back, a new retail order completes."""
    svc.octx.engines["retail"] = good
    after = client.submit(retail_order(ext))["order_id"]
    assert wait_terminal(client, [after], timeout=20)[after]["state"] == "completed"


def test_a_crash_on_a_reply_taken_in_place_holds_the_order_and_spares_the_gateway(
        make_service: Any, sim: Any, eps: Endpoints,
        caplog: pytest.LogCaptureFixture) -> None:
    """Billing declines the payment, the order compensates, and its handler
    raises on the last compensation's reply (entering ``failed``), taken in
    place in the warehouse gateway's read: the order is held as
    ``internal_error`` (the failure rule), the gateway and the loop go on."""
    svc = make_service()
    control(eps.systems["billing"], capture_payment=[1.0, "payment_declined"])
    good = poisoned(svc, "failed")
    with Client(eps.intake, timeout=10) as client, caplog.at_level(logging.ERROR):
        _oid, where = held_by_its_crash(client, caplog, "held-crash-reply")
        assert where == ("CommandResult", "run_held")  # in the read
        assert svc.metrics.order_crashes._value.get() == 1
        control(eps.systems["billing"], capture_payment=[0])
        completes_after(svc, client, good, "held-crash-after")
    assert svc.dead_components() == [] and svc.is_ready()


def test_a_crash_on_an_event_taken_in_place_holds_the_order_and_the_event_is_acked(
        make_service: Any, sim: Any, eps: Endpoints,
        caplog: pytest.LogCaptureFixture) -> None:
    """The handler raises on ``shipment_delivered`` (entering ``completed``),
    handed over in place by the store writer's post-commit effects: the
    order is held, the event was recorded and acknowledged (the simulator
    does not resend it), the writer and the endpoint go on."""
    svc = make_service()
    good = poisoned(svc, "completed")
    with Client(eps.intake, timeout=10) as client, caplog.at_level(logging.ERROR):
        _oid, where = held_by_its_crash(client, caplog, "held-crash-event")
        assert where == ("Inbound", "run_held")  # after the commit
        completes_after(svc, client, good, "held-crash-event-after")
    assert svc.metrics.order_crashes._value.get() == 1
    assert svc.dead_components() == [] and svc.is_ready()


@pytest.mark.usefixtures("no_restock")
def test_mail_that_arrives_while_held_goes_first_and_nothing_is_lost(
        make_service: Any, eps: Endpoints) -> None:
    """In one loop call (no phase ends between): a stale timer is taken in
    place, a pykka stop lands in the held actor's inbox, then the event that
    completes the order must queue behind the stop, not pass it. The stop
    hands the event over to the reloaded order (``Revival.stopped``)."""
    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        oid = held_for_stock(svc, client, "held-mail")
        seen: dict[str, Any] = {}

        def build() -> None:
            ref = svc.router._live[oid]
            actor = ref._actor_weakref()
            assert svc.router.deliver(oid, TimerFired(("retry", "nothing", 97))) is True
            seen["in_place"] = (len(actor.actor_inbox), len(actor._handled))
            seen["stopping"] = ref.stop(block=False)  # into the held actor's inbox
            assert svc.router.deliver(oid, DomainEvent("ev-held-mail", "warehouse",
                                                       "stock_reserved", {})) is True
            seen["queued"] = [type(e.message).__name__ for e in actor.actor_inbox.queue]

        on_loop(svc, build)
        assert seen["in_place"] == (0, 1)  # handled, nothing queued
        assert seen["queued"] == ["_ActorStop", "DomainEvent"]  # behind the stop
        assert seen["stopping"].get(timeout=5) is True
        poll_until(lambda: client.get(oid)["order"]["state"] == "completed")
    assert svc.metrics.internal_errors.labels("router")._value.get() == 1
    assert svc.dead_components() == [] and svc.is_ready()


@pytest.mark.usefixtures("no_restock")
def test_a_note_or_reply_for_a_retired_or_passivated_order(
        make_service: Any, eps: Endpoints) -> None:
    """A retired actor instance refuses a note (``ActorDeadError``: the
    ``Tell`` effect drops it) and a finished order refuses a reply; a
    passivated order is reloaded for one and handles it."""
    svc = make_service(passivate_after_s=0.1)
    with Client(eps.intake, timeout=10) as client:
        done = client.submit(retail_order("held-retired"))["order_id"]
        retired = {}

        def keep_actor() -> None:
            retired["actor"] = svc.router._live[done]._actor_weakref()

        poll_until(lambda: done in svc.router._live)
        on_loop(svc, keep_actor)
        actor = retired["actor"]
        oid = held_for_stock(svc, client, "held-passivated")
        poll_until(lambda: oid not in svc.router.live_ids())  # passivated
        # retired once completed (waiting for its delivery it may be passivated first:
        # leaving the live set alone does not say it finished)
        poll_until(lambda: client.get(done)["order"]["state"] == "completed"
                   and done not in svc.router.live_ids())

        def late_note() -> str:
            try:
                actor.tell(Flushed(10**6))
            except pykka.ActorDeadError:
                return "refused"
            return "taken"

        stale = svc.metrics.stale_messages.labels("finished_order")._value.get()
        assert on_loop(svc, late_note) == "refused"
        assert on_loop(svc, lambda: svc.router.deliver(done, CommandResult(
            f"{done}:reserve_stock", True, {}))) is False
        assert svc.metrics.stale_messages.labels("finished_order")._value.get() == stale + 1
        assert on_loop(svc, lambda: svc.router.deliver(oid, DomainEvent(
            "ev-held-passivated", "warehouse", "stock_reserved", {}))) is True
        poll_until(lambda: client.get(oid)["order"]["state"] == "completed")
    assert svc.dead_components() == [] and svc.is_ready()


@pytest.mark.usefixtures("no_restock")
def test_a_delivery_nested_in_a_crash_taken_in_place(
        make_service: Any, eps: Endpoints, caplog: pytest.LogCaptureFixture) -> None:
    """Order A's handler raises on a cancel taken in place; the failure rule
    answers the cancel (``internal``) from inside A's held handler, and that
    answer delivers to B (idle: taken in place, nested) and to A again (out
    of the live set: it waits for A's reload). A is held as internal_error
    and still gets its message; B completes."""
    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        good = poisoned(svc, "assessingCancellation")
        a = held_for_stock(svc, client, "held-nest-a")
        b = held_for_stock(svc, client, "held-nest-b")
        svc.octx.engines["retail"] = good  # (A and B keep the engine they were made with)
        answers: list[Any] = []
        nested: dict[str, Any] = {}

        def answer(payload: dict[str, Any]) -> None:  # called inside A's crash handling
            answers.append(payload)
            actor_b = svc.router._live[b]._actor_weakref()
            nested["b_delivered"] = svc.router.deliver(b, DomainEvent(
                "ev-nest-b", "warehouse", "stock_reserved", {}))
            nested["b_in_place"] = (len(actor_b.actor_inbox), len(actor_b._handled))
            nested["a_delivered"] = svc.router.deliver(a, TimerFired(("retry", "none", 1)))
            nested["a_reviving"] = list(svc.router._reviving.get(a, []))

        with caplog.at_level(logging.ERROR):
            assert on_loop(svc, lambda: svc.router.deliver(a, Cancel("test", answer))) is True
        assert answers and answers[0]["code"] == "internal"
        assert nested["b_delivered"] is True and nested["b_in_place"] == (0, 1)
        assert nested["a_delivered"] is True
        assert TimerFired(("retry", "none", 1)) in nested["a_reviving"]
        assert crashed_in(caplog, a) == ("Cancel", "run_held")
        poll_until(lambda: client.get(b)["order"]["state"] == "completed")
        view = poll_until(lambda: (o := client.get(a)["order"]).get(
            "state_reason") == "internal_error" and o)
        assert view["state"] == "held"
    assert svc.metrics.order_crashes._value.get() == 1
    assert svc.dead_components() == [] and svc.is_ready()


def test_a_hold_on_another_thread_or_of_a_busy_actor_is_refused(
        make_service: Any, sim: Any, eps: Endpoints) -> None:
    """``hold`` says no off the loop thread and for an actor that is
    running or queued; nothing is taken then (its token stays free)."""
    svc = make_service(passivate_after_s=60)
    with Client(eps.intake, timeout=10) as client:
        oid = client.submit(retail_order("held-refused", items=BACKORDERED))["order_id"]
        poll_until(lambda: oid in svc.router.idle)
        actor = svc.router._live[oid]._actor_weakref()
        assert isinstance(actor, PooledActor)
        assert actor.hold() is False  # the test's thread
        assert not actor.actor_inbox.token.locked()

        def busy() -> tuple[bool, bool, bool]:
            first = actor.hold()  # held now: more may be taken in place
            again = actor.hold()
            tell(actor.actor_ref, TimerFired(("retry", "none", 2)))  # queued: it is held
            queued = actor.hold()  # mail queued ahead: no
            return first, again, queued

        assert on_loop(svc, busy) == (True, True, False)
        poll_until(lambda: not actor.actor_inbox.token.locked())  # the phase ended it


def test_sigterm_in_the_middle_of_a_burst_then_a_restart_finishes_every_order(
        procs: Any, tmp_path: Any) -> None:
    """Thousands of orders in flight, their replies and events taken in
    place, when SIGTERM comes: the service drains and exits 0; after a
    restart every order ends completed (nothing held in place was lost)."""
    eps = Endpoints()
    procs(eps.simulate_args() + ["--latency-ms", "5", "--delivery-s", "1", "--seed", "5"],
          "simulate")  # each order waits a second for its delivery event: in flight
    data = tmp_path / "data"
    svc = serve(procs, eps, data, "serve")
    with Client(eps.intake, timeout=20) as client:
        client.wait_ready(30)
        ids = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": o}
            for o in sample_orders(1500, seed=4, source="web", prefix="SIG-"))]
        states = [client.get(i)["order"]["state"] for i in ids[-50:]]
        assert not all(s == "completed" for s in states)  # still mid-flight
    assert svc.terminate() == 0
    again = serve(procs, eps, data, "serve-again")
    with Client(eps.intake, timeout=20) as client:
        client.wait_ready(30)
        views = wait_terminal(client, ids, timeout=60)
    assert {v["state"] for v in views.values()} == {"completed"}
    assert again.terminate() == 0

