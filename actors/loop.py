"""Loop actors: pykka actors that own sockets and run on an ``EventLoop``.

``LoopActor`` is a pykka actor type (built on the hooks pykka documents for
new actor types: ``_create_actor_inbox``, ``_create_future``,
``_start_actor_loop``) with no thread of its own. Its inbox is a deque
that, when a message lands in it idle, queues the actor on its loop
(``actors.inbox.ScheduledInbox``; order actors use the same inbox).
``tell``, ``ask``, ``stop`` and proxies work from any thread; only the loop
thread touches the actor's state and sockets.

Subclasses keep the shape the service's socket owners always had:
``on_start`` (run on the loop) creates and binds the sockets (an error
there fails ``launch``: a port in use stops the service at start);
``sockets()`` lists those the loop polls for it, ``on_readable(sock)``
reads a bounded number of frames; ``on_batch`` handles one slice of mail at
once (the store writer's group commit; told messages of the ``direct`` type,
the events, commands and replies, go to ``on_receive`` without pykka's
envelope handling); ``poll_timeout()`` says in how many
milliseconds ``on_tick`` is due (it also runs after each slice and read).

``launch(..., loop=LOOP)`` puts the actor on the service's loop; without
one it gets a private loop (one thread, as a stand-alone actor in a test).

Failure rule: a told message whose handler raises, or a failing
``on_readable``/``on_tick``, is survived (logged with its traceback,
counted) and the actor goes on; an ask gets the exception. An actor that
stops while its service runs has died: the supervisor ends the process.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import pykka
import zmq
from pykka import messages as pykka_messages

from actors import supervision
from actors.eventloop import EventLoop, LoopBlocked, TimerHandle, current_loop
from actors.inbox import ScheduledInbox, Told, tell, told

logger = logging.getLogger(__name__)


PYKKA_MESSAGES = (pykka_messages._ActorStop, pykka_messages.ProxyCall,
                  pykka_messages.ProxyGetAttr, pykka_messages.ProxySetAttr)


def handle_envelope(actor: pykka.Actor, envelope: Any) -> Any:
    """pykka's handling of one envelope: the answer, or the exception, goes to
    an asker. Returns the ``exc_info`` of a *told* message that failed (the
    caller's actor type decides what that means), else None.

    pykka's own messages (stop, proxy calls) go through its
    ``_handle_receive``; any other goes to ``on_receive`` at once, as
    ``_handle_receive`` would send it (one type check instead of four)."""
    message = envelope.message
    try:
        if isinstance(message, PYKKA_MESSAGES):
            response = actor._handle_receive(message)
        else:
            response = actor.on_receive(message)
        if envelope.reply_to is not None:
            envelope.reply_to.set(response)
    except Exception:  # noqa: BLE001 - the error goes to the asker, or to the actor type
        if envelope.reply_to is None:
            return sys.exc_info()
        envelope.reply_to.set_exception()
    return None


class Bundle(NamedTuple):
    """Several messages for one loop actor in one envelope (see ``burst``)."""

    messages: list[Any]


bursts = threading.local()  # .pending: this thread's innermost burst's map, if any
HELD: list[Any] = []
"""A burst's mark for an actor it holds: its told messages are handled in place
(``LoopActor.in_place``), never gathered (the list is never appended to)."""
FREE: Any = object()  # ``LoopActor.held_by`` of an actor no burst holds


@contextmanager
def burst() -> Iterator[None]:
    """Gather this thread's tells to loop actors; tell each actor once, at the end.

    The store writer runs one commit's callbacks inside a burst: the dozens of
    commands, events and replies a commit releases reach each gateway, the
    publisher and the endpoints as one ``Bundle`` apiece, so the writer pays
    one tell (and at most one wake-up) per actor instead of one per message.
    Order is kept per actor. A dead actor's bundle is logged and dropped, as
    its tells would have failed. An actor the burst holds (``LoopActor.in_place``:
    idle, on this loop) has had its messages handled in place; at the end it
    gets the end of a slice (``on_tick``, then any mail that came meanwhile).
    """
    outer = getattr(bursts, "pending", None)
    pending: dict[LoopActor, list[Any]] = {}
    bursts.pending = pending
    try:
        yield
    finally:
        bursts.pending = outer
        for actor, messages in pending.items():
            if messages is HELD:
                actor.held_by = FREE
                actor._end_slice()
                continue
            try:
                tell(actor.actor_ref, Bundle(messages))
            except pykka.ActorDeadError:
                logger.warning("%d messages for stopped %s dropped", len(messages), actor)


class LoopFuture(pykka.ThreadingFuture):
    """A future that refuses to block a loop thread (see ``actors.eventloop``)."""

    def get(self, *, timeout: float | None = None) -> Any:
        if self._result is None and self._get_hook is None and current_loop() is not None:
            raise LoopBlocked("the loop thread may not wait for an answer (it could only "
                              "come from the loop): tell, or pass a callback")
        return super().get(timeout=timeout)


class LoopActor(pykka.Actor):
    """A pykka actor scheduled by an ``EventLoop``. Start it with ``launch``."""

    actor_inbox: ScheduledInbox
    thread_name: str = ""  # the component name (logs, metrics); the class name if empty
    batch_limit: ClassVar[int] = 4096  # messages per slice
    read_budget: ClassVar[int] = 256  # frames a reader takes per turn (bounds a turn)
    turn_end: ClassVar[bool] = False  # run after the other actors of a turn (group commit)
    direct: ClassVar[type | None] = None  # its many told messages: see ``on_batch``
    _loop: EventLoop  # bound by ``launch``, as pykka's ``start`` binds a thread
    _own_loop: bool
    _tick: TimerHandle | None = None
    _ticks: bool = False
    _readers: tuple[zmq.Socket, ...] = ()
    _bare: frozenset[type] | None = None  # types on_batch takes bare: {``direct``} (``_attach``)
    __slots__ = ("held_by", "mail")  # not in the dict: past 30 keys, lookups are slower

    def __init__(self) -> None:
        super().__init__()
        self.held_by = FREE  # the burst's map that holds it (``in_place``)
        self.mail = self.actor_inbox.queue  # its inbox's deque (never replaced)
        self._supervisor = supervision.current()  # told when it stops while the service runs
        self._detached = threading.Event()  # set once it has left its loop

    @staticmethod
    def _create_actor_inbox() -> ScheduledInbox:
        return ScheduledInbox()

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
            loop = EventLoop(actor.component, supervisor=actor._supervisor).start()
        actor._loop, actor._own_loop = loop, own
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
        if cls.on_batch is LoopActor.on_batch and cls.direct is not None:
            self._bare = frozenset((cls.direct,))  # a Bundle's direct messages go in bare
        self._ticks = (cls.poll_timeout is not LoopActor.poll_timeout
                       or cls.on_tick is not LoopActor.on_tick)
        self._loop.around_held = burst  # the saves of the order slices it ends, gathered
        self.actor_inbox.bind(self, self._loop)
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
        """Handle the messages of one slice (default: one by one). A told
        message of the ``direct`` type goes straight to ``on_direct``, not
        through pykka's envelope handling (an ask or a stop still does, in
        order); an error in it is survived, as any told message's. With this
        default, a ``Bundle`` of ``direct`` messages comes in bare (no
        envelope each): an entry of that type is one."""
        direct, on_direct = self.direct, self.on_direct
        for envelope in envelopes:
            if type(envelope) is direct:  # out of a Bundle: told (see ``_run_slice``)
                try:
                    on_direct(envelope)
                except Exception:  # noqa: BLE001 - the failure rule, as a told message
                    self._loop.survived(self.component, sys.exc_info())
                continue
            message = envelope.message
            if type(message) is direct and envelope.reply_to is None:
                try:
                    on_direct(message)
                except Exception:  # noqa: BLE001 - the failure rule, as a told message
                    self._loop.survived(self.component, sys.exc_info())
                continue
            self._handle_envelope(envelope)
            if self.actor_stopped.is_set():
                return

    def on_direct(self, message: Any) -> None:
        """A told message of the ``direct`` type (``on_receive`` unless overridden:
        the publisher's events, the gateways' commands go straight to their send)."""
        self.on_receive(message)

    # -- running on the loop ------------------------------------------------------

    def _run_slice(self, budget: int) -> None:
        inbox = self.actor_inbox
        if not self.actor_stopped.is_set():
            batch: list[Any] = []
            queue, limit, bare = inbox.queue, self.batch_limit, self._bare
            while queue and len(batch) < limit:
                envelope = queue.popleft()
                if type(envelope.message) is not Bundle:
                    batch.append(envelope)
                    continue
                messages = envelope.message.messages
                if bare is not None and {*map(type, messages)} <= bare:  # (no frames)
                    batch.extend(messages)  # bare: on_batch knows them by their type
                else:
                    batch.extend([told(Told, (m, None)) for m in messages])
            if batch:
                try:
                    self.on_batch(batch)
                except Exception:  # noqa: BLE001 - an on_batch that lets an error out stops
                    self._handle_failure(*sys.exc_info())
        self._end_slice()

    def _end_slice(self) -> None:
        """After a slice (or a burst that held the actor): ``on_tick``, then
        the scheduling token handed back, or the actor queued again if mail
        came meanwhile, or detached once stopped."""
        self._activity()
        stopped = self.actor_stopped.is_set()
        if self.actor_inbox.finish_slice(stopped):
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
        except Exception:  # noqa: BLE001 - the failure rule: survive one read, report it
            self._loop.survived(self.component, sys.exc_info())
        self._activity()

    def _activity(self) -> None:
        """After a slice or a read: ``on_tick``, and the next tick armed."""
        if not self._ticks or self.actor_stopped.is_set():
            return
        try:
            self.on_tick()
        except Exception:  # noqa: BLE001 - the failure rule: survive one tick, report it
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
        if self._supervisor is not None:  # stopped while the service runs: it died
            self._supervisor.died(self.component)

    def mailbox_depth(self) -> int:
        """Messages waiting in its inbox. Safe from any thread (the length of
        a deque): how the metrics thread sees a backlog without touching the
        actor."""
        return len(self.actor_inbox)

    def alive(self) -> bool:
        """Its loop runs and it has not stopped. Safe from any thread (a thread's
        liveness and a stop flag)."""
        return self._loop.alive() and not self.actor_stopped.is_set()

    def join(self, timeout: float = 10.0) -> None:
        """Wait until the actor has left its loop (and a private loop ended)."""
        self._detached.wait(timeout)
        if self._own_loop:
            self._loop.stop(timeout)

    def in_place(self) -> bool:
        """In a ``burst`` on this actor's loop thread: True if the caller may
        handle a told message of this actor itself, now (the writer's commands
        and events). The burst holds the actor by its scheduling token, as its
        own slice would, from the first such message (decided once:
        ``held_by``) until the burst ends, then ends the slice (``on_tick``;
        mail that came meanwhile next). False (tell it) if the actor is not
        idle (mail queued or gathered, running, stopped) or on another loop,
        and for what follows mail reaching a held actor's inbox (a nested
        burst's bundle, a tell, another thread's put). Its handler's errors
        are the caller's to survive, as a told message's (``survived``)."""
        pending = getattr(bursts, "pending", None)
        if pending is self.held_by:  # held by this burst: unless mail was queued meanwhile
            return not self.mail  # (it goes first)
        if pending is None or self in pending:  # (gathered: it goes first)
            return False
        inbox = self.actor_inbox
        if (self.actor_stopped.is_set() or not inbox.bound() or not self._loop.in_loop()
                or not inbox.take()):
            return False
        if inbox.queue:  # (a put racing the token from another thread): a slice of it
            self._loop.schedule(self)
            return False
        pending[self] = HELD
        self.held_by = pending
        return True

    def tell(self, message: Any) -> None:
        """Thread-safe: queue a message for this actor (gathered in a ``burst``)."""
        pending = getattr(bursts, "pending", None)
        if pending is None:
            tell(self.actor_ref, message)
            return
        messages = pending.get(self)
        if messages is None:
            pending[self] = [message]
        elif messages is HELD:  # held by this burst: into its inbox, run when it ends
            tell(self.actor_ref, message)
        else:
            messages.append(message)
