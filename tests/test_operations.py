"""Operating on orders over the socket and from the CLI: fallout handled by
operators, cancellation racing a step reply, an operator action racing a
restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, sim_report
from helpers import poll_until, retail_order
from test_chaos import fast_retail

from app.cli import main
from gateways.client import Client, wait_terminal
from oms import codec


def hold_policy(folder: Path) -> str:
    fast_retail(folder)
    path = folder / "retail.toml"
    path.write_text(path.read_text().replace('failure_policy = "compensate"',
                                             'failure_policy = "hold"'))
    return str(folder)


def control(ep: str, **fail: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    sock.send(codec.pack({"type": "control", "fail": fail}))
    assert sock.poll(5000)
    sock.recv()
    sock.close()


def fallout_orders(client: Client, n: int, prefix: str) -> list[str]:
    ids = [client.submit(retail_order(f"{prefix}{i}"))["order_id"] for i in range(n)]
    poll_until(lambda: all(client.get(i)["order"].get("state_reason") == "fallout"
                           for i in ids))
    return ids


def test_operators_retry_skip_and_abort_fallout(make_service: Any, sim: Any, eps: Any,
                                                tmp_path: Path, capsys: Any) -> None:
    make_service(processes=hold_policy(tmp_path / "procs"))
    control(eps.systems["billing"], capture_payment=[1.0, "payment_declined"])
    with Client(eps.intake) as client:
        retry, skip, abort = fallout_orders(client, 3, "fo-")
        assert main(["fallout", "list", "--json", "--intake", eps.intake]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {o["order_id"] for o in listed} == {retry, skip, abort}
        assert listed[0]["failure"]["step"] == "capture_payment"
        control(eps.systems["billing"], capture_payment=[0])  # the card works now
        ops = ["--intake", eps.intake, "--operator", "ann", "--reason", "card fixed"]
        assert main(["order", "retry", retry, *ops]) == 0
        assert main(["order", "skip", skip, "capture_payment", *ops]) == 0
        assert main(["order", "abort", abort, *ops]) == 0
        assert main(["order", "retry", abort, *ops]) == 1  # no longer fallout
        views = wait_terminal(client, [retry, skip, abort], timeout=20)
    assert views[retry]["state"] == "completed"
    assert views[skip]["state"] == "completed"
    assert views[abort]["state"] == "failed"
    for oid, action in ((retry, "retry"), (skip, "skip"), (abort, "abort")):
        entry = next(h for h in views[oid]["history"] if h.get("action"))
        assert (entry["action"], entry["operator"], entry["reason"]) == (
            action, "ann", "card fixed")
    undo = sim.report(order_id=abort)["order"]
    assert (undo.get("void_invoice"), undo.get("release_stock")) == (1, 1)
    assert main(["order", "show", retry, "--intake", eps.intake]) == 0
    assert "operator ann asked to retry: card fixed" in capsys.readouterr().out


@pytest.fixture
def no_restock(sim_config: Any) -> Any:
    from conftest import SimThread

    sim_config.restock_s = 3600.0
    thread = SimThread(sim_config)
    yield thread
    thread.stop()


def test_orders_view_filters_and_counts(no_restock: Any, make_service: Any, eps: Any,
                                        client: Client, capsys: Any) -> None:
    make_service()
    held = client.submit(retail_order("view-held", items=[
        {"id": "a", "product_id": "SKU-901", "quantity": 10**9}]))["order_id"]
    done = client.submit(retail_order("view-done"))["order_id"]
    wait_terminal(client, [done], timeout=20)
    poll_until(lambda: client.get(held)["order"]["state"] == "held")
    assert main(["orders", "--state", "held", "--json", "--intake", eps.intake]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["order_id"] for o in out["orders"]] == [held]
    assert out["unfinished"]["held"] == 1
    assert main(["orders", "--older-than", "3600", "--json", "--intake", eps.intake]) == 0
    assert json.loads(capsys.readouterr().out)["orders"] == []
    assert main(["orders", "--intake", eps.intake]) == 0
    assert "Unfinished orders by state: held 1" in capsys.readouterr().out


def test_cancel_racing_a_step_reply(make_service: Any, sim_config: Any, eps: Any) -> None:
    from conftest import SimThread

    sim_config.latency_ms = 300.0
    thread = SimThread(sim_config)
    try:
        make_service()
        with Client(eps.intake) as client:
            oid = client.submit(retail_order("race-1"))["order_id"]
            poll_until(lambda: any(s["name"] == "reserve_stock" and s["status"] == "running"
                                   for s in client.get(oid)["order"]["steps"]))
            assert client.cancel(oid, "changed mind")["type"] == "cancel_accepted"
            view = wait_terminal(client, [oid], timeout=20)[oid]
        ops = thread.report(order_id=oid)["order"]
    finally:
        thread.stop()
    assert view["state"] == "cancelled"
    states = [h["state"] for h in view["history"]]
    assert states[-3:] == ["assessingCancellation", "pendingCancellation", "cancelled"]
    assert (ops["reserve_stock"], ops["release_stock"]) == (1, 1)  # its outcome was undone


@pytest.mark.slow
def test_operator_action_racing_a_restart(procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    procs(eps.simulate_args() + ["--fail", "capture_payment=1.0:payment_declined",
                                 "--delivery-s", "0.1"], "simulate")
    args = eps.serve_args(tmp_path / "data") + ["--processes", hold_policy(tmp_path / "p")]
    svc = procs(args, "serve")
    with Client(eps.intake) as client:
        client.wait_ready(30)
        (oid,) = fallout_orders(client, 1, "restart-")
        reply = client.request({"type": "abort_order", "order_id": oid, "operator": "bo"})
        assert reply["type"] == "operator_accepted"
    svc.kill()  # kill -9 right after the acknowledgement
    procs(args, "serve-again")
    with Client(eps.intake) as client:
        client.wait_ready(30)
        view = wait_terminal(client, [oid], timeout=30)[oid]
    assert view["state"] == "failed"
    assert any(h.get("action") == "abort" for h in view["history"])
    ops = sim_report(eps.systems["billing"], order_id=oid)["order"]
    assert (ops.get("void_invoice"), ops.get("release_stock")) == (1, 1)
