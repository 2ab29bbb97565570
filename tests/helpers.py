"""Test helpers: sample orders and a tiny synchronous driver for the pure engine."""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from oms.engine import Engine, new_order
from oms.messages import CommandResult, DomainEvent, Send, Sequence, Start, Turn
from oms.model import Order
from oms.process import ProcessDef


def retail_order(ext: str = "ext-1", **over: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "source_system": "web",
        "external_id": ext,
        "customer": {"id": "c-1", "name": "Ada"},
        "customer_address": {"line1": "1 Main St", "city": "Berlin",
                             "postal_code": "10115", "country": "DE"},
        "items": [
            {"id": "i1", "product_id": "p-1", "quantity": 2, "unit_price_minor": 1000},
            {"id": "i2", "product_id": "p-2", "quantity": 1, "unit_price_minor": 550},
        ],
    }
    order.update(over)
    return order


def normalized(raw: dict[str, Any], types: tuple[str, ...] = ("retail", "telecom")) -> dict:
    from oms.validation import validate_order

    order, errors = validate_order(raw, types)
    assert not errors, errors
    assert order is not None
    return order


def thawed(order: Order) -> Order:
    """A copy of ``order`` with its steps' and notes' arguments as maps: in
    memory a launched step keeps them encoded (``oms.model.kept``), a
    decoded record has maps; compare orders with ``thawed(a) == b``."""
    import msgspec

    def thaw(step: Any) -> Any:
        return msgspec.structs.replace(step, args=step.arguments())

    return msgspec.structs.replace(order, steps={k: thaw(s) for k, s in order.steps.items()},
                                   notes=[thaw(n) for n in order.notes])


def debian_tools(tools: tuple[str, ...], packages: tuple[str, ...]) -> dict[str, str | None]:
    """The path of each of ``tools`` (None if missing), after installing
    Debian's ``packages`` if one is missing and this runs as root with
    apt-get (as CI does). The suite's two pytest-xdist workers may both get
    here at once (``test_console``'s chromium, ``test_observability``'s and
    ``test_retention``'s prometheus): apt-get fails at once while another
    holds dpkg's lock, and its test would be skipped, so installs take
    turns on one lock file, and each looks again once it has the lock."""
    import fcntl
    import os
    import shutil
    import subprocess
    import tempfile

    found = {tool: shutil.which(tool) for tool in tools}
    if all(found.values()) or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    with (Path(tempfile.gettempdir()) / "oms-tests-apt.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released as the file closes)
        found = {tool: shutil.which(tool) for tool in tools}  # the other worker's install
        if not all(found.values()):
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            wait = ["-o", "DPkg::Lock::Timeout=300"]  # (dpkg's lock, if another apt holds it)
            subprocess.run(["apt-get", *wait, "update", "-q"], env=env, check=False,
                           capture_output=True, timeout=600)
            subprocess.run(["apt-get", *wait, "install", "-y", "-q",
                            "--no-install-recommends", *packages], env=env, check=False,
                           capture_output=True, timeout=900)
            found = {tool: shutil.which(tool) for tool in tools}
    return found


Domain = Callable[[Send], CommandResult | None]


class Driver:
    """Feeds an order's effects back into it, as the actors would."""

    def __init__(self, proc: ProcessDef, raw: dict[str, Any], domain: Domain) -> None:
        self.engine = Engine(proc)
        self.order: Order = new_order("o-1", normalized(raw), proc, now=1000.0)
        self.domain = domain
        self.now = 1000.0
        self.sent: list[Send] = []
        self.effects: list[Any] = []
        self.timers: list[Any] = []

    def feed(self, msg: Any) -> None:
        queue = [msg]
        while queue:
            turning = self.engine.handle(self.order, queue.pop(0), self.now)
            self.now += 0.001
            for fx in turning.effects:
                self.effects.append(fx)
                if isinstance(fx, Send):
                    self.sent.append(fx)
                    res = self.domain(fx)
                    if res is not None:
                        queue.append(res)
                elif isinstance(fx, Sequence) and fx.enter:
                    queue.append(Turn(go=True))
                elif type(fx).__name__ == "Timer":
                    self.timers.append(fx)

    def fire_timers(self) -> None:
        from oms.messages import TimerFired

        while self.timers:
            t = self.timers.pop(0)
            self.now = max(self.now, t.at)
            self.feed(TimerFired(t.token))

    def start(self) -> None:
        self.feed(Start())
        if self.order.seq_key and not self.order.turn:
            self.feed(Turn(go=True))

    def event(self, name: str, data: dict[str, Any], system: str = "shipping") -> None:
        self.feed(DomainEvent(f"ev-{len(self.effects)}", system, name, data))

    def ops(self) -> list[str]:
        return [s.op for s in self.sent]


def ok_domain(overrides: dict[str, CommandResult | None] | None = None) -> Domain:
    """Every op succeeds with plausible data; ``overrides`` by op replace that."""
    counter = iter(range(1, 10**9))

    def reply(cmd: Send) -> CommandResult | None:
        if overrides and cmd.op in overrides:
            res = overrides[cmd.op]
            return None if res is None else res._replace(command_id=cmd.command_id)
        data: dict[str, Any] = {
            "reserve_stock": {"reservation_id": f"r{next(counter)}", "status": "reserved"},
            "create_invoice": {"invoice_id": f"inv{next(counter)}"},
            "capture_payment": {"payment_id": f"pay{next(counter)}"},
            "create_shipment": {"shipment_id": f"s{next(counter)}", "tracking_number": "T1"},
            "activate_service": {"service_id": f"svc{next(counter)}"},
            "modify_service": {"previous_attributes": {"speed": "old"}},
            "deactivate_service": {"product_id": "p-old", "attributes": {}},
        }.get(cmd.op, {})
        return CommandResult(cmd.command_id, True, data)

    return reply


def poll_until(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.01) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


class Probe:
    """Something an effect tells (``actors.effects.Tell``), as an actor ref is."""

    def __init__(self, on_tell: Any) -> None:
        self.on_tell = on_tell

    def tell(self, message: Any) -> None:
        self.on_tell(message)


class CurveKeys(NamedTuple):
    """Keys made by ``curve_keys``: the folder, the allowed clients' folder."""

    folder: Path
    allowed: Path

    def opts(self, name: str) -> dict[str, Any]:
        """A client's CURVE options for the key pair of ``name``."""
        from actors.security import client_options

        return client_options(str(self.folder / "own" / f"{name}.key_secret"),
                              str(self.folder / "server" / "server.key"))


def curve_keys(folder: Path, names: list[str]) -> CurveKeys:
    """A server key pair and one per name, each name an allowed client."""
    from actors.security import generate

    generate(folder / "server", ["server"])
    generate(folder / "own", names)
    allowed = folder / "clients"
    allowed.mkdir()
    for name in names:
        (allowed / f"{name}.key").write_text((folder / "own" / f"{name}.key").read_text())
    return CurveKeys(folder, allowed)


def failing_deliverer(bad: str = "BAD") -> tuple[queue.Queue[Any], Callable[[str, Any], None]]:
    """A gateway's ``deliver`` that raises for order ``bad`` and queues the
    others' (order id, result), as a broken order's delivery would."""
    delivered: queue.Queue[Any] = queue.Queue()

    def deliver(order_id: str, res: Any) -> None:
        if order_id == bad:
            raise RuntimeError("this order's delivery fails")
        delivered.put((order_id, res))

    return delivered, deliver
