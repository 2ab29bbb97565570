"""Free loopback ports for the bench harness and the tests.

Ports come from *below* the kernel's ephemeral range: a port from bind(0)
is an ephemeral one, and any outgoing connection on the machine may take it
before the process we hand it to binds it.

A process never hands out the same port twice (two endpoints of one run must
not collide: a simulator that cannot bind its port leaves the run waiting
for replies that never come), and a port is handed out only after a bind on
it succeeded.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

LOW = 15000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


HIGH = max(LOW + 1000, _ephemeral_low())
_rng = random.Random()
_given: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback TCP port that is free now and not handed out before by this process."""
    with _lock:
        for _ in range(500):
            port = _rng.randrange(LOW, HIGH)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {LOW}-{HIGH}")


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"
