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

from actors.security import SecurityError, client_options, generate, is_operator_name
from app.cli import main
from gateways.client import Client, wait_terminal
from oms import codec


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate(folder / "server", ["server"])
    generate(folder / "own", ["web", "store", "operator-ann", "domains", "intruder",
                              "warehouse", "operator", "operatorbank"])
    allowed = folder / "clients"
    allowed.mkdir()
    for name in ("web", "store", "operator-ann", "domains", "warehouse", "operator",
                 "operatorbank"):
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


def test_keys_generate_names_a_near_miss_operator_name(tmp_path: Path, capsys: Any) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path), "operators-portal", "Operator",
                 "operator-ann", "operator"]) == 0
    err = capsys.readouterr().err
    assert "'operators-portal' is not an operator identity" in err
    assert "'Operator' is not an operator identity" in err
    assert "'operator-ann'" not in err and "'operator' is not" not in err
    assert (tmp_path / "operators-portal.key").exists()  # still written: it is a valid channel


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


def test_a_channel_cannot_name_an_operator_in_its_cancel(secure: Any, eps: Any,
                                                        keys: Path) -> None:
    """With CURVE on, only an operator identity may record an operator in an
    order's history; a channel's cancel that names one is refused."""
    with Client(eps.intake, curve=opts(keys, "web")) as web, \
            Client(eps.intake, curve=opts(keys, "operator-ann")) as operator:
        order_id = web.submit(retail_order("sec-op-1"))["order_id"]
        forged = web.request({"type": "cancel_order", "order_id": order_id,
                              "operator": "operator-bob"})
        assert (forged["type"], forged["code"]) == ("error", "unauthorized"), forged
        assert "operator" not in str(web.get(order_id)["order"]["history"])
        done = operator.request({"type": "cancel_order", "order_id": order_id,
                                 "operator": "ann"})
        assert done["type"] in ("cancel_accepted", "cancel_rejected"), done
        if done["type"] == "cancel_accepted":
            history = operator.get(order_id)["order"]["history"]
            assert any(h.get("operator") == "ann" for h in history), history


@pytest.mark.parametrize("name,operator", [
    ("operator", True), ("operator-ann", True), ("operator-console", True),
    ("operator-a-b", True), ("operatorbank", False), ("operators-portal", False),
    ("operator-", False), ("operator_ann", False), ("Operator", False),
    ("OPERATOR-ann", False), (" operator", False), ("operator ", False), ("", False),
    ("web", False), ("xoperator-ann", False), (None, False), (b"operator", False)])
def test_operator_names_are_exact(name: Any, operator: bool) -> None:
    assert is_operator_name(name) is operator


def test_a_key_named_like_an_operator_is_a_channel(secure: Any, eps: Any,
                                                   keys: Path) -> None:
    """``operatorbank`` only starts with ``operator``: it was taken for an
    operator (every order, the operator requests, every event); it is the
    channel ``operatorbank``. The key named exactly ``operator`` is one."""
    with Client(eps.intake, curve=opts(keys, "operatorbank")) as bank, \
            Client(eps.intake, curve=opts(keys, "web")) as web, \
            Client(eps.intake, curve=opts(keys, "operator")) as operator:
        own = bank.submit(retail_order("bank-1", source_system="operatorbank"))
        assert own["type"] == "accepted", own
        theirs = web.submit(retail_order("bank-2"))["order_id"]
        other = bank.submit(retail_order("bank-3"))  # source_system web
        assert (other["type"], other["code"]) == ("error", "unauthorized")
        for req in ({"type": "get_order", "order_id": theirs},
                    {"type": "cancel_order", "order_id": theirs},
                    {"type": "retry_step", "order_id": theirs},
                    {"type": "abort_order", "order_id": theirs},
                    {"type": "order_counts"},
                    {"type": "list_orders", "source_system": "web"}):
            assert bank.request(req)["code"] == "unauthorized", req
        listed = bank.request({"type": "list_orders"})["orders"]
        assert {o["source_system"] for o in listed} == {"operatorbank"}
        assert bank.get(own["order_id"])["type"] == "order"
        assert operator.get(theirs)["type"] == "order"
        assert operator.request({"type": "order_counts"})["type"] == "order_counts"


