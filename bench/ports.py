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
_given: set[int] = set()
_lock = threading.Lock()


def _bindable(ports: range) -> bool:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()
    return True


class _Sweep:
    """Ports are handed out going up the range from a random start (and round
    again), not at random: what is handed out stays together and what is left
    stays in long free runs, so that a block of consecutive ports
    (``free_block``) is still found late in a test run. (Picked at random,
    582 single ports of a 1,000-port range left no 8 consecutive free ones
    within 500 tries, and test_shards failed.)"""

    def __init__(self, start: int) -> None:
        self.next = start

    def take(self, count: int) -> int | None:
        """The first of ``count`` consecutive ports from ``next`` on that are
        free now and not handed out before; None when a whole sweep finds none."""
        for _ in range(HIGH - LOW + 1):
            base = self.next if self.next + count - 1 <= HIGH else LOW
            ports = range(base, base + count)
            self.next = base + 1 if base < HIGH else LOW
            if any(p in _given for p in ports) or not _bindable(ports):
                continue
            _given.update(ports)
            self.next = base + count if base + count <= HIGH else LOW
            return base
        return None


_sweep = _Sweep(random.Random().randint(LOW, HIGH))


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    with _lock:
        port = _sweep.take(1)
    if port is None:
        raise RuntimeError(f"no free loopback port in {LOW}-{HIGH} (set {ENV}=LOW-HIGH for "
                           "another range)")
    return port


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def free_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (a sharded
    service's shards take BASE..BASE+4N-1), none handed out before."""
    with _lock:
        base = _sweep.take(count)
    if base is None:
        raise RuntimeError(f"no {count} consecutive free loopback ports in {LOW}-{HIGH} (set "
                           f"{ENV}=LOW-HIGH for another range)")
    return base
