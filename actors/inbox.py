"""Actor inboxes over a deque: what pykka asks of an inbox, and the one
that queues its actor on a scheduler when mail lands (loop actors and
order actors both use it)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, NamedTuple

import pykka


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

    A lock taken without waiting (``acquire(False)``: a test-and-set) is the
    token of being scheduled: whoever takes it queues the actor, so the actor
    is queued at most once at a time, whichever thread tells it; the slice
    that ends hands the token back and looks at the queue once more, so a
    message put meanwhile is never left behind. A put is an append and one
    failed ``acquire`` while the actor is already queued (most puts), with no
    lock held around the append.
    """

    __slots__ = ("_actor", "_dispatcher", "token")

    def __init__(self) -> None:
        super().__init__()
        self.token = threading.Lock()  # held while the actor is scheduled, running or held
        self._actor: Any = None
        self._dispatcher: Any = None

    def bind(self, actor: Any, dispatcher: Any) -> None:
        self._actor, self._dispatcher = actor, dispatcher

    def put(self, envelope: Any) -> None:
        self.queue.append(envelope)
        actor, dispatcher = self._actor, self._dispatcher
        if actor is None or dispatcher is None:
            return  # not started yet (``start`` schedules it), or stopped
        if self.token.acquire(False):
            dispatcher.schedule(actor)

    def bound(self) -> bool:
        """Started and not stopped (bound to its actor and scheduler)."""
        return self._actor is not None

    def take(self) -> bool:
        """Take the scheduling token without queueing the actor: the caller
        runs a slice of it itself and ends it with ``finish_slice``."""
        return self.token.acquire(False)

    def unbind(self) -> None:
        """Forget the actor once it has stopped. The actor and its inbox refer
        to each other; without this the pair (and the order it holds) is
        freed only by the cycle collector, whose full passes over a busy
        heap stall every thread."""
        self._actor = self._dispatcher = None

    def start(self) -> None:
        """Schedule the first slice."""
        if not self.token.acquire(False):
            return
        assert self._dispatcher is not None and self._actor is not None
        self._dispatcher.schedule(self._actor)

    def finish_slice(self, stopped: bool) -> bool:
        """After a slice: True if the actor must be scheduled again (it keeps
        the token). Else the token is handed back, and the queue looked at
        once more: a put between the first look and the release found the
        token taken and left the message to this slice."""
        queue = self.queue
        if queue and not stopped:
            return True
        self.token.release()
        return bool(queue) and not stopped and self.token.acquire(False)


class Told(NamedTuple):
    """A told message in an inbox, shaped like pykka's envelope (``message``,
    ``reply_to``): what ``tell`` and a loop actor's ``Bundle`` put there."""

    message: Any
    reply_to: Any = None


told = tuple.__new__  # told(Told, (m, None)): a Told without its generated __new__'s frame


def tell(ref: Any, message: Any) -> None:
    """``ref.tell(message)`` (pykka's ``ActorRef.tell``: ``ActorDeadError``
    once the actor has stopped, else into its inbox) for an actor whose inbox
    is a ``ScheduledInbox``, without pykka's two frames and ``Envelope``: about
    20 tells an order (order actors, the store writer, bundles)."""
    if ref.actor_stopped.is_set():
        raise pykka.ActorDeadError(f"{ref} not found")
    ref.actor_inbox.put(told(Told, (message, None)))
