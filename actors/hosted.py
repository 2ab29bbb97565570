"""Hosted actors: pykka actors that own sockets and run on an ``EventLoop``.

``HostedActor`` is a pykka actor type (built on the hooks pykka documents
for new actor types: ``_create_actor_inbox``, ``_create_future``,
``_start_actor_loop``) with no thread of its own. Its inbox is a deque
that, when a message lands in it idle, queues the actor on its loop
(``actors.pool.PooledInbox``, bound to the loop instead of a dispatcher);
``tell``, ``ask``, ``stop`` and proxies work from any thread.

An actor keeps the shape the service's socket owners always had:

- ``on_start`` (on the loop thread) creates and binds its sockets; an error
  there fails ``launch`` (a port in use stops the service at start);
- ``sockets()`` lists the sockets it reads: the loop polls them and calls
  ``on_readable(sock)`` (which reads a bounded number of frames);
- ``on_batch(envelopes)`` handles the mail of one slice (default: one by one;
  the store writer commits the whole batch at once);
- ``poll_timeout()`` says in how many milliseconds ``on_tick`` is next due;
  ``on_tick`` also runs after each slice and each read, as before.

Only the loop thread ever touches the actor's state and sockets.
``launch(..., loop=LOOP)`` puts it on the service's loop; without a loop it
gets a private one (one thread, as a stand-alone actor in a test).

Failure rule: a told message whose handler raises, or a failing
``on_readable``/``on_tick``, is *survived* (logged with its traceback,
counted) and the actor goes on; an ask gets the exception. An actor that
stops while its service runs has died: the supervisor ends the process.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, ClassVar

import pykka
import zmq

from actors.eventloop import EventLoop, LoopBlocked, TimerHandle, current_loop
from actors.loop import Bundle, Told, handle_envelope
from actors.pool import PooledInbox

logger = logging.getLogger(__name__)


class LoopFuture(pykka.ThreadingFuture):  # type: ignore[type-arg]
    """A future that refuses to block a loop thread (see ``actors.eventloop``)."""

    def get(self, *, timeout: float | None = None) -> Any:
        if self._result is None and self._get_hook is None and current_loop() is not None:
            raise LoopBlocked("the loop thread may not wait for an answer (it could only "
                              "come from the loop): tell, or pass a callback")
        return super().get(timeout=timeout)


class HostedActor(pykka.Actor):
    """A pykka actor scheduled by an ``EventLoop``. Start it with ``launch``."""

    actor_inbox: PooledInbox  # type: ignore[assignment]
    thread_name: str = ""  # the component name (logs, metrics); the class name if empty
    batch_limit: ClassVar[int] = 4096  # messages per slice
    turn_end: ClassVar[bool] = False  # run after the other actors of a turn (group commit)
    _loop: EventLoop
    _own_loop: bool
    _detached: threading.Event
    _tick: TimerHandle | None = None
    _ticks: bool = False
    _readers: tuple[zmq.Socket, ...] = ()

    @staticmethod
    def _create_actor_inbox() -> PooledInbox:  # type: ignore[override]
        return PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return LoopFuture()

    @classmethod
    def launch(cls, *args: Any, loop: EventLoop | None = None, **kwargs: Any) -> Any:
        """Create the actor, run its ``on_start`` on ``loop`` (a private loop
        if None) and return the actor itself: its thread-safe helpers (those
        that only ``tell``) may be called from anywhere."""
        actor = cls(*args, **kwargs)
        own = loop is None
        if loop is None:
            loop = EventLoop(actor.component).start()
        actor._loop, actor._own_loop = loop, own
        actor._detached = threading.Event()
        pykka.ActorRegistry.register(actor.actor_ref)
        try:
            loop.run_sync(actor._attach)
        except BaseException:
            pykka.ActorRegistry.unregister(actor.actor_ref)
            actor.actor_stopped.set()
            actor._detached.set()
            if own:
                loop.stop()
            raise
        return actor

    @property
    def component(self) -> str:
        return self.thread_name or type(self).__name__

    def _start_actor_loop(self) -> None:
        raise TypeError(f"start {type(self).__name__} with launch(), not start()")

    def _attach(self) -> None:
        """On the loop: start, register the sockets, take the mail queued so far."""
        self.on_start()
        self._readers = tuple(self.sockets())
        for sock in self._readers:
            self._loop.add_reader(sock, self._readable)
        cls = type(self)
        self._ticks = (cls.poll_timeout is not HostedActor.poll_timeout
                       or cls.on_tick is not HostedActor.on_tick)
        self.actor_inbox.bind(self, self._loop)  # type: ignore[arg-type]
        self.actor_inbox.start()  # one first slice: mail told before now, a first tick

    # -- hooks -------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        """The sockets this actor owns and wants to read."""
        return []

    def on_readable(self, sock: zmq.Socket) -> None:
        """A socket of ``sockets()`` has input."""

    def poll_timeout(self) -> float | None:
        """Milliseconds until ``on_tick`` is next due, or None."""
        return None

    def on_tick(self) -> None:
        """Time-driven work; runs after each slice and each read, and when due."""

    def on_batch(self, envelopes: list[Any]) -> None:
        """Handle the messages of one slice (default: one by one)."""
        for envelope in envelopes:
            self._handle_envelope(envelope)
            if self.actor_stopped.is_set():
                return

    # -- running on the loop ------------------------------------------------------

    def _run_slice(self, budget: int) -> None:
        inbox = self.actor_inbox
        if not self.actor_stopped.is_set():
            batch: list[Any] = []
            queue, limit = inbox.queue, self.batch_limit
            while queue and len(batch) < limit:
                envelope = queue.popleft()
                if type(envelope.message) is Bundle:
                    batch.extend(Told(m) for m in envelope.message.messages)
                else:
                    batch.append(envelope)
            if batch:
                try:
                    self.on_batch(batch)
                except Exception:  # an on_batch that lets an error out cannot go on
                    self._handle_failure(*sys.exc_info())
            self._activity()
        stopped = self.actor_stopped.is_set()
        if inbox.finish_slice(stopped):
            self._loop.schedule(self)
        elif stopped:
            self._detach()

    def _handle_envelope(self, envelope: Any) -> None:
        failed = handle_envelope(self, envelope)
        if failed is not None:  # one told message failed: log, count, carry on
            self._loop.survived(self.component, failed)

    def _readable(self, sock: zmq.Socket) -> None:
        if self.actor_stopped.is_set():
            return
        try:
            self.on_readable(sock)
        except Exception:
            self._loop.survived(self.component, sys.exc_info())
        self._activity()

    def _activity(self) -> None:
        """After a slice or a read: ``on_tick``, and the next tick armed."""
        if not self._ticks or self.actor_stopped.is_set():
            return
        try:
            self.on_tick()
        except Exception:
            self._loop.survived(self.component, sys.exc_info())
        wait = self.poll_timeout()
        if wait is None:
            return
        loop = self._loop
        deadline = loop.time() + wait / 1000
        tick = self._tick
        if tick is None or tick.cancelled or deadline < tick.deadline:
            if tick is not None:
                tick.cancel()  # an earlier one is needed; a later one re-arms itself
            self._tick = loop.call_at(deadline, self._activity)

    def _handle_failure(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        """pykka's rule for an error that escaped: log, unregister, stop."""
        logger.error("%s stopped on an unhandled error", self.component,
                     exc_info=(exc_type, exc_value, tb))
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()

    def _detach(self) -> None:
        """On the loop, once stopped: sockets off the poller, queued asks
        answered with ``ActorDeadError``, the loop ended if it is private."""
        for sock in self._readers:
            self._loop.remove_reader(sock)
        if self._tick is not None:
            self._tick.cancel()
        self._actor_loop_teardown()
        self.actor_inbox.unbind()
        self._detached.set()
        if self._own_loop:
            self._loop.stop()

    def alive(self) -> bool:
        """Its loop runs and it has not stopped."""
        return self._loop.alive() and not self.actor_stopped.is_set()

    def join(self, timeout: float = 10.0) -> None:
        """Wait until the actor has left its loop (and a private loop ended)."""
        self._detached.wait(timeout)
        if self._own_loop:
            self._loop.stop(timeout)

    def tell(self, message: Any) -> None:
        """Thread-safe: queue a message for this actor."""
        self.actor_ref.tell(message)
