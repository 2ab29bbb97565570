"""``Flag``: a yes/no without a lock, where a ``threading.Event`` would not do.

Two kinds of use: a pooled actor's ``actor_stopped`` (set and read in its own
slices and by ``ActorRef.is_alive``; nobody blocks on it, and an Event's
Condition and Lock per order actor cost memory and time), and a flag set
from a signal handler (an Event's lock, taken by the handler while the main
thread held it in ``wait``, hung a shard on SIGTERM for good). One attribute
is read and written whole, so no lock is needed.
"""

from __future__ import annotations

import time


class Flag:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def clear(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value

    def wait(self, timeout: float) -> bool:
        """Poll (every 50 ms at most) until set or ``timeout`` passes; True if set."""
        end = time.monotonic() + timeout
        while not self.value and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self.value
