"""The order actor's per-save questions and a held slice's end.

``oms.outstanding.standing`` answers, in one call, what the actor asked
``Order.finished`` and ``awaiting_reply`` for at every snapshot: it must
agree with them for every field a step or note can hold (enum members or
their plain strings, as a decoded record may hold either), terminal or not.
At a held slice's end (``PooledActor._end_slice``), mail queued during
it, mail put from other threads at any moment, and a stop during the
slice behave as ``ScheduledInbox.finish_slice`` says. And a save that raises (a snapshot
the encoder refuses) follows the order failure rule, over a real service.
"""

from __future__ import annotations

import threading
from itertools import product
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import SYSTEMS, Endpoints
from helpers import poll_until, retail_order

from actors.eventloop import EventLoop
from actors.pool import PooledActor
from gateways.client import Client, wait_terminal
from oms.engine import Engine, Turning
from oms.model import Order
from oms.outstanding import (
    AWAITING,
    FINISHED,
    WAITING,
    awaiting_reply,
    delivering_notes,
    outstanding,
    standing,
)
from oms.states import OrderState, StepStatus, Undo

STATES = [OrderState.IN_PROGRESS, OrderState.HELD, OrderState.COMPLETED, OrderState.FAILED,
          "inProgress", "completed"]  # members, and their plain strings
STATUSES = [*StepStatus, *(s.value for s in StepStatus)]
COMPS = [None, *Undo, *(u.value for u in Undo)]


def _expected(order: Any) -> int:
    if Order.finished.fget(order):  # type: ignore[attr-defined]
        return FINISHED
    return AWAITING if awaiting_reply(order) else WAITING


def test_standing_agrees_with_finished_and_awaiting_reply_for_every_step_and_note() -> None:
    idle = SimpleNamespace(status=StepStatus.DONE, wait=None, retry_at=None, comp=None)
    checked = 0
    for state, status, wait, retry_at, comp in product(
            STATES, STATUSES, [None, "shipment_delivered"], [None, 5.0], COMPS):
        step = SimpleNamespace(status=status, wait=wait, retry_at=retry_at, comp=comp)
        order = SimpleNamespace(state=state, steps={"a": idle, "b": step}, notes=[])
        assert standing(order) == _expected(order), (state, step)  # type: ignore[arg-type]
        checked += 1
    assert checked == len(STATES) * len(STATUSES) * 2 * 2 * len(COMPS)


def test_standing_agrees_for_every_pair_of_notes_terminal_or_not() -> None:
    """Two notes: one at a gateway, one backing off, done or failed, in
    either order, with a step that awaits a reply or not."""
    notes = [SimpleNamespace(status=s, retry_at=r) for s in STATUSES for r in (None, 5.0)]
    running = SimpleNamespace(status=StepStatus.RUNNING, wait=None, retry_at=None, comp=None)
    done = SimpleNamespace(status=StepStatus.DONE, wait=None, retry_at=None, comp=None)
    for state, first, second, step in product(STATES, notes, notes, (running, done)):
        order = SimpleNamespace(state=state, steps={"a": step}, notes=[first, second])
        assert standing(order) == _expected(order), (state, first, second, step)  # type: ignore[arg-type]


def test_delivering_notes_is_command_outs_notes() -> None:
    for status, retry_at in product(STATUSES, [None, 5.0]):
        note = SimpleNamespace(status=status, retry_at=retry_at)
        order = SimpleNamespace(steps={}, notes=[note])
        assert delivering_notes(order) == outstanding(order).notes, note  # type: ignore[arg-type]


def test_finished_takes_a_plain_string_state() -> None:
    order = SimpleNamespace(state="completed", notes=[])
    assert Order.finished.fget(order) is True  # type: ignore[attr-defined]
    order = SimpleNamespace(state="completed",
                            notes=[SimpleNamespace(status="running", retry_at=5.0)])
    assert Order.finished.fget(order) is False  # type: ignore[attr-defined]


# -- a held slice's end ------------------------------------------------------------


class Recorder(PooledActor):
    """Records what it handles, in order; ``echo``: its first slice end tells
    itself one more message (mail queued during the slice's end); ``stop``:
    the message that stops it (as passivation does, from its own slice)."""

    def __init__(self, loop: EventLoop, echo: bool = False) -> None:
        super().__init__(loop)  # type: ignore[arg-type]
        self.seen: list[Any] = []
        self.ends = 0
        self.echo = echo

    def on_receive(self, message: Any) -> Any:
        self.seen.append(message)
        if message == "stop":
            self.stop_now()

    def on_slice_end(self) -> None:
        self.ends += 1
        if self.echo:
            self.echo = False
            self.actor_ref.tell("echo")


@pytest.fixture
def loop() -> Any:
    lp = EventLoop("slice-end-test").start()
    yield lp
    lp.stop(5)


def _held(actor: PooledActor, message: Any) -> bool:
    if actor.hold():
        actor.run_held(message)
        return True
    return False


def test_mail_queued_during_a_held_slices_end_runs_in_a_slice_of_its_own(loop: EventLoop) -> None:
    actor = Recorder(loop, echo=True)
    assert loop.run_sync(lambda: _held(actor, "first")) is True
    poll_until(lambda: actor.seen == ["first", "echo"])
    poll_until(lambda: loop.run_sync(lambda: not actor.actor_inbox.queue and actor.ends == 2))
    assert loop.run_sync(lambda: _held(actor, "again")) is True  # the token came back
    poll_until(lambda: actor.ends == 3)
    assert actor.seen == ["first", "echo", "again"]


