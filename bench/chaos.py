"""The fault soak's faults (``oms bench --scenario soak --faults``, see
``bench.faults``): the harness with the simulators split in three processes,
the schedule that kills the service and breaks one domain system at a time
(``Chaos``), and the simulators' runtime control and report requests.
"""

from __future__ import annotations

import heapq
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from bench.harness import Harness, Proc, ProcessDied
from oms import codec

GROUPS = {"main": ("warehouse", "billing", "shipping"), "provisioning": ("provisioning",),
          "crm": ("crm",)}
DROPS = ["--drop", "reserve_stock=0.02", "--drop", "capture_payment=0.02",
         "--drop", "create_shipment=0.02", "--drop", "activate_service=0.02",
         "--drop", "create_invoice=0.01"]
SIM_ARGS = ["--delivery-s", "0.2", "--restock-s", "0.5", "--scarce", "200", *DROPS]


class FaultHarness(Harness):
    """The bench harness with the simulators split in three processes and
    a service that may be down on purpose (killed and not yet restarted)."""

    def __init__(self, workdir: Path, serve_args: list[str]) -> None:
        # info: each order's state changes and each recovery's counts are in
        # the log a failed run keeps (about 1 KB per order)
        super().__init__(workdir, SIM_ARGS, [*serve_args, "--log-level", "info"])
        self.sims: dict[str, Proc] = {}
        self.down: set[int] = set()  # pids killed on purpose
        self.killed_cpu = {"service": 0.0, "simulators": 0.0}  # CPU s of killed processes
        self.lock = threading.Lock()

    def start_simulators(self) -> None:
        for group in GROUPS:
            self.start_group(group)
        self.sim = self.sims["main"]

    def start_group(self, group: str) -> None:
        args = ["simulate", "--service-events", self.eps.domain_events, "--log-level",
                "warning", *self.eps.system_args(), *self.sim_args]
        for name in GROUPS[group]:
            args += ["--only", name]
        self.sims[group] = Proc(args, self.workdir / f"simulate-{group}.log")

    def procs(self) -> list[Proc]:
        with self.lock:
            return [p for p in (*self.sims.values(), self.svc)
                    if p is not None and p.pid not in self.down]

    def kill(self, proc: Proc) -> None:
        """SIGKILL on purpose: ``check_alive`` does not count it as a death."""
        cpu = proc.cpu_s()
        with self.lock:
            self.down.add(proc.pid)
        proc.p.kill()
        self.killed_cpu["service" if proc is self.svc else "simulators"] += cpu
        proc.p.wait()
        proc._out.close()

    def sim_cpu_s(self) -> float:
        """CPU seconds of the simulators, those killed on purpose included."""
        return self.killed_cpu["simulators"] + sum(
            p.cpu_s() for p in self.sims.values() if p.pid not in self.down)

    def svc_cpu_s(self) -> float:
        """CPU seconds of every service process of the run."""
        assert self.svc is not None
        live = self.svc.cpu_s() if self.svc.pid not in self.down else 0.0
        return self.killed_cpu["service"] + live

    def stop(self) -> dict[str, Any]:
        out = {}
        if self.svc is not None and self.svc.pid not in self.down:
            out["service_exit"] = self.svc.stop()
        for group, proc in self.sims.items():
            if proc.pid not in self.down:
                out[f"simulator_{group}_exit"] = proc.stop()
        return out


@dataclass
class Fault:
    """One fault done: what, when (seconds into the run), for how long."""

    kind: str
    at: float
    seconds: float = 0.0


class Chaos(threading.Thread):
    """Carries out the fault schedule until ``stop()``; then leaves every
    process running (a fault in progress is ended at once)."""

    def __init__(self, harness: FaultHarness, kill_every: float, outage_every: float,
                 outage_s: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.h = harness
        self.outage_s = outage_s
        self.stopped = threading.Event()
        self.started = time.monotonic()
        self.faults: list[Fault] = []
        self.restart_s: list[float] = []
        self.error: str | None = None
        self.queue: list[tuple[float, int, str]] = []
        self.seq = 0
        if kill_every > 0:
            self.at(kill_every, "kill_service")
        if outage_every > 0:
            self.at(outage_every, "freeze_provisioning")
        self.every = {"kill_service": kill_every, "freeze_provisioning": outage_every,
                      "restart_crm": outage_every, "billing_unavailable": outage_every}
        self.next_domain = {"freeze_provisioning": "restart_crm",
                            "restart_crm": "billing_unavailable",
                            "billing_unavailable": "freeze_provisioning"}

    def at(self, delay: float, action: str) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (time.monotonic() + delay, self.seq, action))

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def run(self) -> None:
        try:
            while self.queue:
                due, _n, action = self.queue[0]
                if self.stopped.wait(max(0.0, due - time.monotonic())):
                    break
                heapq.heappop(self.queue)
                getattr(self, action)()
            self.end_faults()
        except Exception as exc:  # noqa: BLE001 - the run reports it; never dies silently
            self.error = f"the fault injector failed: {exc!r}"

    def now(self) -> float:
        return time.monotonic() - self.started

    def kill_service(self) -> None:
        assert self.h.svc is not None
        self.h.kill(self.h.svc)
        self.h.start_service()
        t0 = time.monotonic()
        self.h.wait_ready(timeout=300)
        self.restart_s.append(time.monotonic() - t0)
        self.faults.append(Fault("kill -9 service", self.now(), self.restart_s[-1]))
        self.at(self.every["kill_service"], "kill_service")

    def domain_fault(self, action: str) -> None:
        self.faults.append(Fault(action.replace("_", " "), self.now(), self.outage_s))
        self.at(self.outage_s, "end_" + action)
        self.at(self.every[action], self.next_domain[action])

    def freeze_provisioning(self) -> None:
        self.h.sims["provisioning"].p.send_signal(signal.SIGSTOP)
        self.domain_fault("freeze_provisioning")

    def end_freeze_provisioning(self) -> None:
        self.h.sims["provisioning"].p.send_signal(signal.SIGCONT)

    def restart_crm(self) -> None:
        self.h.kill(self.h.sims["crm"])
        self.domain_fault("restart_crm")

    def end_restart_crm(self) -> None:
        if self.h.sims["crm"].pid in self.h.down:
            self.h.start_group("crm")

    def billing_unavailable(self) -> None:
        control(self.h.eps.systems["billing"], {"create_invoice": [0.5, "unavailable"],
                                                "capture_payment": [0.5, "unavailable"]})
        self.domain_fault("billing_unavailable")

    def end_billing_unavailable(self) -> None:
        control(self.h.eps.systems["billing"], {"create_invoice": [0], "capture_payment": [0]})

    def end_faults(self) -> None:
        """The run's faults are over: every system answers again."""
        for _due, _n, action in self.queue:
            if action.startswith("end_"):
                getattr(self, action)()
        self.queue.clear()


def control(endpoint: str, fail: dict[str, list[Any]]) -> None:
    """The simulators' runtime failure control (gateways/simulator.py)."""
    ask_simulator(endpoint, {"type": "control", "fail": fail}, 5.0)


def sim_report(endpoint: str) -> dict[str, Any]:
    return ask_simulator(endpoint, {"type": "report", "all": True, "per_order": True}, 30.0)


def ask_simulator(endpoint: str, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(codec.pack(msg))
        if not sock.poll(timeout_s * 1000):
            raise ProcessDied(f"the simulator at {endpoint} did not answer its {msg['type']} "
                              f"within {timeout_s:g} s")
        return codec.decode_map(sock.recv())
    finally:
        sock.close()
