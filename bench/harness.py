"""Start the simulators and the service as processes for a bench run, on
free loopback ports, and read the service's CPU time, RSS and threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.ports import free_endpoint, free_port

SYSTEMS = ("warehouse", "billing", "shipping", "crm", "provisioning")

WAIT_PROCESS = """
[process]
order_type = "intake"
description = "Bench only: the order is acknowledged, started, and waits"
[steps.wait]
wait_event = { name = "never", system = "warehouse" }
"""


class ProcessDied(RuntimeError):
    """A simulator or the service ended while the bench needed it."""


class Endpoints:
    def __init__(self) -> None:
        self.intake, self.events, self.domain_events = (free_endpoint() for _ in range(3))
        self.systems = {s: free_endpoint() for s in SYSTEMS}

    def system_args(self) -> list[str]:
        """``--system NAME=ENDPOINT`` for each domain system."""
        return [arg for name, ep in self.systems.items() for arg in ("--system", f"{name}={ep}")]


class Proc:
    def __init__(self, args: list[str], log: Path, module: str = "app.cli",
                 env: dict[str, str] | None = None) -> None:
        self.name = args[0] if module == "app.cli" else module
        self.log = log
        self._out = log.open("ab")
        self.p = subprocess.Popen([sys.executable, "-m", module, *args],
                                  stdout=self._out, stderr=self._out,
                                  env={**os.environ, **env} if env else None)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()
        finally:
            self._out.close()

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.p.poll()

    def tail(self, lines: int = 15) -> str:
        """The end of its log, for a report that something went wrong."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        return 0

    def rss_mb(self) -> float:
        return self._status("VmRSS:") / 1024

    def peak_rss_mb(self) -> float:
        return self._status("VmHWM:") / 1024

    def threads(self) -> int:
        return self._status("Threads:")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Harness:
    """Simulators + service for one bench run; everything under ``workdir``."""

    def __init__(self, workdir: Path, sim_args: list[str], serve_args: list[str],
                 curve: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.eps = Endpoints()
        self.sim_args, self.serve_args = sim_args, serve_args
        self.client_curve: dict[str, Any] = {}
        self.sim_events_curve: list[str] = []
        self.sim: Proc | None = None
        self.svc: Proc | None = None
        if curve:
            self._make_keys()

    def _make_keys(self) -> None:
        """CURVE for channels: the load generator is channel "bench"."""
        from actors.security import client_options, generate

        keys = self.workdir / "keys"
        generate(keys / "server", ["server"])
        generate(keys / "own", ["bench", "domains"])
        allowed = keys / "allowed"
        allowed.mkdir()
        for name in ("bench", "domains"):
            (allowed / f"{name}.key").write_text((keys / "own" / f"{name}.key").read_text())
        self.serve_args = [*self.serve_args, "--curve-server-key",
                           str(keys / "server" / "server.key_secret"), "--curve-clients",
                           str(allowed)]
        self.client_curve = client_options(str(keys / "own" / "bench.key_secret"),
                                           str(keys / "server" / "server.key"))
        self.sim_events_curve = ["--curve-key", str(keys / "own" / "domains.key_secret"),
                                 "--service-key", str(keys / "server" / "server.key")]

    def start_simulators(self) -> None:
        args = ["simulate", "--service-events", self.eps.domain_events, "--log-level",
                "warning"]
        args += self.eps.system_args()
        args += self.sim_events_curve
        self.sim = Proc(args + self.sim_args, self.workdir / "simulate.log")

    def start_baseline(self) -> None:
        """The no-actor baseline (``bench.baseline``) on the service's endpoints."""
        args = ["--data", str(self.workdir / "base"), "--intake", self.eps.intake,
                "--events", self.eps.events, "--domain-events", self.eps.domain_events]
        args += self.eps.system_args()
        self.svc = Proc(args, self.workdir / "baseline.log", module="bench.baseline")

    def start_service(self) -> None:
        procs = self.workdir / "processes"
        procs.mkdir(exist_ok=True)
        (procs / "intake.toml").write_text(WAIT_PROCESS)
        self.metrics_port = free_port()  # scraped for the loop-turn histogram only
        args = ["serve", "--data", str(self.workdir / "data"), "--intake", self.eps.intake,
                "--events", self.eps.events, "--domain-events", self.eps.domain_events,
                "--metrics-port", str(self.metrics_port), "--processes", str(procs),
                "--log-level", "warning"]
        args += self.eps.system_args()
        # the baseline's PUB is unbounded; the service's per-subscriber queue is
        # 1,000 by default, which one turn's burst of a closed loop of 1,024
        # orders overflows (13 events per order): lift it, as the baseline's
        env = {"OMS_EVENTS_HWM": os.environ.get("OMS_EVENTS_HWM", "100000")}
        self.svc = Proc(args + self.serve_args, self.workdir / "serve.log", env=env)

    def procs(self) -> list[Proc]:
        return [p for p in (self.sim, self.svc) if p is not None]

    def check_alive(self) -> None:
        """Raise ``ProcessDied`` (with the end of its log) if a process of
        the run has ended: the run cannot finish without it."""
        for proc in self.procs():
            code = proc.exited()
            if code is not None:
                raise ProcessDied(f"{proc.name} exited with code {code} during the run; "
                                  f"the end of its log:\n{proc.tail()}")

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds until the intake answers (recovering many orders takes a while)."""
        from gateways.client import Client

        started = time.monotonic()
        with Client(self.eps.intake, curve=self.client_curve) as client:
            while True:
                self.check_alive()
                try:
                    client.wait_ready(1.0)
                    break
                except TimeoutError:
                    if time.monotonic() - started > timeout:
                        raise
        self.check_alive()  # the simulators too: they start before the service
        return time.monotonic() - started

    def stop(self) -> dict[str, Any]:
        out = {}
        if self.svc is not None:
            out["service_exit"] = self.svc.stop()
        if self.sim is not None:
            out["simulator_exit"] = self.sim.stop()
        return out


def loop_turns(port: int | None) -> dict[float, float] | None:
    """The service's ``oms_loop_turn_seconds`` buckets (upper bound -> count),
    or None if it cannot be read."""
    if not port:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("oms_loop_turn_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets or None


def turn_quantiles(before: dict[float, float] | None,
                   after: dict[float, float] | None) -> dict[str, float] | None:
    """p50/p99 of the loop turns between two scrapes (bucket upper bounds)."""
    if not after:
        return None
    before = before or {}
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    total = counts[-1][1]
    if total <= 0:
        return None
    out: dict[str, float] = {"turns": total}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        out[name] = next(le for le, n in counts if n >= q * total)
    return out
