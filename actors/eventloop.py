"""The event loop: one thread that runs every actor of a service process.

A service process runs one ``EventLoop``. Its thread polls, with one
``zmq.Poller``, every ZeroMQ socket the process reads (each registered by
the actor that owns it, ``add_reader``) plus one eventfd, the *wake-up fd*,
that other threads raise when they hand the loop work (a ``tell`` to an
actor on the loop, a ``call_soon``). Actors are not threads: an actor with
mail is a *runnable* in the loop's run queue, and the loop calls its
``_run_slice(budget)``.

A turn of the loop, bounded in every step:

1. poll the sockets and the wake-up fd (timeout 0 if work is queued, else
   until the next timer, at most ``IDLE_POLL_S``);
2. take in work from other threads (calls, scheduled runnables);
3. read each ready socket (its owner's reader drains a bounded number of
   frames);
4. fire the timers that are due (at most ``TIMERS_PER_TURN``; monotonic
   clock);
5. run the runnables queued so far, each for at most ``budget`` messages
   (what they schedule meanwhile waits for the next round);
6. run the *turn-end* runnables (the store writer: one group commit for
   everything the turn produced);
7. run one more round of the runnables queued by then (the post-commit
   effects: command sends, event publications, replies);
8. observe the turn's duration (``oms_loop_turn_seconds``).

Held runnables (``hold``): an idle order actor that took mail in place
(``actors.pool.PooledActor.hold``) has its slice ended at the end of the
phase (steps 2 to 4, then each round), in ``around_held`` (``actors.loop.burst``:
the saves go to the store writer as one bundle); an error there is fatal.

Failure rule (docs/architecture.md, "Failure rule"): a callback that raises
(a reader, a timer, a call) is reported to the supervisor as ``survived``
(logged with its traceback, counted) and the loop goes on. A runnable whose
``_run_slice`` raises has broken the runtime's contract (actors contain
their own handlers' errors), and so has the loop itself if it raises: the
loop reports ``died`` (the service exits 70) and its thread ends. Never a
dead loop in a live process.

Asks and the loop: the loop thread must never block. A ``get()`` on a
pending future from the loop thread raises ``LoopBlocked`` at once (it
would deadlock if the answer had to come from an actor of the same loop).
From the loop, use ``tell``, or hand a callback to the other actor.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import zmq

logger = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # the longest a poll waits with nothing due
TIMERS_PER_TURN = 64  # each may load an order from the store: a bounded turn
SLICE_BUDGET = 64  # messages per runnable per round (as the old dispatcher)


class Runnable(Protocol):
    """Something the loop runs when it has mail (an actor on the loop)."""

    @property
    def turn_end(self) -> bool:
        """Run once per turn, after the others (the store writer's group commit)."""
        ...

    def _run_slice(self, budget: int) -> None: ...


class Supervision(Protocol):
    """Where the loop reports failures (``actors.supervision.Supervisor``)."""

    def survived(self, component: str, exc_info: Any = None) -> None: ...

    def died(self, component: str, exc_info: Any = None) -> None: ...


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


PROFILE_ENV = "OMS_PROFILE"
"""A performance engineer's switch, off by default: ``OMS_PROFILE=FILE``
runs the service's loop thread under ``cProfile`` and writes its stats to
FILE when the loop stops (``pstats`` reads them; docs/performance.md)."""


def _profiler(name: str) -> Any:
    if name != "loop" or not os.environ.get(PROFILE_ENV):
        return None
    import cProfile  # only when asked for

    profile = cProfile.Profile()
    profile.enable()
    return profile


class LoopBlocked(RuntimeError):
    """The loop thread asked to wait for something only the loop can do."""


class TimerHandle:
    """A timer armed with ``call_at``; ``cancel()`` it to drop it."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline, self.callback, self.cancelled = deadline, callback, False

    def cancel(self) -> None:
        self.cancelled = True


_on_loop = threading.local()


def current_loop() -> EventLoop | None:
    """The loop whose thread this is, or None on any other thread."""
    return getattr(_on_loop, "loop", None)


class EventLoop:
    """One thread polling sockets and running actors; see the module docstring."""

    around_held: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def __init__(self, name: str = "loop", *, supervisor: Supervision | None = None,
                 turn_seconds: Observer | None = None, budget: int = SLICE_BUDGET,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.supervisor = supervisor
        self.throughput = budget
        self._turn_seconds = turn_seconds
        self._clock = clock
        self._poller = zmq.Poller()
        self._readers: dict[Any, Callable[[Any], None]] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_armed = False
        self._poller.register(self._wake_fd, zmq.POLLIN)
        self._incoming: deque[Runnable] = deque()  # scheduled from other threads
        self._calls: deque[Callable[[], None]] = deque()  # call_soon, any thread
        self._runq: deque[Runnable] = deque()
        self._late: deque[Runnable] = deque()
        self._held: list[Any] = []  # held in this phase: their slices end at its end
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self.turns = 0  # turns begun: how an actor with a budget a turn knows a new turn
        self._stopping = False
        self._ident: int | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- life ----------------------------------------------------------------

    def start(self) -> EventLoop:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._ident

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after its current turn and wait for its thread
        (from the loop itself: ask it to end and return)."""
        self._stopping = True
        if self.in_loop():
            return
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- handing work to the loop (any thread) --------------------------------

    def schedule(self, runnable: Runnable) -> None:
        """Queue ``runnable`` to run (its inbox has mail). The caller makes
        sure a runnable is queued at most once at a time (its inbox's flag)."""
        if threading.get_ident() == self._ident:
            (self._late if runnable.turn_end else self._runq).append(runnable)
        else:
            self._incoming.append(runnable)
            self._wake()

    def hold(self, runnable: Any, token: threading.Lock) -> bool:
        """On the loop thread, take ``runnable``'s scheduling ``token``; its
        ``_end_held()`` runs at the phase's end. False if that cannot be."""
        if threading.get_ident() != self._ident or not token.acquire(False):
            return False
        self._held.append(runnable)
        return True

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop, in the next turn (thread-safe)."""
        self._calls.append(callback)
        if threading.get_ident() != self._ident:
            self._wake()

    def run_sync(self, callback: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``callback`` on the loop and return its result (or raise its
        error). From the loop thread itself it runs at once."""
        if self.in_loop():
            return callback()
        if not self._thread.is_alive():
            raise RuntimeError(f"loop {self.name} is not running")
        done = threading.Event()
        box: list[Any] = []

        def job() -> None:
            try:
                box.append((True, callback()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box.append((False, exc))
            finally:
                done.set()

        self.call_soon(job)
        if not done.wait(timeout):
            raise TimeoutError(f"loop {self.name} did not run the call within {timeout} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _wake(self) -> None:
        if not self._wake_armed:
            self._wake_armed = True
            os.eventfd_write(self._wake_fd, 1)

    # -- on the loop thread only ----------------------------------------------

    def add_reader(self, sock: Any, callback: Callable[[Any], None]) -> None:
        """Call ``callback(sock)`` in each turn in which ``sock`` has input."""
        self._readers[sock] = callback
        self._poller.register(sock, zmq.POLLIN)

    def remove_reader(self, sock: Any) -> None:
        if self._readers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` once the monotonic clock reaches ``deadline``."""
        handle = TimerHandle(deadline, callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), handle))
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(self._clock() + delay, callback)

    def time(self) -> float:
        """The loop's clock (monotonic)."""
        return self._clock()

    def backlog(self) -> int:
        """Runnables waiting to run (read at scrape time)."""
        return len(self._runq) + len(self._incoming) + len(self._late)

    # -- the loop ----------------------------------------------------------------

    def _main(self) -> None:
        self._ident = threading.get_ident()
        _on_loop.loop = self
        profile = _profiler(self.name)
        try:
            while not self._stopping:
                self._turn()
            if profile is not None:
                profile.disable()
                profile.dump_stats(os.environ[PROFILE_ENV])
        except BaseException:  # noqa: BLE001 - reported: the supervisor ends the process
            self._report_death(sys.exc_info())
            return
        finally:
            _on_loop.loop = None
        self._finish()

    def _turn(self) -> None:
        ready = self._poll(self._poll_timeout_ms())
        started = time.perf_counter()
        self.turns += 1
        self._take_in()
        for sock, _event in ready:
            reader = self._readers.get(sock)
            if reader is not None:
                self._guard(reader, sock)
        self._fire_timers()
        if self._held:
            self._end_held()
        self._round()
        if self._late:
            self._round(self._late)
        if self._runq:
            self._round()
        if self._turn_seconds is not None:
            self._turn_seconds.observe(time.perf_counter() - started)

    def _poll(self, timeout_ms: int) -> list[tuple[Any, int]]:
        try:
            return self._poller.poll(timeout_ms)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                return []
            raise

    def _poll_timeout_ms(self) -> int:
        if self._runq or self._late or self._incoming or self._calls or self._stopping:
            return 0
        wait = IDLE_POLL_S
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if timers:
            wait = min(wait, max(0.0, timers[0][0] - self._clock()))
        return math.ceil(wait * 1000)  # never early: a timer due in 0.2 ms waits 1 ms

    def _take_in(self) -> None:
        """Work handed over by other threads. Consume the fd first, then
        disarm (see ``actors.loop.SignalInbox.clear_signal``)."""
        if self._wake_armed:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)
            self._wake_armed = False
        incoming = self._incoming
        while incoming:
            runnable = incoming.popleft()
            (self._late if runnable.turn_end else self._runq).append(runnable)
        calls = self._calls
        for _ in range(len(calls)):
            self._guard(calls.popleft())

    def _fire_timers(self) -> None:
        timers, now = self._timers, self._clock()
        for _ in range(TIMERS_PER_TURN):
            if not timers or timers[0][0] > now:
                return
            handle = heapq.heappop(timers)[2]
            if not handle.cancelled:
                handle.cancelled = True  # fired: a late cancel() is harmless
                self._guard(handle.callback)

    def _round(self, queue: deque[Runnable] | None = None) -> None:
        """Run what is queued now; what gets queued meanwhile waits."""
        queue = self._runq if queue is None else queue
        budget = self.throughput
        for _ in range(len(queue)):
            queue.popleft()._run_slice(budget)  # raising here is fatal (see above)
        if self._held:
            self._end_held()

    def _end_held(self) -> None:
        """The end of a phase: the held slices end, in the order held."""
        with self.around_held():
            while self._held:
                held, self._held = self._held, []
                for runnable in held:
                    runnable._end_held()  # raising here is fatal (see above)

    def _guard(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - the failure rule: survive one, report it
            self.survived(self.name, sys.exc_info())

    def survived(self, component: str, exc_info: Any = None) -> None:
        """One callback or message failed; the loop goes on."""
        if self.supervisor is not None:
            self.supervisor.survived(component, exc_info or sys.exc_info())
        else:
            logger.error("%s: unexpected error; carrying on", component,
                         exc_info=exc_info or sys.exc_info())

    def _report_death(self, exc_info: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.died(self.name, exc_info)
        else:
            logger.critical("event loop %s died", self.name, exc_info=exc_info)

    def _finish(self) -> None:
        """After the last turn: calls queued meanwhile still run (a waiter of ``run_sync``
        is answered). The wake-up fd stays open until the loop is freed: another thread
        may still raise it, and a closed fd number can be reused by the next file opened."""
        self._take_in()

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._wake_fd)
