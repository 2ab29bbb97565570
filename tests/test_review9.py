"""Hostile review 9: the session's cuts (``Send.raw``, the record buffer,
the handed-over lists, the writer's bare bundles) against their promise:
the same bytes on the wire and in the store as before.

The bytes a command carried *before* ``Send.raw`` were the gateway's own
encoding of ``Send.args`` at the moment it sent them (``_Command`` with
the map, as ``old_frame`` builds it). Each test here holds the new
gateway to that (but the first: there the live map had changed since the
launch, and the command now carries its arguments as launched, as the
record and every resend always did): a real ``Gateway`` on a real DEALER socket sends to a
ROUTER this test binds, and the frame read there is compared byte for
byte.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
from conftest import CommandSink
from helpers import Probe, normalized, ok_domain, poll_until, retail_order

from actors.effects import Tell
from actors.loop import burst
from actors.order import _records
from gateways.gateway import Gateway, _Command
from oms import snapshot
from oms.engine import Engine, new_order
from oms.errors import DomainError
from oms.messages import CommandResult, Send, Start, Timer, TimerFired
from oms.process import builtin_processes, parse_process

RETAIL = builtin_processes()["retail"]
_enc = msgspec.msgpack.Encoder().encode


def old_frame(order_id: str, cmd: Send) -> bytes:
    """What the gateway sent for ``cmd`` before this session: its args map,
    encoded when sent."""
    return _enc(_Command(cmd.command_id, order_id, cmd.op, cmd.args))


def _wire(gw: Gateway, domain: CommandSink, order_id: str, cmd: Send) -> bytes:
    gw.send(order_id, cmd)
    return domain.frame()


# -- 1. Send.raw: a per-item command whose args hold the item (``$item``) ------------------

ALIAS = '''
[process]
order_type = "retail"
failure_policy = "compensate"
item_failure = "partial"

[defaults]
timeout_s = 5.0
retry = { max_attempts = 1 }

[steps.check]
system = "warehouse"
op = "check"
args = { order = "$order.id" }

[steps.label.per_item.add]
system = "shipping"
op = "label"
args = { item = "$item" }

[steps.pick]
after = ["check"]

[steps.pick.per_item.add]
system = "warehouse"
op = "pick"
args = { item = "$item" }
'''


def test_a_command_goes_out_with_its_arguments_as_launched_and_resent_the_same(
        wired: tuple[Gateway, CommandSink]) -> None:
    """The review's finding, decided: ``args = { item = "$item" }`` (a
    process the checker accepts) fills a command's arguments with the
    order's own item map, which the same slice may change before the save
    (here ``check`` succeeds, launching ``pick[i1]`` with the item
    ``inProgress``; then ``label[i1]`` fails for good and the item is
    ``failed``). The gateway used to encode that live map when it sent it,
    so the first send said ``failed`` while the record, and every resend
    from it, said ``inProgress``: one command id, two payloads. It now
    sends the bytes kept at launch (``Send.raw``): the first send, the
    record and a resend after a restart carry the same bytes."""
    gw, domain = wired
    proc = parse_process(ALIAS, "alias.toml")
    engine = Engine(proc)
    order = new_order("o-1", normalized(retail_order("alias-1")), proc, 1000.0)
    engine.handle(order, Start(), 1000.0, [])
    slice_effects: list[Any] = []  # as OrderActor: one list for the slice
    engine.handle(order, CommandResult("o-1:check", True, {}), 1001.0, slice_effects)
    engine.handle(order, CommandResult("o-1:label[i1]", False, None,
                                       DomainError("no_label", "no", False)), 1001.1,
                  slice_effects)
    pick = next(fx for fx in slice_effects if type(fx) is Send
                and fx.command_id == "o-1:pick[i1]")
    assert pick.args["item"]["state"] == "failed"  # the live map, changed since the launch
    first = _wire(gw, domain, "o-1", pick)
    assert msgspec.msgpack.decode(first)["args"]["item"]["state"] == "inProgress"
    launched = pick._replace(args=order.steps["pick[i1]"].arguments(), raw=None)
    assert first == old_frame("o-1", launched)  # the launch's arguments, as a map encodes
    from oms.messages import Resume
    reloaded = snapshot.decode(snapshot.encode(order))  # a restart: the record's step
    resent = [fx for fx in engine.handle(reloaded, Resume(), 1100.0, []).effects
              if type(fx) is Send and fx.command_id == "o-1:pick[i1]"]
    assert resent and resent[0].raw is None
    assert _wire(gw, domain, "o-1", resent[0]) == first


# -- 1b. attacks that held: every other command's bytes are what they were ------------------


def test_launches_resends_after_a_backoff_and_note_resends_send_the_old_bytes(
        wired: tuple[Gateway, CommandSink]) -> None:
    """A launch, a retry after a back-off (in memory: raw kept), a CRM note
    resent after its back-off, a resend after a reload (maps), an undo and
    an operator re-run (gen bump): each frame is the old gateway's."""
    gw, domain = wired
    engine = Engine(RETAIL)
    order = new_order("o-2", normalized(retail_order("bytes-1")), RETAIL, 1000.0)
    checked = 0

    def run(msg: Any, now: float) -> list[Send]:
        nonlocal checked
        fx: list[Any] = []
        engine.handle(order, msg, now, fx)
        out = []
        for f in fx:
            if type(f) is Send:
                assert _wire(gw, domain, order.order_id, f) == old_frame(order.order_id, f), f
                checked += 1
                out.append(f)
        timers.extend(f for f in fx if type(f) is Timer)
        return out

    timers: list[Timer] = []
    first = run(Start(), 1000.0)
    reserve = next(s for s in first if s.op == "reserve_stock")
    note = next(s for s in first if s.system == "crm")
    assert reserve.raw is not None and note.raw is not None
    busy = DomainError("unavailable", "down", True)
    run(CommandResult(reserve.command_id, False, None, busy), 1001.0)
    run(CommandResult(note.command_id, False, None, busy), 1001.0)
    for t in list(timers):
        again = run(TimerFired(t.token), t.at)
        assert again and all(s.raw is not None for s in again)  # the kept bytes, resent
    # a reload from the record (maps), then a Resume: the in-flight commands again
    from oms.messages import Resume
    order = snapshot.decode(snapshot.encode(order))
    resent = run(Resume(), 1100.0)
    assert resent and all(s.raw is None for s in resent)
    # reserve ok, invoice ok, payment declined for good: undo commands (no raw)
    r = next(s for s in resent if s.op == "reserve_stock")
    inv = run(CommandResult(r.command_id, True, {"reservation_id": "r1"}), 1101.0)
    pay = run(CommandResult(next(s for s in inv if s.op == "create_invoice").command_id,
                            True, {"invoice_id": "inv1"}), 1102.0)
    undo = run(CommandResult(next(s for s in pay if s.op == "capture_payment").command_id,
                             False, None, DomainError("declined", "no", False)), 1103.0)
    assert any(s.command_id.endswith(":undo") for s in undo)
    assert checked >= 8


