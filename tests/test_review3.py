"""Review of session 4's runtime changes (issue 15): defects found, each
pinned by a test over real parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import poll_until

from gateways.client import Client, wait_terminal

# A definition whose only step is per item, for ``add`` items: an order of
# ``noChange`` items has nothing to run and completes in its Start. No CRM
# notice, so nothing is out once it is completed.
NOTHING_TO_DO = """
[process]
order_type = "bundle"
description = "Activate the added services; nothing else"

[steps.provision.per_item.add]
system = "provisioning"
op = "activate_service"
args = { product_id = "$item.product_id" }
"""


def _bundle(ext: str) -> dict[str, Any]:
    return {"source_system": "crm-ui", "external_id": ext, "order_type": "bundle",
            "customer": {"id": "c-1"},
            "customer_address": {"line1": "1 Way", "city": "Oslo", "postal_code": "0150",
                                 "country": "NO"},
            "items": [{"id": "phone", "action": "noChange", "product_id": "PHONE"}]}


def test_an_order_its_start_finishes_leaves_the_active_index(
        tmp_path: Path, make_service: Any, sim: Any, client: Client) -> None:
    """Start runs in the create's transaction (actors.effects.NewOrder): an
    order it finishes is stored finished, and must leave the ``active`` index
    (and enter retention's finish-time index) as any finished order does;
    else it is never archived, and after a restart it is counted in flight
    for ever (its admission slot never given back)."""
    folder = tmp_path / "procs"
    folder.mkdir()
    (folder / "bundle.toml").write_text(NOTHING_TO_DO)
    svc = make_service(processes=str(folder))
    oid = client.submit(_bundle("b-1"))["order_id"]
    assert wait_terminal(client, [oid], timeout=20)[oid]["state"] == "completed"
    poll_until(lambda: svc.router.counts.snapshot(0)["in_flight"] == 0)  # retired
    assert oid not in svc.store.active_ids()
    with svc.store.env.begin() as txn:
        done = [v for _k, v in txn.cursor(db=svc.store.db["done"])]
    assert done == [b"completed"]
    svc.stop()  # a restart: it is not recovered, and holds no admission slot
    again = make_service(processes=str(folder))
    assert again.router.counts.snapshot(0)["in_flight"] == 0


def test_a_create_committed_without_its_start_effects_resumes_after_a_restart(
        tmp_path: Path, make_service: Any, sim: Any, client: Client) -> None:
    """The crash window that NewOrder opened: the create (with the started
    order) is durable, then the process dies before the router runs the
    Start's effects (commands, CRM notice, events, timers). On disk that is
    exactly what the writer's transaction leaves, so the store is written by
    the same code path (``actors.effects.NewOrder`` under
    ``Store.create_order``) and the effects dropped; the service started on
    it must send the commands and finish the orders."""
    from helpers import normalized, retail_order
    from test_processes_e2e import telecom

    from actors.effects import NewOrder
    from oms import codec
    from oms.engine import Engine
    from oms.process import builtin_processes
    from storage.store import Store

    procs = builtin_processes()
    store = Store(str(tmp_path / "data"))
    made = []
    for raw in (retail_order("lost-1"),
                telecom("lost-2", "cust-9", [{"id": "a", "product_id": "FIBER", "quantity": 1}])):
        order = normalized(raw)
        build = NewOrder(order, Engine(procs[order["order_type"]]))
        with store.write() as txn:
            created = store.create_order(txn, order["source_system"], order["external_id"],
                                         codec.digest(order), build)
        assert created.kind == "accepted"
        made.append(created.order_id)
    assert build.started == ()  # the telecom order waits for its turn
    store.close()
    make_service()
    views = wait_terminal(client, made, timeout=30)
    assert {v["state"] for v in views.values()} == {"completed"}, views
