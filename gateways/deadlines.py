"""A gateway's step deadlines: when each command in flight times out.

One FIFO queue of ``(deadline, command_id)`` per step timeout value: in a
queue deadlines never decrease (the send time + one timeout), so a send
appends and the earliest is at its left. An entry whose command was
answered or re-sent since is *stale* (``pending`` no longer holds it with
that deadline); it is dropped when it gets to the front.

Both walks are bounded, so no loop turn grows with the commands in flight:
``pop_due`` hands the gateway one due entry at a time (it takes at most its
budget a turn, ``gateways.gateway.EXPIRE_PER_TURN``), and ``earliest``
drops at most ``limit`` stale entries a call (past that it answers "now",
and the next turn goes on).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Protocol


class Waiting(Protocol):
    """A command awaiting its reply (``gateways.gateway._Pending``)."""

    @property
    def deadline(self) -> float: ...


class Deadlines:
    """The deadlines of the commands in ``pending`` (see the module docstring)."""

    __slots__ = ("_pending", "_queues")

    def __init__(self, pending: Mapping[str, Waiting]) -> None:
        self._pending = pending
        self._queues: dict[float, deque[tuple[float, str]]] = {}

    def add(self, timeout_s: float, deadline: float, command_id: str) -> None:
        """A command sent now, due at ``deadline`` (now + ``timeout_s``)."""
        queue = self._queues.get(timeout_s)
        if queue is None:
            queue = self._queues[timeout_s] = deque()
        queue.append((deadline, command_id))

    def pop_due(self, now: float) -> tuple[float, str] | None:
        """The earliest entry due by ``now`` (by deadline, then command id,
        across the queues), taken off its queue; None if none is due. It
        may be stale: the caller checks. One look at each queue's front."""
        best: deque[tuple[float, str]] | None = None
        for queue in self._queues.values():
            if queue and queue[0][0] <= now and (best is None or queue[0] < best[0]):
                best = queue
        return None if best is None else best.popleft()

    def earliest(self, limit: int) -> float | None:
        """The earliest deadline still awaited, or None if none is. Drops
        the stale entries in front of it, at most ``limit`` in all: past
        that, ``-inf`` (look again at once, in the next turn)."""
        pending, earliest = self._pending, None
        for queue in self._queues.values():
            while queue:
                deadline, command_id = queue[0]
                waiting = pending.get(command_id)
                if waiting is None or waiting.deadline != deadline:
                    if limit <= 0:
                        return float("-inf")
                    limit -= 1
                    queue.popleft()  # answered or re-sent since
                    continue
                if earliest is None or deadline < earliest:
                    earliest = deadline
                break
        return earliest
