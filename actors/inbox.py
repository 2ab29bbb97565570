"""Actor inboxes over a deque: what pykka asks of an inbox, and the one
that queues its actor on a scheduler when mail lands (loop actors and
order actors both use it)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class DequeInbox:
    """What pykka asks of an inbox, over a deque (``put`` is the subclass's)."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()

    def get(self) -> Any:
        return self.queue.popleft()

    def empty(self) -> bool:
        return not self.queue

    def __len__(self) -> int:
        return len(self.queue)


class ScheduledInbox(DequeInbox):
    """A deque that queues its actor on a scheduler (an ``EventLoop``, or a
    ``Dispatcher`` of worker threads) when a message lands in it idle.

    The flag and the lock make sure the actor is queued at most once at a
    time, whichever thread tells it.
    """

    __slots__ = ("_actor", "_dispatcher", "_lock", "_scheduled")

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._scheduled = False
        self._actor: Any = None
        self._dispatcher: Any = None

    def bind(self, actor: Any, dispatcher: Any) -> None:
        self._actor, self._dispatcher = actor, dispatcher

    def put(self, envelope: Any) -> None:
        with self._lock:
            self.queue.append(envelope)
            if self._scheduled or self._actor is None or self._dispatcher is None:
                return
            self._scheduled = True
        self._dispatcher.schedule(self._actor)

    def unbind(self) -> None:
        """Forget the actor once it has stopped. The actor and its inbox refer
        to each other; without this the pair (and the order it holds) is
        freed only by the cycle collector, whose full passes over a busy
        heap stall every thread."""
        self._actor = self._dispatcher = None

    def start(self) -> None:
        """Schedule the first slice."""
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        assert self._dispatcher is not None and self._actor is not None
        self._dispatcher.schedule(self._actor)

    def finish_slice(self, stopped: bool) -> bool:
        """After a slice: True if the actor must be scheduled again."""
        with self._lock:
            if self.queue and not stopped:
                return True
            self._scheduled = False
            return False
