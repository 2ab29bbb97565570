"""Pooled actors: many cheap actors scheduled on a few shared worker threads.

A pykka ``ThreadingActor`` costs one OS thread. Order actors are far too
many for that, so ``PooledActor`` uses the hooks pykka documents for new
actor types (``_create_actor_inbox``, ``_create_future``,
``_start_actor_loop``): its inbox is a deque, and putting a message into an
idle actor's inbox schedules the actor on a ``Dispatcher`` (a fixed pool of
worker threads, as Akka's dispatchers do). A worker runs one actor for up to
``throughput`` messages, then calls ``on_slice_end`` (where an order actor
persists once for the whole slice), then moves on.

An actor runs on at most one worker at a time, so its state needs no lock.
Pooled actors are not put in pykka's ``ActorRegistry`` (its unregister is a
list removal, O(n)); ``actors.router.OrderRouter`` indexes them instead.

On an ``EventLoop``, an idle actor can also take a told message *in place*:
the code that delivers it on the loop thread (a gateway's read, the store
writer's post-commit effects, a timer) calls ``hold``, which takes the
actor's scheduling token as a slice would, and, if it got it, ``run_held``
with the message: the handler runs at once, with no inbox put, scheduling
or slice of its own. The loop ends the held slice at the end of its phase
(``EventLoop.hold``): ``on_slice_end`` (an order actor's one save for all it
took), then any mail queued meanwhile runs in a slice of its own, as after
any slice. A message for an actor with mail queued, running (its handler or
its slice), stopped or on another thread is told, behind the mail before it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
from typing import TYPE_CHECKING, Any

import pykka
from pykka import messages as pykka_messages

from actors import supervision
from actors.flags import Flag
from actors.inbox import ScheduledInbox
from actors.loop import PYKKA_MESSAGES, LoopFuture, handle_envelope

if TYPE_CHECKING:
    from actors.eventloop import EventLoop

logger = logging.getLogger(__name__)
_serial = itertools.count(1)  # next() on a count is atomic under the GIL


class Dispatcher:
    """A fixed pool of worker threads that run pooled actors' slices."""

    def __init__(self, workers: int = 2, throughput: int = 64, name: str = "orders") -> None:
        self.throughput = throughput
        self._ready: queue.SimpleQueue[PooledActor | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=supervision.guarded(f"{name}-{i}", self._work),
                             name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def schedule(self, actor: PooledActor) -> None:
        self._ready.put(actor)

    def _work(self) -> None:
        while True:
            actor = self._ready.get()
            if actor is None:
                return
            actor._run_slice(self.throughput)  # contains an actor's failures (on_crash);
            # anything else escaping it is a bug that leaves the actor unscheduled:
            # the worker dies, and with it the process (actors.supervision)
            del actor  # a stopped actor is freed now, not when the next one comes

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def hold(self, actor: PooledActor, token: threading.Lock) -> bool:
        """Never: a worker thread takes no message in place (``PooledActor.hold``)."""
        return False

    def in_loop(self) -> bool:
        """Never: no actor of a worker pool is held (``PooledActor.hold``)."""
        return False

    def backlog(self) -> int:
        """Actors waiting for a worker (read at scrape time)."""
        return self._ready.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the workers finish what is scheduled, then end them."""
        for _ in self._threads:
            self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout)


PooledInbox = ScheduledInbox  # the loop actors' inbox: queues the actor when mail lands


class Broken(BaseException):
    """The failure handling of an order's handler run in place raised: the
    runtime's contract broke, not an error its caller may survive (a
    ``BaseException``: no ``except Exception`` of a reader, timer or actor on
    the way holds it). The loop reports its death, as for a slice that raises."""

_FREE, _HELD, _RUNNING = 0, 1, 2
"""``PooledActor._holding``: not held by its loop; held (``hold``), between
messages taken in place; running a handler in place (``run_held``)."""


class PooledActor(pykka.Actor):
    """A pykka actor without a thread of its own. Start it with ``spawn``.

    ``__init__`` fills in the fields pykka's does (``actor_urn``,
    ``actor_inbox``, ``actor_stopped``, the ref) more cheaply: an order
    actor is made for every order and every reactivation, and pykka's own
    costs a ``uuid4`` and a ``threading.Event``.
    """

    actor_inbox: PooledInbox
    actor_stopped: Flag  # type: ignore[assignment]  # pykka's is an Event: see __init__
    turn_end = False  # on an EventLoop: runs with the others, not at the turn's end
    _holding = _FREE  # see ``hold``

    @staticmethod
    def _create_actor_inbox() -> PooledInbox:
        return PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return LoopFuture()  # waiting for it on a loop thread fails at once (LoopBlocked)

    def __init__(self, dispatcher: Dispatcher | EventLoop) -> None:
        self.actor_urn = f"urn:oms:{type(self).__name__}:{next(_serial)}"
        self.actor_inbox = self._create_actor_inbox()
        self.actor_stopped = Flag()
        self._actor_ref = pykka.ActorRef(self)
        self._dispatcher = dispatcher
        self._started = False
        self.actor_inbox.bind(self, dispatcher)

    @classmethod
    def spawn(cls, *args: Any, idle: bool = False, **kwargs: Any) -> pykka.ActorRef[Any]:
        """Create and start without registering in pykka's ActorRegistry.
        ``idle``: no first slice now; the first message schedules it (and
        ``on_start`` runs then)."""
        actor = cls(*args, **kwargs)
        if not idle:
            actor._start_actor_loop()
        return actor.actor_ref

    def _start_actor_loop(self) -> None:
        self.actor_inbox.start()

    def _stop(self) -> None:
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:  # noqa: BLE001 - the failure rule: to the handler
            self._handle_failure(*sys.exc_info())

    def _handle_failure(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        logger.error("Unhandled exception in %s:", self, exc_info=(exc_type, exc_value, tb))
        self.actor_stopped.set()

    def _run_slice(self, budget: int) -> None:
        if not self._started:
            self._started = True
            self._actor_loop_setup()
        inbox, stopped = self.actor_inbox, self.actor_stopped
        queue = inbox.queue
        for _ in range(budget):
            if stopped.value or not queue:
                break
            envelope = queue.popleft()
            message = envelope.message
            if envelope.reply_to is not None or isinstance(message, PYKKA_MESSAGES):
                self._handle_envelope(envelope)
                continue
            try:  # a told message (10 an order): handle_envelope's path, without its frames
                self.on_receive(message)
            except Exception:  # noqa: BLE001 - the failure rule, as handle_envelope's caller
                self.on_crash(sys.exc_info(), message)
        self._end_slice()  # (an order's messages mostly come in place now: ``run_held``)

    def _end_slice(self) -> None:
        """After a slice, or a hold (``_end_held``): ``on_slice_end``, then the
        scheduling token handed back, or the actor queued again if mail came
        meanwhile, or left behind once stopped."""
        self._holding = _FREE
        stopped = self.actor_stopped
        if not stopped.value:
            try:
                self.on_slice_end()
            except Exception:  # noqa: BLE001 - the failure rule: crash this actor only
                self.on_crash(sys.exc_info(), None)
        inbox = self.actor_inbox
        if inbox.finish_slice(stopped.value):
            self._dispatcher.schedule(self)
        elif stopped.value:
            self._actor_loop_teardown()
            inbox.unbind()

    def hold(self) -> bool:
        """True if the caller, on this actor's loop thread, may hand it a
        told message in place now (``run_held``): it is idle (not stopped,
        nothing queued, not scheduled or running; one spawned idle starts
        now, as its first slice would) and its scheduling token is now taken
        for a held slice that the loop ends at the end of this phase
        (``_end_held``), or it is held already and nothing was queued since
        (queued mail goes first). Else False: tell it, and the message
        queues behind what is there (a handler that delivers to its own
        actor, too)."""
        holding = self._holding
        if holding:  # held by its loop: only for that loop's thread (another thread tells)
            return (holding == _HELD and not self.actor_inbox.queue
                    and not self.actor_stopped.value and self._dispatcher.in_loop())
        inbox = self.actor_inbox
        if (self.actor_stopped.value or inbox.queue
                or not self._dispatcher.hold(self, inbox.token)):
            return False
        self._holding = _HELD
        if inbox.queue:  # a put from another thread raced for the token: it goes first
            return False  # (the held slice's end finds it and schedules a slice)
        if not self._started:  # (spawned idle) its first slice's start, as ``_run_slice``
            self._started = True
            self._actor_loop_setup()
            return not self.actor_stopped.value  # stopped: told, it refuses the message
        return True

    def run_held(self, message: Any) -> None:
        """Handle a told ``message`` in place, after ``hold`` said yes. A
        handler's error follows the actor's failure rule (``on_crash``),
        never the caller's; if that rule itself fails, the runtime is
        broken (``Broken``: the loop ends, as when a slice raises)."""
        self._holding = _RUNNING
        try:
            self.on_receive(message)
        except Exception:  # noqa: BLE001 - the failure rule, as in a slice
            try:
                self.on_crash(sys.exc_info(), message)
            except Exception as exc:  # not the caller's to survive: fatal
                raise Broken(f"{self} failed handling a crash") from exc
        finally:
            self._holding = _HELD

    _end_held = _end_slice  # the end of the phase it was held in (``EventLoop.hold``)

    def _handle_envelope(self, envelope: Any) -> None:
        exc_info = handle_envelope(self, envelope)
        if exc_info is not None:
            self.on_crash(exc_info, envelope.message)

    def on_crash(self, exc_info: Any, message: Any) -> None:
        """A told ``message`` raised (``None``: ``on_slice_end`` did). pykka's
        rule by default: log, stop, ``on_failure``. Order actors replace it
        with the order failure rule (``actors.router.OrderRouter.crashed``)."""
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:  # noqa: BLE001 - the failure rule: to the handler
            self._handle_failure(*sys.exc_info())

    def on_slice_end(self) -> None:
        """Called after each slice of messages (not after a stop)."""

    def stop_now(self) -> None:
        """Stop from inside the actor's own slice (passivation, retirement)."""
        self.actor_stopped.set()


__all__ = ["Dispatcher", "PooledActor", "pykka_messages"]
