"""The one store writer: group commit, then the effects the commit made true.

Every write in the service is a message to this actor. It drains its whole
inbox, applies every message in one LMDB write transaction, commits (one
sync for the batch) and only then runs each message's ``after`` callbacks:
the intake reply, the command sends, the event publications. So nothing
leaves the service before the state that justifies it is durable.

Writes for the same order in one batch coalesce naturally: each ``put``
overwrites the previous one in the transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import lmdb

from actors.loop import LoopActor, burst
from oms.metrics import Metrics
from oms.store import Created, Store

logger = logging.getLogger(__name__)

Callback = Callable[[], None]


class CreateOrder(NamedTuple):
    """Store a new order unless its source_system + external_id is known.

    build: makes the Order for a fresh order id.
    done: called after the commit with the ``Created`` outcome.
    """

    source_system: str
    external_id: str
    digest: bytes
    build: Callable[[str], Any]
    done: Callable[[Created], None]
    vshard: int | None = None  # a shard process: the order's virtual shard (its id ends in it)


class SaveOrder(NamedTuple):
    """Store an order's new snapshot.

    record: the encoded snapshot.
    active: False once the order is finished (drops it from recovery).
    consumed: inbox keys of domain events this snapshot has taken in.
    after: run in order once the snapshot is durable.
    """

    order_id: str
    record: bytes
    active: bool
    consumed: tuple[bytes, ...]
    after: tuple[Callback, ...]


class RecordEvent(NamedTuple):
    """Record a domain event once; ``done(outcome)`` after the commit."""

    order_id: str
    system: str
    event_id: str
    event: dict[str, Any]
    done: Callable[[str], None]


class Barrier(NamedTuple):
    """Runs ``done`` after everything queued before it is durable."""

    done: Callback


class StoreWriter(LoopActor):
    thread_name = "store-writer"

    def __init__(self, store: Store, metrics: Metrics) -> None:
        super().__init__()
        self.store = store
        self.metrics = metrics

    def on_batch(self, envelopes: list[Any]) -> None:
        work = [e.message for e in envelopes if isinstance(e.message, _WRITES)]
        others = [e for e in envelopes if not isinstance(e.message, _WRITES)]
        if work:
            self.commit(work)
        super().on_batch(others)

    def commit(self, work: list[Any]) -> None:
        started = time.perf_counter()
        while True:
            try:
                outcomes = self._apply(work)
                break
            except lmdb.MapFullError:
                self.store.grow()
                self.metrics.store_grows.inc()
        self.metrics.commit_latency.observe(time.perf_counter() - started)
        self.metrics.commit_batch.observe(len(work))
        with burst():  # one Bundle per gateway, publisher and endpoint
            for msg, outcome in zip(work, outcomes, strict=True):
                self._after(msg, outcome)

    def _apply(self, work: list[Any]) -> list[Any]:
        store = self.store
        outcomes: list[Any] = []
        with store.write() as txn:
            for msg in work:
                try:
                    outcomes.append(self._apply_one(txn, msg))
                except lmdb.MapFullError:
                    raise
                except Exception as exc:  # one bad write must not fail the batch
                    logger.exception("store write failed for %s", type(msg).__name__,
                                     extra={"order_id": getattr(msg, "order_id", None)})
                    outcomes.append(exc)
        return outcomes

    def _apply_one(self, txn: lmdb.Transaction, msg: Any) -> Any:
        store = self.store
        if isinstance(msg, SaveOrder):
            store.put_order(txn, msg.order_id, msg.record, msg.active, msg.consumed)
        elif isinstance(msg, CreateOrder):
            return store.create_order(txn, msg.source_system, msg.external_id, msg.digest,
                                      msg.build, msg.vshard)
        elif isinstance(msg, RecordEvent):
            return store.record_event(txn, msg.order_id, msg.system, msg.event_id, msg.event)
        return None

    def _after(self, msg: Any, outcome: Any) -> None:
        try:
            if isinstance(outcome, Exception):
                if isinstance(msg, CreateOrder):
                    msg.done(Created("error", "", ""))
                elif isinstance(msg, RecordEvent):
                    msg.done("error")
                return  # a snapshot that was not stored: its effects must not happen
            if isinstance(msg, SaveOrder):
                for callback in msg.after:
                    callback()
            elif isinstance(msg, CreateOrder | RecordEvent):
                msg.done(outcome)
            else:
                msg.done()
        except Exception:
            logger.exception("post-commit callback failed for %s", type(msg).__name__)


_WRITES = (SaveOrder, CreateOrder, RecordEvent, Barrier)
