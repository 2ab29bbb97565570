"""The one store writer: group commit, then the effects the commit made true.

Every write in the service is a message to this actor (on the loop, once
per turn, after the other actors). It gathers its inbox into a batch, has
every message applied in one LMDB write transaction, committed (one sync for
the batch), and only then runs each message's effects on the loop, in order
(``actors.effects``: data until then, run by ``actors.effects.run``): the
intake reply, the command sends, the event publications. So nothing leaves
the service before the state that justifies it is durable.

Where the transaction runs: a batch of more than ``INLINE_MAX`` writes (the
service is busy) goes to the commit thread (``actors.committer``), so the
loop keeps reading sockets and running actors, and gathers the next batch,
while the disk syncs; a smaller batch commits on the loop, where it costs
less than the hand-off (docs/performance.md). Either way one batch commits
at a time, batches commit in order, and the effects of one batch run before
those of the next. Stop drains: what was queued is committed and its effects
run before the commit thread ends.

Writes for the same order in one batch coalesce naturally: each ``put``
overwrites the previous one in the transaction.

A commit that fails (disk full, the map at its ``max_map_size`` cap, an I/O
error) acknowledges nothing and runs no effect of its batch. What a client
can simply send again is refused at once: a create gets ``Created("unavailable")``
(the intake answers ``error`` ``unavailable``), a domain event ``"error"`` (not
acknowledged; the domain system resends). Order snapshots and barriers are
*held*, in order, with their effects unrun, and tried again (with whatever
came since) every ``RETRY_S``: an order's effects run only once its snapshot
is durable, however late. While commits fail, ``healthy`` is False (the
service is not ready) and new creates are refused before they reach the
writer. An LMDB panic (the environment is unusable) or an unexpected error
in the writer itself (on either thread) ends the process non-zero
(``fatal``), after the batch's waiters got their error, so a supervisor
restarts it and recovery takes over from the last durable snapshots; so does
a commit thread that ends (``actors.committer``). See docs/durability.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import lmdb

from actors import effects
from actors.committer import Committed, CommitThread
from actors.effects import NewOrder, Origin
from actors.loop import LoopActor, burst
from actors.metrics import Metrics
from storage.store import Created, Store, StoreFull

logger = logging.getLogger(__name__)

RETRY_S = 0.5  # how often held writes are tried again while commits fail
FATAL_EXIT = 70  # EX_SOFTWARE


def exit_process(reason: str) -> None:
    """The writer cannot go on: end the whole process at once, non-zero."""
    logger.critical("store writer cannot continue, exiting: %s", reason)
    logging.shutdown()
    os._exit(FATAL_EXIT)


class CreateOrder(NamedTuple):
    """Store a new order unless its source_system + external_id is known.

    build: makes the Order for a fresh order id (``actors.effects.NewOrder``).
    answer: the effect run after the commit with the ``Created`` outcome.
    """

    source_system: str
    external_id: str
    digest: bytes
    build: NewOrder | Callable[[str], Any]
    answer: Any
    vshard: int | None = None  # a shard process: the order's virtual shard (its id ends in it)


class SaveOrder(NamedTuple):
    """Store an order's new snapshot.

    record: the encoded snapshot.
    active: False once the order is finished (drops it from recovery).
    consumed: inbox keys of domain events this snapshot has taken in.
    effects: run in order once the snapshot is durable (``actors.effects``).
    origin: whose engine effects they are.
    """

    order_id: str
    record: bytes
    active: bool
    consumed: tuple[bytes, ...]
    effects: tuple[Any, ...]
    origin: Origin | None = None


class RecordEvent(NamedTuple):
    """Record a domain event once; ``answer`` gets the outcome after the commit."""

    order_id: str
    system: str
    event_id: str
    event: dict[str, Any]
    answer: Any


class Barrier(NamedTuple):
    """Runs ``effects`` after everything queued before it is durable."""

    effects: tuple[Any, ...]
    origin: Origin | None = None


class Retire(NamedTuple):
    """Retention: delete orders already appended to the archive, record the
    archive files' new committed lengths, and drop dedup entries past their
    window (``Store.retire``); ``answer`` gets moved or "stale" or an error."""

    lengths: dict[str, tuple[int, int]]
    orders: list[tuple[bytes, bytes, str, int, str, bytes]]
    expired: list[bytes]
    answer: Any
    backfill: tuple[Any, ...] = ()


class StoreWriter(LoopActor):
    thread_name = "store-writer"
    turn_end = True  # on the loop: once per turn, after the actors (one group commit)
    INLINE_MAX = 64  # a batch this small commits on the loop (cheaper than the hand-off)

    def __init__(self, store: Store, metrics: Metrics,
                 fatal: Callable[[str], None] = exit_process) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics
        self.fatal = fatal
        self.held: list[Any] = []  # snapshots and barriers of failed commits, in order
        self.queued: list[Any] = []  # writes for the next batch (one batch commits at a time)
        self.committing: list[Any] | None = None  # the batch at the commit thread
        self.failing_since: float | None = None
        self._last_try = 0.0
        self._failures = 0
        self._committer: CommitThread | None = None

    def on_start(self) -> None:
        loop = self._loop
        self._committer = CommitThread("store-commit", self._commit,
                                       lambda: loop.call_soon(self._woken), self.fatal).start()

    def on_stop(self) -> None:
        """Stop drains: what was queued is committed (or held, if commits fail)
        and its effects run, before the commit thread ends."""
        committer = self._committer
        if committer is None:
            return
        self._next()
        while self.committing is not None:
            while not committer.results and committer.alive():
                committer.wait(1.0)
            if not committer.results:
                break  # it died: the supervisor ends the process
            self._reap()
        committer.stop()

    def alive(self) -> bool:
        """The actor and its commit thread."""
        return super().alive() and self._committer is not None and self._committer.alive()

    @property
    def healthy(self) -> bool:
        """False while commits fail (read by readiness and by the intake)."""
        return self.failing_since is None

    def on_batch(self, envelopes: list[Any]) -> None:
        work = [e.message for e in envelopes if isinstance(e.message, _WRITES)]
        others = [e for e in envelopes if not isinstance(e.message, _WRITES)]
        self.queued += work
        self._reap()  # a batch that finished during this turn: its effects, and the next
        self._next()
        super().on_batch(others)

    def poll_timeout(self) -> float | None:
        return RETRY_S * 1000 if self.held or self.failing_since is not None else None

    def on_tick(self) -> None:
        if self.failing_since is not None and time.monotonic() - self._last_try >= RETRY_S:
            self._next(probe=True)

    def _next(self, probe: bool = False, inline: bool = True) -> None:
        """Commit the next batch unless one is committing: held writes first,
        then what was queued, at most ``batch_limit`` (held writes pile up
        while the disk is full), in order. A batch of more than ``INLINE_MAX``
        writes goes to the commit thread; a smaller one (the service is not
        busy) commits here, on the loop, and its effects run at once
        (``inline``: allowed; False while an earlier batch's effects are still
        to run). While commits fail and the next attempt is not due, the
        queued writes are refused or held at once. ``probe``: try even with
        nothing to write."""
        if self.committing is not None or not (self.queued or self.held or probe):
            return
        small = len(self.held) + len(self.queued) <= self.INLINE_MAX
        if small and not inline:
            return  # after the earlier batch's effects
        if self.failing_since is not None and time.monotonic() - self._last_try < RETRY_S:
            work, self.queued = self.queued, []
            self._refuse(work)  # not tried yet: the next attempt is due soon
            return
        work, self.held = self.held + self.queued, []
        limit = self.batch_limit
        self.committing, self.queued = work[:limit], work[limit:]
        self._last_try = time.monotonic()
        assert self._committer is not None
        if small:
            self.commit(self._committer.run(self.committing))
        else:
            self._committer.submit(self.committing)

    def _woken(self) -> None:
        """The commit thread has an outcome (a loop call): take it, then the
        retry tick is armed if commits now fail."""
        if not self.actor_stopped.is_set():
            self._reap()
            self._activity()

    def _reap(self) -> None:
        """On the loop: the committed batch's outcome (``commit``)."""
        committer = self._committer
        while committer is not None and committer.results:
            self.commit(committer.results.popleft())

    def commit(self, done: Committed) -> None:
        """A batch's outcome, on the loop. Durable: the next batch goes to the
        commit thread, then this one's effects run, in order. Failed: nothing
        of it (nor of what was queued behind it) is acknowledged; see
        ``_commit_one``."""
        self.committing = None
        if done.error is not None:
            self._commit_one(done.work, done.error)
            return
        if self.failing_since is not None:
            logger.warning("store writes work again after %.1f s and %d failed commits",
                           time.monotonic() - self.failing_since, self._failures)
            self.failing_since, self._failures = None, 0
            self.metrics.store_failing.set(0)
        self.metrics.commit_latency.observe(done.seconds)
        self.metrics.commit_batch.observe(len(done.work))
        self._next(inline=False)  # a big next batch commits while these effects run
        assert done.outcomes is not None
        with burst():  # one Bundle per gateway, publisher and endpoint
            for msg, outcome in zip(done.work, done.outcomes, strict=True):
                self._after(msg, outcome)
        self._next()

    def _commit_one(self, work: list[Any], exc: Exception) -> None:
        """A failed transaction: a full disk or an I/O error holds and retries
        (``_failed``); an LMDB panic or a bug of the writer answers the
        batch's waiters, then ends the process (``fatal``)."""
        rest, self.queued = self.queued, []
        if isinstance(exc, lmdb.PanicError):
            self._refuse(work + rest)
            self.fatal(f"LMDB panic: {exc}")
        elif isinstance(exc, lmdb.Error | StoreFull | OSError):
            self._failed(work, exc)
            self._refuse(rest)
        else:  # a bug in the writer itself: never a dead writer
            logger.error("store writer failed", exc_info=exc)
            self._refuse(work + rest)
            self.fatal(f"{type(exc).__name__}: {exc}")

    def _commit(self, work: list[Any]) -> list[Any]:
        """On the commit thread: one transaction, grown as needed."""
        while True:
            try:
                return self._apply(work)
            except lmdb.MapFullError:
                self.store.grow()  # StoreFull at the cap
                self.metrics.store_grows.inc()

    def _failed(self, work: list[Any], exc: BaseException) -> None:
        """Nothing of this batch is durable: refuse what can be resent, hold the rest."""
        self.metrics.store_commit_errors.inc()
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.metrics.store_failing.set(1)
            logger.error("store commit failed; nothing of the batch is acknowledged, "
                         "snapshots are held and retried every %.1f s: %s", RETRY_S, exc,
                         exc_info=exc)
        elif self._failures % 60 == 0:
            logger.error("store commits still fail (%d failures in %.0f s, %d writes held): "
                         "%s", self._failures, time.monotonic() - self.failing_since,
                         len(self.held) + len(work), exc)
        self._refuse(work)

    def _refuse(self, work: list[Any]) -> None:
        """After a failed commit: creates and events get their error now;
        snapshots and barriers are held for the next attempt."""
        with burst():
            for msg in work:
                if isinstance(msg, SaveOrder | Barrier):
                    self.held.append(msg)
                    continue
                if isinstance(msg, CreateOrder):
                    self._run(msg.answer, None, Created("unavailable", "", ""))
                elif isinstance(msg, RecordEvent):
                    self._run(msg.answer, None, "error")

    def _apply(self, work: list[Any]) -> list[Any]:
        store = self.store
        outcomes: list[Any] = []
        with store.write() as txn:
            if not work:  # a retry with nothing held: a real write, or it proves nothing
                store.probe(txn)
            for msg in work:
                try:
                    outcomes.append(self._apply_one(txn, msg))
                except lmdb.BadValsizeError as exc:  # this write alone cannot be stored
                    logger.exception("store write failed for %s", type(msg).__name__,
                                     extra={"order_id": getattr(msg, "order_id", None)})
                    outcomes.append(exc)
                except lmdb.Error:  # the store itself: the whole batch fails
                    raise
                except Exception as exc:  # one bad write must not fail the batch
                    logger.exception("store write failed for %s", type(msg).__name__,
                                     extra={"order_id": getattr(msg, "order_id", None)})
                    self.metrics.internal_errors.labels("writer").inc()
                    outcomes.append(exc)
        return outcomes

    def _apply_one(self, txn: lmdb.Transaction[bytes], msg: Any) -> Any:
        store = self.store
        if isinstance(msg, SaveOrder):
            store.put_order(txn, msg.order_id, msg.record, msg.active, msg.consumed)
        elif isinstance(msg, CreateOrder):
            return store.create_order(txn, msg.source_system, msg.external_id, msg.digest,
                                      msg.build, msg.vshard)
        elif isinstance(msg, RecordEvent):
            return store.record_event(txn, msg.order_id, msg.system, msg.event_id, msg.event)
        elif isinstance(msg, Retire):
            return store.retire(txn, msg.lengths, msg.orders, msg.expired, msg.backfill)
        return None

    def _after(self, msg: Any, outcome: Any) -> None:
        """After the commit: the message's effects, or its answer."""
        if isinstance(outcome, Exception):
            if isinstance(msg, CreateOrder):
                self._run(msg.answer, None, Created("error", "", ""))
            elif isinstance(msg, RecordEvent | Retire):
                self._run(msg.answer, None, "error")
            return  # a snapshot that was not stored: its effects must not happen
        if isinstance(msg, SaveOrder | Barrier):
            order_id = getattr(msg, "order_id", None)
            for effect in msg.effects:  # in order; after a failure the rest are not run
                if not self._run(effect, msg.origin, None, order_id):
                    return
        else:
            self._run(msg.answer, None, outcome)

    def _run(self, effect: Any, origin: Origin | None, outcome: Any,
             order_id: str | None = None) -> bool:
        """One effect (``actors.effects.run``); a failure is logged with the
        effect's type and order id, and counted."""
        try:
            effects.run(effect, origin, outcome)
        except Exception:
            logger.exception("post-commit effect %s failed",
                             effects.describe(effect, origin, order_id))
            self.metrics.internal_errors.labels("writer").inc()
            return False
        return True


_WRITES = (SaveOrder, CreateOrder, RecordEvent, Barrier, Retire)
