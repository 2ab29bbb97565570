"""Free loopback ports for the bench harness and the tests.

Ports come from *below* the kernel's ephemeral range: a port from bind(0)
is an ephemeral one, and any outgoing connection on the machine may take it
before the process we hand it to binds it.

A process never hands out the same port twice (two endpoints of one run must
not collide: a simulator that cannot bind its port leaves the run waiting
for replies that never come), and a port is handed out only after a bind on
it succeeded.

``OMS_TEST_PORTS=LOW-HIGH`` (e.g. ``20000-21999``) sets the range, so tests
and bench runs of several people on one machine can be kept apart.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

ENV = "OMS_TEST_PORTS"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_range(spec: str | None = None) -> tuple[int, int]:
    """(LOW, HIGH), HIGH included: from ``OMS_TEST_PORTS`` or the default
    15000 up to the kernel's ephemeral range. A bad value is an error that
    names the variable, never a silent fallback."""
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        return 15000, max(16000, _ephemeral_low()) - 1
    low_s, sep, high_s = spec.partition("-")
    try:
        low, high = int(low_s), int(high_s)
    except ValueError:
        low = high = -1
    if not sep or not 1024 <= low <= high <= 65535 or high - low < 15:
        raise ValueError(f"{ENV}={spec!r}: give LOW-HIGH, 1024 <= LOW, HIGH <= 65535, at least "
                         "16 ports (e.g. 20000-21999)")
    return low, high


LOW, HIGH = port_range()
_rng = random.Random()
_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    with _lock:
        for _ in range(500):
            port = _rng.randint(LOW, HIGH)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {LOW}-{HIGH} (set {ENV}=LOW-HIGH for "
                       "another range)")


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def free_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (a sharded
    service's shards take BASE..BASE+4N-1), none handed out before."""
    with _lock:
        for _ in range(500):
            base = _rng.randint(LOW, HIGH - count + 1)
            ports = range(base, base + count)
            if any(p in _given for p in ports):
                continue
            socks = []
            try:
                for port in ports:
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            finally:
                for s in socks:
                    s.close()
            _given.update(ports)
            return base
    raise RuntimeError(f"no {count} consecutive free loopback ports in {LOW}-{HIGH} (set "
                       f"{ENV}=LOW-HIGH for another range)")
