"""CURVE on every channel-facing socket, channel identity, and refusals,
over real sockets. Refused clients fail at the handshake: no message reaches
the service."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Endpoints, SimThread
from helpers import poll_until, retail_order

from actors.security import SecurityError, client_options, generate
from oms import codec
from oms.cli import main
from oms.client import Client, wait_terminal


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate(folder / "server", ["server"])
    generate(folder / "own", ["web", "store", "operator-ann", "domains", "intruder"])
    allowed = folder / "clients"
    allowed.mkdir()
    for name in ("web", "store", "operator-ann", "domains"):
        (allowed / f"{name}.key").write_text((folder / "own" / f"{name}.key").read_text())
    return folder


def opts(keys: Path, name: str, server: str = "server") -> dict[str, Any]:
    return client_options(str(keys / "own" / f"{name}.key_secret"),
                          str(keys / "server" / f"{server}.key"))


@pytest.fixture
def secure(keys: Path, make_service: Any, sim_config: Any) -> Any:
    from actors.security import read_public

    sim_config.curve = {**_sim_keys(keys),  # plaintext toward the gateways, CURVE for events
                        "service_key": read_public(keys / "server" / "server.key")}
    thread = SimThread(sim_config)
    svc = make_service(curve_server_key=str(keys / "server" / "server.key_secret"),
                       curve_clients=str(keys / "clients"))
    yield svc
    thread.stop()


def _sim_keys(keys: Path) -> dict[str, Any]:
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(keys / "own" / "domains.key_secret"))
    return {"public": public, "secret": secret}


def test_keys_generate_writes_pairs_with_private_secrets(tmp_path: Path) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "web", "store"]) == 0
    for name in ("web", "store"):
        assert (tmp_path / f"{name}.key").exists()
        assert oct(os.stat(tmp_path / f"{name}.key_secret").st_mode & 0o777) == "0o600"


def test_allowed_channel_works_on_its_own_orders_only(secure: Any, eps: Any,
                                                      keys: Path) -> None:
    with Client(eps.intake, curve=opts(keys, "web")) as web, \
            Client(eps.intake, curve=opts(keys, "store")) as store:
        mine = web.submit(retail_order("sec-1"))
        assert mine["type"] == "accepted", mine
        other = web.submit(retail_order("sec-2", source_system="store"))
        assert (other["type"], other["code"]) == ("error", "unauthorized")
        theirs = store.submit(retail_order("sec-3", source_system="store"))["order_id"]
        assert web.get(theirs)["code"] == "unauthorized"
        assert web.cancel(theirs)["code"] == "unauthorized"
        assert web.request({"type": "list_orders", "source_system": "store"})["code"] == (
            "unauthorized")
        listed = web.request({"type": "list_orders"})["orders"]
        assert {o["source_system"] for o in listed} == {"web"}
        assert web.request({"type": "order_counts"})["code"] == "unauthorized"
        wait_terminal(web, [mine["order_id"]], timeout=20)  # domain events got in too
    with Client(eps.intake, curve=opts(keys, "operator-ann")) as operator:
        assert operator.get(theirs)["type"] == "order"
        assert operator.request({"type": "order_counts"})["type"] == "order_counts"


@pytest.mark.parametrize("who", ["intruder", "plaintext", "wrong-server-key"])
def test_refused_clients_fail_at_the_handshake(secure: Any, eps: Any, keys: Path,
                                               who: str) -> None:
    before = secure.metrics.requests.collect()[0].samples
    if who == "intruder":
        curve = opts(keys, "intruder")
    elif who == "plaintext":
        curve = {}
    else:
        generate(keys / "fake", ["server"])
        curve = client_options(str(keys / "own" / "web.key_secret"),
                               str(keys / "fake" / "server.key"))
    with Client(eps.intake, curve=curve, timeout=1.0) as client, pytest.raises(TimeoutError):
        client.submit(retail_order("nope"))
    assert secure.metrics.requests.collect()[0].samples == before


def test_subscribers_get_only_their_own_events(secure: Any, eps: Any, keys: Path) -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for name, value in opts(keys, "web").items():
        sub.setsockopt(getattr(zmq, name), value)
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # asks for everything
    sub.setsockopt(zmq.SUBSCRIBE, b"store")  # and for another channel's
    sub.connect(eps.events)
    with Client(eps.intake, curve=opts(keys, "store")) as store, \
            Client(eps.intake, curve=opts(keys, "web")) as web:
        def web_event_seen() -> bool:
            web.submit(retail_order(f"ev-{os.urandom(4).hex()}"))
            return sub.poll(200) != 0
        store.submit(retail_order("ev-store", source_system="store"))
        poll_until(web_event_seen, timeout=20)
        topics = set()
        while sub.poll(300):
            topics.add(sub.recv_multipart()[0])
    sub.close()
    assert topics == {b"web\x00"}


def test_refuses_to_start_unsafely(keys: Path, make_service: Any, tmp_path: Path) -> None:
    secret = keys / "server" / "server.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(SecurityError, match="readable by others"):
        make_service(curve_server_key=str(secret), curve_clients=str(keys / "clients"))
    os.chmod(secret, 0o600)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SecurityError, match="no client keys"):
        make_service(curve_server_key=str(secret), curve_clients=str(empty))
    with pytest.raises(SecurityError, match="needs both"):
        make_service(curve_server_key=str(secret))


@pytest.mark.slow
def test_sighup_reloads_client_keys(keys: Path, procs: Any, tmp_path: Path) -> None:
    eps = Endpoints()
    svc = procs(eps.serve_args(tmp_path / "data") + [
        "--curve-server-key", str(keys / "server" / "server.key_secret"),
        "--curve-clients", str(keys / "clients")], "serve")
    with Client(eps.intake, curve=opts(keys, "web")) as web:
        web.wait_ready(30)
    with Client(eps.intake, curve=opts(keys, "intruder"), timeout=1) as late:
        with pytest.raises(TimeoutError):
            late.request({"type": "get_order", "order_id": "x"})
    (keys / "clients" / "intruder.key").write_text((keys / "own" / "intruder.key").read_text())
    svc.p.send_signal(signal.SIGHUP)
    reply = poll_until(lambda: _try(eps.intake, opts(keys, "intruder")), timeout=20, every=0.1)
    assert reply["code"] == "not_found"


def _try(intake: str, curve: dict[str, Any]) -> dict[str, Any] | None:
    """A fresh connection (one refused at the handshake is not retried)."""
    with Client(intake, curve=curve, timeout=0.5) as client:
        try:
            return client.request({"type": "get_order", "order_id": "x"})
        except TimeoutError:
            return None


def test_domain_events_need_the_matching_key(secure: Any, eps: Any, keys: Path) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts(keys, "web").items():  # a channel's key, not a domain system's
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(eps.domain_events)
    sock.send(codec.pack({"type": "event", "event_id": "e1", "system": "shipping",
                          "order_id": "O1", "name": "shipment_delivered", "data": {}}))
    assert sock.poll(5000)
    assert codec.decode_map(sock.recv())["code"] == "unauthorized"
    sock.close()


@pytest.mark.slow
def test_curve_toward_the_domain_systems(keys: Path, procs: Any, tmp_path: Path) -> None:
    """Gateways connect to the simulators over CURVE, and the simulators push
    events back over CURVE, each side allowing only the other's key."""
    service_allowed = tmp_path / "service-allowed"
    service_allowed.mkdir()
    (service_allowed / "server.key").write_text((keys / "server" / "server.key").read_text())
    eps = Endpoints()
    procs(eps.simulate_args() + [
        "--curve-key", str(keys / "own" / "domains.key_secret"),
        "--curve-clients", str(service_allowed),
        "--service-key", str(keys / "server" / "server.key"), "--delivery-s", "0.05"],
        "simulate")
    procs(eps.serve_args(tmp_path / "data") + [
        "--curve-server-key", str(keys / "server" / "server.key_secret"),
        "--curve-clients", str(keys / "clients"),
        "--domain-server-key", str(keys / "own" / "domains.key")], "serve")
    with Client(eps.intake, curve=opts(keys, "web"), timeout=20) as web:
        web.wait_ready(30)
        oid = web.submit(retail_order("domain-curve"))["order_id"]
        assert wait_terminal(web, [oid], timeout=30)[oid]["state"] == "completed"
