"""A launched step keeps its command's arguments encoded (``oms.model.kept``):
each snapshot copies the bytes, every resend and undo reads the map they
encode, and the record is the same bytes as with the map."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from helpers import Driver, ok_domain, retail_order, thawed
from test_engine import RETAIL, TELECOM, TELECOM_ORDER

from oms import snapshot
from oms.engine import Engine
from oms.errors import DomainError
from oms.messages import Cancel, CommandResult, Resume, Send, TimerFired
from oms.model import Step, kept
from oms.states import StepStatus, Undo

UNAVAILABLE = CommandResult("", False, None, DomainError("unavailable", "down", True))


def test_a_launched_step_keeps_the_bytes_of_the_map_it_sent() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": None}))
    d.start()
    for sent in d.sent:
        step = d.order.steps.get(sent.op)
        if step is None:  # a CRM note
            step = d.order.notes[int(sent.command_id.rsplit(":", 1)[1])]
        assert type(step.args) is msgspec.Raw and type(sent.args) is dict
        assert bytes(step.args) == msgspec.msgpack.encode(sent.args)
        assert step.arguments() == sent.args
    record = snapshot.encode(d.order)
    assert record == snapshot.encode(thawed(d.order))  # the same record as with the maps
    loaded = snapshot.decode(record)
    assert all(type(s.args) is dict for s in loaded.steps.values() if s.args is not None)


def test_resends_carry_the_arguments_as_first_sent() -> None:
    """Retried after an error, and resent after a restart (from the record):
    the same op, id and arguments, even where the order's own maps changed
    since (the command is the one first sent, not a new one)."""
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": UNAVAILABLE}))
    d.start()
    first = next(s for s in d.sent if s.op == "create_shipment")
    sent = msgspec.msgpack.encode(first.args)  # the bytes the gateway sent
    d.order.delivery_address["city"] = "Elsewhere"  # after the launch
    for _ in range(2):  # two of its retries
        d.feed(TimerFired(d.timers.pop(0).token))
    retries = [s for s in d.sent if s.op == "create_shipment"][1:]
    assert retries and all(msgspec.msgpack.encode(s.args) == sent
                           and s.command_id == first.command_id for s in retries)
    assert retries[0].args["delivery_address"]["city"] != "Elsewhere"
    d = Driver(RETAIL, retail_order(), ok_domain({"create_shipment": None}))  # no reply
    d.start()
    sent = msgspec.msgpack.encode(next(s for s in d.sent if s.op == "create_shipment").args)
    d.order.delivery_address["city"] = "Elsewhere"
    restarted = snapshot.decode(snapshot.encode(d.order))
    turning = Engine(RETAIL).handle(restarted, Resume(), d.now + 60)
    resent = [fx for fx in turning.effects if isinstance(fx, Send)]
    assert [(s.op, msgspec.msgpack.encode(s.args)) for s in resent] == [
        ("create_shipment", sent)]


def test_a_resent_crm_note_carries_its_arguments() -> None:
    d = Driver(RETAIL, retail_order(), ok_domain({"notify": None, "create_invoice": None}))
    d.start()
    note = d.order.notes[0]
    assert note.status == StepStatus.RUNNING and type(note.args) is msgspec.Raw
    sent = next(s for s in d.sent if s.system == "crm")
    turning = Engine(RETAIL).handle(d.order, Resume(), d.now + 60)
    resent = [fx for fx in turning.effects if isinstance(fx, Send) and fx.system == "crm"]
    assert [(s.command_id, s.args) for s in resent] == [(sent.command_id, sent.args)]


def test_an_undo_reads_the_kept_arguments() -> None:
    """Telecom's compensations name ``$args.service_id``: a cancel undoes the
    delete and the modify with the service ids their commands were sent with."""
    d = Driver(TELECOM, TELECOM_ORDER, ok_domain({"activate_service": None}))
    d.start()
    kept_ids = {s.key: s.arguments()["service_id"]  # type: ignore[index]
                for s in d.order.steps.values() if s.op in ("modify_service",
                                                            "deactivate_service")}
    assert kept_ids == {"provision[m]": "svc-1", "provision[d]": "svc-2"}
    assert all(type(d.order.steps[k].args) is msgspec.Raw for k in kept_ids)
    d.feed(Cancel("customer asked", "ops"))  # assessed once the running activation settles
    d.feed(CommandResult("o-1:provision[a]", True, {"service_id": "svc-9"}))
    d.feed(CommandResult("o-1:provision[d]:undo", True, {}))  # (held by the domain above)
    undone = {s.command_id: s.args["service_id"] for s in d.sent
              if s.command_id.endswith(("provision[m]:undo", "provision[d]:undo"))}
    assert undone == {"o-1:provision[d]:undo": "svc-2", "o-1:provision[m]:undo": "svc-1"}
    assert d.order.steps["provision[m]"].comp in (Undo.RUNNING, Undo.DONE)


@pytest.mark.parametrize("value", [2**70, object(), {"nested": -(2**64)}])
def test_a_map_msgspec_cannot_encode_is_kept_as_a_map(value: Any) -> None:
    args = {"a": value}
    assert kept(args) is args
    step = Step("k", "k", "s", "op", args=args)
    assert step.arguments() is args


def test_kept_arguments_read_back_to_their_keys_types() -> None:
    """Keys msgpack carries that are not strings come back as they went in."""
    args = {1: "int key", "list": [1, 2.5, None, True], "map": {"x": b"\x00"}}
    step = Step("k", "k", "s", "op", args=kept(args))  # type: ignore[arg-type]
    assert step.arguments() == args


ALLOWED_ARGS_READS = {("oms/model.py", "self.args"),  # ``Step.arguments`` itself
                      ("oms/engine_run.py", "action.args"),  # a definition's template
                      ("console/app.py", "request.args")}  # the console's query string


def test_no_code_reads_a_steps_args_but_through_arguments() -> None:
    """A step's ``args`` has two shapes (``Raw`` once launched in this
    process, a map when decoded from a record): a new ``step.args[...]``
    would pass the restart paths and fail live. So every read of an
    attribute named ``args`` in the service's code is one of these."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    reads = set()
    for pkg in ("oms", "actors", "gateways", "storage", "app", "console", "shards", "bench"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr == "args"
                        and isinstance(node.ctx, ast.Load)):
                    reads.add((str(path.relative_to(root)), ast.unparse(node)))
    assert reads <= ALLOWED_ARGS_READS, (
        f"read a step's arguments with Step.arguments(), not .args: {reads - ALLOWED_ARGS_READS}")
