"""The one store writer: group commit, then the effects the commit made true.

Every write in the service is a message to this actor. It drains its whole
inbox, applies every message in one LMDB write transaction, commits (one
sync for the batch) and only then runs each message's effects
(``actors.effects``: data until then, run by ``actors.effects.run``): the
intake reply, the command sends, the event publications. So nothing leaves
the service before the state that justifies it is durable.

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
in the writer itself ends the process non-zero (``fatal``), after the batch's
waiters got their error, so a supervisor restarts it and recovery takes over
from the last durable snapshots. See docs/durability.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import lmdb

from actors import effects
from actors.effects import NewOrder, Origin
from actors.loop import LoopActor, burst
from actors.metrics import Metrics
from storage.records import Created
from storage.store import Store, StoreFull

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
    (The order actor hands over its slice's lists of both, and never
    touches them again: no copy a save.)
    origin: whose engine effects they are.
    listed: the order's previous write left it in the store's ``active``
      set (its actor's last snapshot was active, or it was loaded from
      there): an active snapshot then skips that put (``Store.put_order``).
    state: a finished order's state, as its record holds it, for the
      retention index (``Store.put_order``): None, read from the record.
    """

    order_id: str
    record: bytes
    active: bool
    consumed: tuple[bytes, ...] | list[bytes]
    effects: tuple[Any, ...] | list[Any]
    origin: Origin | None = None
    listed: bool = False
    state: str | None = None


class RecordEvent(NamedTuple):
    """Record a domain event once; ``answer`` gets the outcome after the commit.
    ``key``: its ``storage.records.event_key`` if the sender made it (b"":
    the store makes it)."""

    order_id: str
    system: str
    event_id: str
    event: dict[str, Any]
    answer: Any
    key: bytes = b""


class Barrier(NamedTuple):
    """Runs ``effects`` after everything queued before it is durable."""

    effects: tuple[Any, ...] | list[Any]
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


_WRITES = frozenset((SaveOrder, CreateOrder, RecordEvent, Barrier, Retire))
"""Exact types: the messages are NamedTuples, never subclassed."""


