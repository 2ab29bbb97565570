"""The commit thread: the store writer's LMDB write transactions, off the loop.

The store writer (``actors.store_writer``) decides on the loop what goes
into a group commit and runs the effects once it is durable; this thread
only carries out the transaction: the puts, the dedup reads of creates, the
commit and its sync (LMDB binds a write transaction to the thread that
opened it, so all of it happens here). So the loop keeps reading sockets
and running actors, and builds the next batch, while the disk syncs.

One batch at a time: ``submit`` hands over a batch only when the previous
one's ``Committed`` has been taken (the writer keeps that rule), so batches
commit in order. The outcome goes to a deque the writer drains on the loop
(``results``), and the loop is woken (``EventLoop.call_soon``).

Failure rule: an error of the transaction (LMDB, a full disk, a bug in the
writer's code) is handed to the loop as the batch's outcome (the writer
holds, refuses or exits 70). If this thread ends any other way while the
service runs, it has died: the supervisor in charge (``actors.supervision``)
or, without one, ``fatal`` ends the process with status 70. Never a dead
commit thread in a live process.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from actors import supervision

logger = logging.getLogger(__name__)


class Committed(NamedTuple):
    """A batch's outcome: per-write outcomes, or the error that failed it all."""

    work: list[Any]
    outcomes: list[Any] | None
    error: Exception | None
    seconds: float  # the transaction, sync included


class CommitThread:
    """One thread that runs ``apply(work)`` for one batch at a time."""

    def __init__(self, name: str, apply: Callable[[list[Any]], list[Any]],
                 wake: Callable[[], None], fatal: Callable[[str], None]) -> None:
        self.name = name
        self._apply = apply
        self._wake = wake  # called after each outcome (any thread may call it)
        self._fatal = fatal
        self._supervisor = supervision.current()
        self._cond = threading.Condition()
        self._work: list[Any] | None = None
        self._stopping = False
        self.results: deque[Committed] = deque()
        self._thread = threading.Thread(target=self._supervised, name=name, daemon=True)

    def start(self) -> CommitThread:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, work: list[Any]) -> None:
        """Commit ``work`` (the previous batch's outcome has been taken)."""
        with self._cond:
            if self._work is not None:
                raise RuntimeError("a batch is already committing")
            self._work = work
            self._cond.notify()

    def wait(self, timeout: float) -> bool:
        """Block until an outcome is in ``results`` (stop's drain only)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.results), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """After the batch in hand (the writer drains first); waits for the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def run(self, work: list[Any]) -> Committed:
        """One transaction on the calling thread (the commit thread's, or the
        loop's for a small batch: ``StoreWriter.INLINE_MAX``)."""
        started = time.perf_counter()
        try:
            return Committed(work, self._apply(work), None, time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - the writer decides on the loop
            return Committed(work, None, exc, time.perf_counter() - started)

    def _main(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._work is None and not self._stopping:
                    cond.wait()
                work = self._work
                if work is None:
                    return  # stopping, nothing in hand
            done = self.run(work)
            with cond:
                self._work = None
                self.results.append(done)
                cond.notify_all()
            self._wake()

    def _supervised(self) -> None:
        try:
            self._main()
        except BaseException:  # noqa: BLE001 - reported: the process ends
            self._died(sys.exc_info())
            return
        if not self._stopping:
            self._died(None)

    def _died(self, exc_info: Any) -> None:
        if self._supervisor is not None:  # it logs and ends the process (status 70)
            self._supervisor.died(self.name, exc_info)
            return
        logger.critical("%s died", self.name, exc_info=exc_info)
        self._fatal(f"the commit thread {self.name} died")