def test_an_operator_rerun_of_a_failed_step_sends_the_new_generations_args(
        wired: tuple[Gateway, CommandSink]) -> None:
    from oms.messages import Operate
    gw, domain = wired
    text = _retail_text().replace('failure_policy = "compensate"', 'failure_policy = "hold"')
    proc = parse_process(text, "hold.toml")
    engine = Engine(proc)
    order = new_order("o-3", normalized(retail_order("rerun-1")), proc, 1000.0)
    fx: list[Any] = []
    engine.handle(order, Start(), 1000.0, fx)
    reserve = next(f for f in fx if type(f) is Send and f.op == "reserve_stock")
    fx = []
    engine.handle(order, CommandResult(reserve.command_id, False, None,
                                       DomainError("no_stock", "no", False)), 1001.0, fx)
    assert order.state == "held"
    fx = []
    engine.handle(order, Operate("retry", "ops", "again", None, lambda _r: None), 1002.0, fx)
    rerun = next(f for f in fx if type(f) is Send and f.op == "reserve_stock")
    assert rerun.command_id.endswith("#1") and rerun.raw is not None
    assert _wire(gw, domain, "o-3", rerun) == old_frame("o-3", rerun)


def _retail_text() -> str:
    from importlib import resources

    return resources.files("oms.processes").joinpath("retail.toml").read_text()


