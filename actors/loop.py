"""Loop actors: one thread that serves both the actor's inbox and its sockets.

A ZeroMQ socket belongs to one thread, and a plain ``ThreadingActor`` blocks
in its inbox, so it cannot also wait on a socket. ``LoopActor`` is a pykka
actor type (built on the documented ``_create_actor_inbox`` /
``_create_future`` / ``_start_actor_loop`` hooks) whose inbox raises an
eventfd when a message lands, and whose thread polls that fd together with
the sockets it owns. Other threads talk to it with ordinary ``tell``/``ask``;
only its own thread ever touches its sockets.

Subclasses create their sockets in ``on_start`` (in the actor's thread),
return them from ``sockets``, read them in ``on_readable``, may do
time-driven work in ``on_tick`` (``poll_timeout`` says when) and may handle a
whole drained batch of messages at once in ``on_batch`` (the store writer's
group commit).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pykka
import zmq

from actors import supervision

logger = logging.getLogger(__name__)


def open_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None,
                connect: str | None = None, **options: int) -> zmq.Socket:
    """A socket with options set (``SNDHWM=...``), bound or connected; closed
    again if that fails, so a failed start leaves nothing open."""
    sock = ctx.socket(kind)
    try:
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
    except BaseException:
        sock.close(0)
        raise
    return sock


def handle_envelope(actor: pykka.Actor, envelope: Any) -> Any:
    """pykka's handling of one envelope: the answer, or the exception, goes to
    an asker. Returns the ``exc_info`` of a *told* message that failed (the
    caller's actor type decides what that means), else None."""
    try:
        response = actor._handle_receive(envelope.message)
        if envelope.reply_to is not None:
            envelope.reply_to.set(response)
    except Exception:
        if envelope.reply_to is None:
            return sys.exc_info()
        envelope.reply_to.set_exception()
    return None


class Bundle(NamedTuple):
    """Several messages for one loop actor in one envelope (see ``burst``)."""

    messages: list[Any]


class Told(NamedTuple):
    """A message out of a ``Bundle``, shaped like pykka's envelope."""

    message: Any
    reply_to: Any = None


_bursts = threading.local()


@contextmanager
def burst() -> Iterator[None]:
    """Gather this thread's tells to loop actors; tell each actor once, at the end.

    The store writer runs one commit's callbacks inside a burst: the dozens of
    commands, events and replies a commit releases reach each gateway, the
    publisher and the endpoints as one ``Bundle`` apiece, so the writer pays
    one tell (and at most one wake-up) per actor instead of one per message.
    Order is kept per actor. A dead actor's bundle is logged and dropped, as
    its tells would have failed.
    """
    outer = getattr(_bursts, "pending", None)
    pending: dict[LoopActor, list[Any]] = {}
    _bursts.pending = pending
    try:
        yield
    finally:
        _bursts.pending = outer
        for actor, messages in pending.items():
            try:
                actor.actor_ref.tell(Bundle(messages))
            except pykka.ActorDeadError:
                logger.warning("%d messages for stopped %s dropped", len(messages), actor)


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


class SignalInbox(DequeInbox):
    """A deque plus an eventfd that is raised when the deque stops being empty."""

    __slots__ = ("_armed", "fd")

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._armed = False

    def put(self, envelope: Any) -> None:
        self.queue.append(envelope)
        if not self._armed:
            self._armed = True
            os.eventfd_write(self.fd, 1)

    def clear_signal(self) -> None:
        """Called by the owner before it drains the deque.

        Consume the fd first, then disarm: a put that lands before the
        disarm is already in the deque the owner drains next; a put after it
        sees the flag down and raises the fd again. (The other order loses
        wake-ups: the flag stays up with the fd drained.)
        """
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self._armed = False

    def close(self) -> None:
        os.close(self.fd)


class LoopActor(pykka.Actor):
    """A pykka actor with its own thread polling its inbox and sockets."""

    actor_inbox: SignalInbox  # type: ignore[assignment]
    batch_limit = 4096

    @staticmethod
    def _create_actor_inbox() -> SignalInbox:  # type: ignore[override]
        return SignalInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> Any:
        """Like ``start()``, but return the actor itself, whose thread-safe
        helper methods (those that only ``tell``) other threads may call."""
        actor = cls(*args, **kwargs)
        actor._setup_done = threading.Event()
        actor._setup_error = None
        pykka.ActorRegistry.register(actor.actor_ref)
        actor._start_actor_loop()
        if not actor._setup_done.wait(30):
            raise RuntimeError(f"{actor} did not finish starting within 30 s")
        if actor._setup_error is not None:
            actor.join(5)
            raise actor._setup_error
        return actor

    def _actor_loop_setup(self) -> None:
        """Run ``on_start``; a failure stops the actor and fails ``launch``."""
        try:
            self.on_start()
        except Exception as exc:
            self._setup_error = exc
            pykka.ActorRegistry.unregister(self.actor_ref)
            self.actor_stopped.set()
        finally:
            done = getattr(self, "_setup_done", None)
            if done is not None:
                done.set()

    def tell(self, message: Any) -> None:
        """Thread-safe: queue a message for this actor (gathered in a ``burst``)."""
        pending = getattr(_bursts, "pending", None)
        if pending is None:
            self.actor_ref.tell(message)
            return
        messages = pending.get(self)
        if messages is None:
            pending[self] = [message]
        else:
            messages.append(message)

    def _start_actor_loop(self) -> None:
        name = getattr(self, "thread_name", type(self).__name__)
        self._supervisor = supervision.current()
        self._thread = threading.Thread(target=self._actor_loop, name=name, daemon=True)
        self._thread.start()

    @property
    def component(self) -> str:
        return self._thread.name

    def _actor_loop(self) -> None:
        """pykka's loop, supervised: if it raises, or the actor stops while
        the service runs (not while it starts or stops), the component died."""
        try:
            super()._actor_loop()
        except BaseException:
            if self._supervisor is None:
                raise
            self._supervisor.died(self.component, sys.exc_info())
            return
        if self._supervisor is not None and getattr(self, "_setup_error", None) is None:
            self._supervisor.died(self.component)

    def alive(self) -> bool:
        """The thread runs and the actor has not stopped."""
        return self._thread.is_alive() and not self.actor_stopped.is_set()

    def sockets(self) -> list[zmq.Socket]:
        """The sockets this actor owns and wants to read."""
        return []

    def poll_timeout(self) -> float | None:
        """Milliseconds until ``on_tick`` is next due, or None."""
        return None

    def on_readable(self, sock: zmq.Socket) -> None:
        """A socket of ``sockets()`` has input."""

    def on_tick(self) -> None:
        """Time-driven work; runs after every wake-up."""

    def on_batch(self, envelopes: list[Any]) -> None:
        """Handle the messages drained in one wake-up (default: one by one)."""
        for envelope in envelopes:
            self._handle_envelope(envelope)
            if self.actor_stopped.is_set():
                return

    def _handle_envelope(self, envelope: Any) -> None:
        failed = handle_envelope(self, envelope)
        if failed is not None:  # one message failed: log, count, carry on
            supervision.survived(self._supervisor, self.component, failed)

    def _actor_loop_running(self) -> None:
        inbox = self.actor_inbox
        poller = zmq.Poller()
        poller.register(inbox.fd, zmq.POLLIN)
        socks = self.sockets()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        while not self.actor_stopped.is_set():
            try:
                ready = dict(poller.poll(self.poll_timeout()))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            inbox.clear_signal()
            if inbox.queue:
                batch = []
                while inbox.queue and len(batch) < self.batch_limit:
                    envelope = inbox.queue.popleft()
                    if type(envelope.message) is Bundle:
                        batch.extend(Told(m) for m in envelope.message.messages)
                    else:
                        batch.append(envelope)
                if len(inbox.queue):
                    os.eventfd_write(inbox.fd, 1)  # more left: come round again
                self.on_batch(batch)
            for sock in socks:
                if sock in ready and not self.actor_stopped.is_set():
                    try:
                        self.on_readable(sock)
                    except Exception:
                        supervision.survived(self._supervisor, self.component)
            if not self.actor_stopped.is_set():
                try:
                    self.on_tick()
                except Exception:
                    supervision.survived(self._supervisor, self.component)

    def _actor_loop_teardown(self) -> None:
        super()._actor_loop_teardown()
        self.actor_inbox.close()

    def on_failure(self, *exc_info: Any) -> None:
        logger.error("%s stopped on an unhandled error", self, exc_info=exc_info or sys.exc_info())
        if self._supervisor is not None:
            self._supervisor.died(self.component, exc_info or None)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
