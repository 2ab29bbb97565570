"""Defects found by the second hostile review (of the wiring, the fast paths,
the bounded turns, the sharded front's split and the CURVE cancel rule),
each with the test that failed before its fix. Real sockets, real LMDB,
real processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import curve_keys, retail_order
from test_shards import Sharded

from gateways.client import Client


def test_sharded_with_curve_a_channel_cannot_name_an_operator_in_its_cancel(
        procs: Any, tmp_path: Path) -> None:
    """The single node refuses a channel's cancel that names an operator
    (unauthorized); behind the sharded front the shards run without CURVE,
    so the front must refuse it itself, or a channel writes any name into
    its order's history as the operator who cancelled it."""
    keys = curve_keys(tmp_path / "keys", ["web", "operator-ann", "domains"])
    opts = keys.opts
    s = Sharded(procs, tmp_path, sim_args=(
        "--curve-key", str(keys.folder / "own" / "domains.key_secret"),
        "--service-key", str(keys.folder / "server" / "server.key"), "--delivery-s", "30"),
        serve_args=("--curve-server-key", str(keys.folder / "server" / "server.key_secret"),
                    "--curve-clients", str(keys.allowed)))
    with Client(s.eps.intake, curve=opts("web"), timeout=10) as web, \
            Client(s.eps.intake, curve=opts("operator-ann"), timeout=10) as operator:
        web.wait_ready(20)
        order_id = web.submit(retail_order("fwd-op-1"))["order_id"]
        forged = web.request({"type": "cancel_order", "order_id": order_id,
                              "operator": "operator-bob"})
        assert (forged["type"], forged.get("code")) == ("error", "unauthorized"), forged
        by_ext = web.request({"type": "cancel_order", "source_system": "web",
                              "external_id": "fwd-op-1", "operator": "operator-bob"})
        assert (by_ext["type"], by_ext.get("code")) == ("error", "unauthorized"), by_ext
        assert "operator-bob" not in str(operator.get(order_id)["order"]["history"])
    assert s.svc.terminate() == 0