class StoreWriter(LoopActor):
    thread_name = "store-writer"
    turn_end = True  # on the loop: once per turn, after the actors (one group commit)
    # a Bundle of writes (the saves an event loop phase's order slices gathered,
    # 7.3 an order) comes into on_batch bare, not each wrapped in a ``Told``
    _bare = _WRITES

    def __init__(self, store: Store, metrics: Metrics,
                 fatal: Callable[[str], None] = exit_process) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics
        self.fatal = fatal
        self.held: list[Any] = []  # snapshots and barriers of failed commits, in order
        self.failing_since: float | None = None
        self.writable = threading.Event()  # clear while commits fail: readiness, any thread
        self.writable.set()
        self._last_try = 0.0
        self._failures = 0

    @property
    def healthy(self) -> bool:
        """False while commits fail (read by readiness and by the intake)."""
        return self.failing_since is None

    def on_batch(self, envelopes: list[Any]) -> None:
        work: list[Any] = []
        others: list[Any] = []
        writes = _WRITES
        for e in envelopes:  # one pass: 20 writes an order come through here
            if type(e) in writes:  # bare, out of a Bundle (``_bare``)
                work.append(e)
            elif type(e.message) in writes:
                work.append(e.message)
            else:
                others.append(e)
        if work or self.held:
            if self.failing_since is not None and time.monotonic() - self._last_try < RETRY_S:
                self._refuse(work)  # not tried yet: the next attempt is due soon
            else:
                self.commit(work)
        super().on_batch(others)

    def poll_timeout(self) -> float | None:
        return RETRY_S * 1000 if self.held or self.failing_since is not None else None

    def on_tick(self) -> None:
        if self.failing_since is not None and time.monotonic() - self._last_try >= RETRY_S:
            self.commit([])

    def commit(self, work: list[Any]) -> None:
        """Held writes first, then ``work``; at most ``batch_limit`` writes per
        transaction (held writes pile up while the disk is full), in order.
        After a failed transaction the rest is not tried: it is refused or held."""
        work, self.held = self.held + work, []
        self._last_try = time.monotonic()
        limit = self.batch_limit
        for start in range(0, len(work) or 1, limit):
            if not self._commit_one(work[start:start + limit]):
                self._refuse(work[start + limit:])
                return

    def _commit_one(self, work: list[Any]) -> bool:
        """One transaction; True once it is durable and its effects ran."""
        started = time.perf_counter()
        try:
            outcomes = self._commit(work)
        except (lmdb.Error, StoreFull, OSError) as exc:
            if isinstance(exc, lmdb.PanicError):
                self._refuse(work)
                self.fatal(f"LMDB panic: {exc}")
                return False
            self._failed(work, exc)
            return False
        except Exception as exc:  # a bug in the writer itself: never a dead writer
            logger.exception("store writer failed")
            self._refuse(work)
            self.fatal(f"{type(exc).__name__}: {exc}")
            return False
        if self.failing_since is not None:
            logger.warning("store writes work again after %.1f s and %d failed commits",
                           time.monotonic() - self.failing_since, self._failures)
            self.failing_since, self._failures = None, 0
            self.writable.set()
            self.metrics.store_failing.set(0)
        self.metrics.commit_latency.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(work))
        run_all = effects.run_all
        with burst():  # one Bundle per gateway, publisher and endpoint
            for msg, outcome in zip(work, outcomes, strict=True):
                if outcome is None and type(msg) is SaveOrder:  # stored: its effects
                    failed = run_all(msg.effects, msg.origin)  # after a failure, no more
                    if failed is not None:
                        self._effect_failed(msg, failed)
                else:
                    self._after(msg, outcome)
        return True

    def _commit(self, work: list[Any]) -> list[Any]:
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
            self.writable.clear()
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
            put_order = store.put_order
            for msg in work:
                try:
                    if type(msg) is SaveOrder:  # most writes (7.3 an order), inline
                        put_order(txn, msg.order_id, msg.record, msg.active, msg.consumed,
                                  msg.listed, msg.state)
                        outcomes.append(None)
                    else:
                        outcomes.append(self._apply_one(txn, msg))
                except lmdb.BadValsizeError as exc:  # this write alone cannot be stored
                    logger.exception("store write failed for %s", type(msg).__name__,
                                     extra={"order_id": getattr(msg, "order_id", None)})
                    self._unlist(msg)
                    outcomes.append(exc)
                except lmdb.Error:  # the store itself: the whole batch fails
                    raise
                except Exception as exc:  # one bad write must not fail the batch
                    logger.exception("store write failed for %s", type(msg).__name__,
                                     extra={"order_id": getattr(msg, "order_id", None)})
                    self._unlist(msg)
                    self.metrics.internal_errors.labels("writer").inc()
                    outcomes.append(exc)
        return outcomes

    def _unlist(self, msg: Any) -> None:
        """A write failed alone (the rest of its transaction goes on). If it
        was a snapshot, it may have been the one that put its order in the
        active set: its order's next snapshots put it there again, whatever
        their ``listed`` says (``Store.unlisted``)."""
        if type(msg) is SaveOrder and isinstance(msg.order_id, str):
            self.store.unlisted.add(msg.order_id.encode(errors="surrogatepass"))

    def _apply_one(self, txn: lmdb.Transaction[bytes], msg: Any) -> Any:
        store = self.store
        if isinstance(msg, SaveOrder):  # (``_apply`` stores most of them itself)
            store.put_order(txn, msg.order_id, msg.record, msg.active, msg.consumed,
                            msg.listed, msg.state)
        elif isinstance(msg, CreateOrder):
            return store.create_order(txn, msg.source_system, msg.external_id, msg.digest,
                                      msg.build, msg.vshard)
        elif isinstance(msg, RecordEvent):
            return store.record_event(txn, msg.order_id, msg.system, msg.event_id, msg.event,
                                      msg.key)
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
            failed = effects.run_all(msg.effects, msg.origin)  # after a failure, no more
            if failed is not None:
                self._effect_failed(msg, failed)
        else:
            self._run(msg.answer, None, outcome)

    def _effect_failed(self, msg: SaveOrder | Barrier, failed: tuple[Any, Exception]) -> None:
        effects.report_failed(failed, msg.origin, self.metrics, getattr(msg, "order_id", None))

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
