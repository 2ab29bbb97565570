"""Fixtures: real sockets on 127.0.0.1 (random ports), real LMDB in tmp
folders, the real simulators. No mocks of our own components."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent))

import bench.harness
import bench.ports
from app.service import Service
from bench.ports import free_endpoint, free_port  # noqa: F401 - tests import free_port from here
from gateways.client import Client
from gateways.sim_domain import SimConfig
from gateways.simulator import Simulator
from oms import codec
from oms.config import Config

SYSTEMS = ("warehouse", "billing", "shipping", "crm", "provisioning")


def _ports_of_this_worker() -> None:
    """Under pytest-xdist (``-n 2``, set in pyproject.toml) each worker takes
    its own slice of the port range (``OMS_TEST_PORTS``, or the default), so
    the two never hand out the same port; the services, simulators and
    benches a test starts inherit the slice through the environment."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get(
        "PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit() or int(count) < 2:
        return
    size = (bench.ports.HIGH - bench.ports.LOW + 1) // int(count)
    low = bench.ports.LOW + int(worker[2:]) * size
    bench.ports.LOW, bench.ports.HIGH = low, low + size - 1
    bench.ports._sweep = bench.ports._Sweep(random.Random().randint(low, low + size - 1))
    os.environ[bench.ports.ENV] = f"{low}-{low + size - 1}"


_ports_of_this_worker()


endpoint = free_endpoint


@pytest.fixture(autouse=True)
def _root_log_handlers() -> Iterator[None]:
    """A test that runs a command in-process (``main([...])``) installs the
    service's log handler on pytest's captured stderr; put the root logger
    back afterwards, or later tests' services log into a closed stream
    ("Logging error ... I/O operation on closed file" in a full run)."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Endpoints:
    """A fresh set of loopback endpoints for one service and its simulators."""

    def __init__(self) -> None:
        self.intake, self.events, self.domain_events = endpoint(), endpoint(), endpoint()
        self.systems = {s: endpoint() for s in SYSTEMS}

    def serve_args(self, data: Path) -> list[str]:
        args = ["serve", "--data", str(data), "--intake", self.intake, "--events", self.events,
                "--domain-events", self.domain_events, "--metrics-port", "0"]
        for name, ep in self.systems.items():
            args += ["--system", f"{name}={ep}"]
        return args

    def simulate_args(self) -> list[str]:
        args = ["simulate", "--service-events", self.domain_events]
        for name, ep in self.systems.items():
            args += ["--system", f"{name}={ep}"]
        return args


class SimThread:
    """The real simulators, run in a thread of the test process."""

    def __init__(self, cfg: SimConfig) -> None:
        self.sim = Simulator(cfg, zmq.Context())
        self.thread = threading.Thread(target=self.sim.run, name="simulator", daemon=True)
        self.thread.start()
        self.cfg = cfg

    def report(self, system: str = "warehouse", **req: Any) -> dict[str, Any]:
        return sim_report(self.cfg.systems[system], **req)

    def stop(self) -> None:
        self.sim.stop()
        self.thread.join(5)
        self.sim.ctx.destroy(linger=0)  # never blocks, unlike term()


def sim_report(ep: str, **req: Any) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    try:
        sock.send(codec.pack({"type": "report", **req}))
        assert sock.poll(5000), "simulator did not answer its report"
        return codec.decode_map(sock.recv())
    finally:
        sock.close()


@pytest.fixture
def domain() -> Iterator[Any]:
    """A domain system that answers only what a test tells it to
    (``test_edges.HostileDomain``), closed after the test."""
    from test_edges import HostileDomain

    d = HostileDomain()
    yield d
    d.close()


@pytest.fixture
def eps() -> Endpoints:
    return Endpoints()


@pytest.fixture
def sim_config(eps: Endpoints) -> SimConfig:
    return SimConfig(systems=dict(eps.systems), service_events=eps.domain_events,
                     delivery_s=0.05, restock_s=0.1, seed=1, event_resend_s=0.2)


@pytest.fixture
def sim(sim_config: SimConfig) -> Iterator[SimThread]:
    thread = SimThread(sim_config)
    yield thread
    thread.stop()


@pytest.fixture
def make_service(eps: Endpoints, tmp_path: Path) -> Iterator[Any]:
    started: list[Service] = []

    def make(**over: Any) -> Service:
        cfg = Config(data=str(tmp_path / "data"), intake=eps.intake, events=eps.events,
                     domain_events=eps.domain_events, metrics_port=0,
                     systems=dict(eps.systems))
        for key, value in over.items():
            setattr(cfg, key, value)
        svc = Service(cfg)
        svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def service(make_service: Any, sim: SimThread) -> Service:
    return make_service()


@pytest.fixture
def client(eps: Endpoints) -> Iterator[Client]:
    with Client(eps.intake, zmq.Context.instance(), timeout=10) as c:
        yield c


class Proc(bench.harness.Proc):
    """An ``oms`` subprocess with its log in a file (the bench's, plus what
    crash tests need: a stop that must succeed, and kill -9)."""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; the test fails if it does not exit in time."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(timeout)
        self._out.close()
        return code

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self._out.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Any]:
    started: list[Proc] = []

    def start(args: list[str], name: str) -> Proc:
        proc = Proc(args, tmp_path / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


class CommandSink:
    """A domain system's ROUTER that reads the frames a gateway sends it."""

    def __init__(self) -> None:
        self.endpoint = endpoint()
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)

    def received(self) -> tuple[bytes, bytes]:
        """The next command: its sender's identity and its frame."""
        assert self.sock.poll(5000), "the gateway sent no command"
        peer, frame = self.sock.recv_multipart()
        return peer, bytes(frame)

    def frame(self) -> bytes:
        return self.received()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wired() -> Iterator[tuple[Any, CommandSink]]:
    """A real ``Gateway`` wired to a ``CommandSink``."""
    from prometheus_client import CollectorRegistry

    from actors.metrics import Metrics
    from gateways.breaker import Breaker
    from gateways.gateway import Gateway

    sink = CommandSink()
    gw = Gateway.launch(zmq.Context.instance(), "billing", sink.endpoint,
                        lambda order_id, res: None, Metrics(CollectorRegistry()),
                        breaker=Breaker(threshold=1000))
    yield gw, sink
    gw.actor_ref.stop(block=True, timeout=5)
    gw.join(5)
    sink.close()