def test_a_key_named_like_an_operator_gets_only_its_own_events(
        secure: Any, eps: Any, keys: Path) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for name, value in opts(keys, "operatorbank").items():
        sub.setsockopt(getattr(zmq, name), value)
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # asks for everything
    sub.connect(eps.events)
    topics = set()
    with Client(eps.intake, curve=opts(keys, "operatorbank")) as bank, \
            Client(eps.intake, curve=opts(keys, "web")) as web:
        def own_event_seen() -> bool:
            bank.submit(retail_order(f"bev-{os.urandom(4).hex()}",
                                     source_system="operatorbank"))
            return sub.poll(200) != 0
        poll_until(own_event_seen, timeout=20)  # its subscription is installed now
        wait_terminal(web, [web.submit(retail_order("bev-web"))["order_id"]], timeout=20)
        last = bank.submit(retail_order("bev-last", source_system="operatorbank"))
        wait_terminal(bank, [last["order_id"]], timeout=20)  # published after web's events
        while sub.poll(300):
            topics.add(sub.recv_multipart()[0])
    sub.close()
    assert topics == {b"operatorbank\x00"}


@pytest.mark.parametrize("who", ["warehouse", "domains"])
def test_a_domain_system_key_is_not_a_channel(secure: Any, eps: Any, keys: Path,
                                              who: str) -> None:
    """A domain system's key submitted orders under its own name through the
    intake as if it were a channel; it is refused every intake request."""
    with Client(eps.intake, curve=opts(keys, who)) as domain, \
            Client(eps.intake, curve=opts(keys, "web")) as web:
        refused = domain.submit(retail_order("dom-1", source_system=who))
        assert (refused["type"], refused["code"]) == ("error", "unauthorized"), refused
        assert "not a channel" in refused["message"]
        theirs = web.submit(retail_order("dom-2"))["order_id"]
        for req in ({"type": "get_order", "order_id": theirs},
                    {"type": "cancel_order", "order_id": theirs},
                    {"type": "list_orders"}, {"type": "list_orders", "source_system": who},
                    {"type": "no_such_request"}, {"type": 7}, {}):  # any request (§6)
            assert domain.request(req)["code"] == "unauthorized", req
        assert domain.send_raw(b"\xc1")["code"] == "malformed"  # not read: as anyone's
        assert web.get(theirs)["type"] == "order"  # the channel itself still works


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
    with (Client(eps.intake, curve=opts(keys, "intruder"), timeout=1) as late,
          pytest.raises(TimeoutError)):
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


def test_a_dead_authenticator_is_not_ready_and_exits_70(keys: Path, eps: Any,
                                                        tmp_path: Path) -> None:
    """The ZAP thread ending while the service runs (every new CURVE handshake
    would wait forever) is a dead component: exit 70 and /readyz not ready."""
    from app.service import Service
    from oms.config import Config

    exits: list[int] = []
    cfg = Config(data=str(tmp_path / "data"), intake=eps.intake, events=eps.events,
                 domain_events=eps.domain_events, metrics_port=0, systems=dict(eps.systems),
                 curve_server_key=str(keys / "server" / "server.key_secret"),
                 curve_clients=str(keys / "clients"))
    svc = Service(cfg, exit=exits.append)
    svc.start()
    try:
        assert svc.is_ready()
        svc.security.auth.pipe.send(b"TERMINATE")  # its loop ends, the service runs on
        assert poll_until(lambda: exits == [70], timeout=10), exits
        assert "authenticator" in svc.dead_components() and not svc.is_ready()
    finally:
        svc.stop()
    assert exits == [70]  # the stop's own TERMINATE is no death


def test_an_error_in_one_handshake_is_survived(secure: Any, eps: Any, keys: Path) -> None:
    """A ZAP request that raises is answered (the handshake fails, the client
    is not let in) and counted; the next handshake works."""
    class Broken(dict):  # a key table that fails on lookup, once
        def get(self, *args: Any) -> Any:
            raise RuntimeError("key table broken")

    auth = secure.security.auth
    names, auth.names = auth.names, Broken()
    with Client(eps.intake, curve=opts(keys, "web"), timeout=1.0) as web, \
            pytest.raises(TimeoutError):
        web.submit(retail_order("zap-1"))
    assert poll_until(lambda: secure.metrics.internal_errors.labels(
        "authenticator")._value.get() >= 1, timeout=5)
    auth.names = names
    with Client(eps.intake, curve=opts(keys, "web")) as web:
        assert web.submit(retail_order("zap-2"))["type"] == "accepted"
    assert secure.security.alive() and secure.is_ready()