def test_a_put_after_a_held_slices_end_is_scheduled(loop: EventLoop) -> None:
    actor = Recorder(loop)
    assert loop.run_sync(lambda: _held(actor, 1)) is True
    poll_until(lambda: actor.ends == 1)
    actor.actor_ref.tell(2)  # from this thread: the token is free, the put takes it
    poll_until(lambda: actor.seen == [1, 2] and actor.ends == 2)


def test_an_actor_stopped_in_a_held_slice_is_left_behind(loop: EventLoop) -> None:
    actor = Recorder(loop)
    assert loop.run_sync(lambda: _held(actor, "stop")) is True
    poll_until(lambda: not actor.actor_inbox.bound())
    assert actor.ends == 0  # stopped: no slice end
    assert loop.run_sync(lambda: _held(actor, "late")) is False
    assert actor.seen == ["stop"]


def test_puts_from_other_threads_racing_held_slices_lose_nothing(loop: EventLoop) -> None:
    """Two threads tell the actor while the loop holds it over and over: every
    message is handled once, each thread's in the order it was sent."""
    actor = Recorder(loop)
    per_thread = 2000

    def sender(name: str) -> None:
        for n in range(per_thread):
            actor.actor_ref.tell((name, n))

    def holds() -> None:
        for n in range(50):
            _held(actor, ("loop", n))  # refused while mail is queued or it runs

    threads = [threading.Thread(target=sender, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        loop.run_sync(holds)
    for thread in threads:
        thread.join()
    loop.run_sync(holds)
    poll_until(lambda: loop.run_sync(
        lambda: sum(1 for m in actor.seen if m[0] != "loop") == 2 * per_thread))
    for name in ("a", "b"):
        assert [m[1] for m in actor.seen if m[0] == name] == list(range(per_thread))
    assert loop.run_sync(lambda: _held(actor, "after")) is True  # nothing left holding it


# -- a save that raises, in a real service -------------------------------------------


class OnceInvoiced(Engine):
    """The retail engine, but once an order's handled message completed its
    ``create_invoice`` step (and so started ``capture_payment``), the first
    time only, ``misbehave`` runs on the order and the message's turning."""

    def __init__(self, proc: Any) -> None:
        super().__init__(proc)
        self.done_with: set[str] = set()

    def handle(self, order: Order, msg: Any, now: float,
               effects: list[Any] | None = None) -> Turning:
        turning = super().handle(order, msg, now, effects)
        if (order.steps["create_invoice"].status == StepStatus.DONE
                and order.order_id not in self.done_with):
            self.done_with.add(order.order_id)
            self.misbehave(order, turning)
        return turning

    def misbehave(self, order: Order, turning: Turning) -> None:
        raise NotImplementedError


class _Unsavable(OnceInvoiced):
    """The order holds a value the snapshot encoder refuses: the actor's save
    raises in ``on_slice_end`` (a bug that corrupts the order)."""

    def misbehave(self, order: Order, turning: Turning) -> None:
        order.attributes["poison"] = object()


def test_a_save_that_raises_holds_the_order_and_sends_nothing_it_decided(
        make_service: Any, sim: Any, eps: Endpoints) -> None:
    """The failure rule: the order is reloaded from its last durable snapshot
    and held as ``internal_error``; the command its unsaved slice decided
    never went out (persist before send); other orders complete."""
    held_and_unsent(make_service(), sim, eps, _Unsavable, "unsavable", "TypeError")


def held_and_unsent(svc: Any, sim: Any, eps: Endpoints, engine: type, ext: str,
                    error: str) -> None:
    """An order whose engine is ``engine`` (failing in its second slice) is
    held as ``internal_error`` with its first step done and the second's
    command sent but not the third's, and the next order completes."""
    good = svc.octx.engines["retail"]
    with Client(eps.intake, timeout=10) as client:
        svc.octx.engines["retail"] = engine(good.proc)
        oid = client.submit(retail_order(f"{ext}-1"))["order_id"]
        view = poll_until(lambda: (o := client.get(oid)["order"]).get(
            "state_reason") == "internal_error" and o)
        svc.octx.engines["retail"] = good
        assert view["state"] == "held"
        assert view["failure"]["error"]["message"].startswith(error)
        steps = {s["name"]: s["status"] for s in view["steps"]}
        # the reply lost with the failed slice leaves its step running as
        # durable; the command that slice decided was never sent
        assert (steps["reserve_stock"], steps["create_invoice"], steps["capture_payment"]) == (
            "done", "running", "pending"), steps
        sent: dict[str, Any] = {}
        for system in SYSTEMS:
            sent |= sim.report(system, order_id=oid)["order"]
        assert "create_invoice" in sent and "capture_payment" not in sent, sent
        after = client.submit(retail_order(f"{ext}-2"))["order_id"]
        assert wait_terminal(client, [after], timeout=20)[after]["state"] == "completed"
    assert svc.metrics.order_crashes._value.get() == 1
    assert svc.dead_components() == [] and svc.is_ready()