# -- 2. the record buffer ------------------------------------------------------------------


def test_the_record_buffer_is_never_handed_out_and_survives_interleaved_threads() -> None:
    """A record returned is a bytes copy: encoding the next order into the
    same buffer leaves it as it was, and each thread's buffer is its own."""
    buf = _records.buf
    a = new_order("o-a", normalized(retail_order("a", items=[
        {"id": f"i{n}", "product_id": "p", "quantity": 1, "unit_price_minor": 1}
        for n in range(30)])), RETAIL, 1.0)
    b = new_order("o-b", normalized(retail_order("b")), RETAIL, 1.0)
    ra = snapshot.encode_in(a, buf)
    copy = bytes(ra)
    rb = snapshot.encode_in(b, buf)
    assert ra == copy == snapshot.encode(a) and rb == snapshot.encode(b)
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(_records.buf))
    t.start()
    t.join()
    assert other[0] is not buf


# -- 3. handed-over lists through the real writer and LMDB (a failing store) ---------------


def test_held_writes_after_failed_commits_run_their_handed_over_effects_once(
        tmp_path: Path) -> None:
    """Snapshots and a barrier handed over with their lists (as the order
    actor now does), told in one burst (a bundle the writer takes bare),
    while a real full disk refuses every commit: held, nothing runs; once
    space returns, each record is stored byte for byte and each list's
    effects run once, in the order told; the lists are not changed."""
    from test_store_full import full_disk_writer

    from actors.store_writer import Barrier, SaveOrder

    with full_disk_writer(tmp_path) as (store, writer, filler, fatal):
        ran: list[str] = []
        record = b"r" * 300_000
        ids = [f"O0000000000{n}" for n in range(31, 35)]
        lists: list[list[Any]] = []
        with burst():
            for n, oid in enumerate(ids):
                fx = [Tell(Probe(lambda _m, o=oid: ran.append(o)), "saved")]
                lists.append(fx)
                writer.tell(SaveOrder(oid, record, True, [], fx, None, False))
                if n == 1:
                    bfx = [Tell(Probe(lambda _m: ran.append("barrier")), "b")]
                    lists.append(bfx)
                    writer.tell(Barrier(bfx))
        before = [list(x) for x in lists]
        poll_until(lambda: not writer.healthy, timeout=10)
        assert ran == [] and fatal == []
        filler.unlink()
        poll_until(lambda: writer.healthy and len(ran) >= 5, timeout=15)
        assert ran == [ids[0], ids[1], "barrier", ids[2], ids[3]]
        assert [list(x) for x in lists] == before
        with store.read() as txn:
            assert all(txn.get(o.encode(), db=store.db["orders"]) == record for o in ids)


def test_every_command_of_whole_telecom_and_retail_orders_goes_out_as_before(
        wired: tuple[Gateway, CommandSink]) -> None:
    """Whole orders (telecom per-item provisioning with a failed item and its
    undo; retail with a declined payment and compensation; CRM notes): every
    command through the real gateway is the old gateway's frame, byte for byte."""
    from helpers import Driver
    from test_engine import TELECOM_ORDER

    gw, domain = wired
    declined = CommandResult("", False, None, DomainError("declined", "no", False))
    telecom = builtin_processes()["telecom"]
    drivers = [
        Driver(telecom, TELECOM_ORDER, ok_domain({"modify_service": declined})),
        Driver(RETAIL, retail_order("whole-1"), ok_domain({"capture_payment": declined})),
        Driver(RETAIL, retail_order("whole-2"), ok_domain()),
    ]
    count = 0
    for d in drivers:
        d.start()
        if d.order.order_type == "retail" and d.order.state == "inProgress":
            d.event("shipment_delivered", {})
        for cmd in d.sent:
            assert _wire(gw, domain, d.order.order_id, cmd) == old_frame(d.order.order_id, cmd)
            count += 1
    assert count > 15 and any(c.raw is not None for d in drivers for c in d.sent)
