"""Retention: finished orders leave the live store for the archive.

One thread, ``retention``. Every ``retention_interval_s`` it takes at most
``retention_batch`` orders that finished more than ``retention_s`` ago (the
``done`` index, oldest first: never a scan of the store), appends their
final views to the day's archive file (``storage.archive``), flushes and fsyncs,
and only then asks the store writer to delete them (``Retire``): a small
write in the writer's next group commit, among the service's own. The same
transaction records the file's new committed length, so a crash anywhere
loses and duplicates nothing (see ``storage.archive``). It also drops the
``source_system + external_id`` entries of archived orders whose
``dedup_window_s`` has passed.

Errors are contained: a batch that fails (disk full, an unreadable record)
is logged and counted (``oms_retention_errors_total``) and tried again after
a back-off; orders simply stay live meanwhile, and the
``OmsRetentionBehind`` alert fires if that lasts. The thread never dies
while the service runs: anything else it cannot handle ends the process
(the one failure rule).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from typing import Any

from actors.effects import Collect, Wake
from actors.metrics import Metrics
from actors.ports import Writer
from actors.store_writer import Barrier, Retire
from oms import snapshot
from oms.config import Config, ConfigError
from storage import archive
from storage.records import CorruptRecord, ext_key, record_digest
from storage.store import Store

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
RETIRE_PART = 512  # orders the writer retires in one commit (one loop turn) at most


def check_settings(cfg: Config) -> None:
    """Every retention number from outside is checked before the service starts."""
    for name in ("retention_s", "dedup_window_s"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be a number of seconds >= 0 (0 = "
                              f"{'keep forever' if name == 'retention_s' else 'no window'}), "
                              f"not {value!r}")
    if not 1 <= cfg.retention_batch <= 10_000:
        raise ConfigError(f"retention_batch must be 1 to 10000, not {cfg.retention_batch}")
    if not (math.isfinite(cfg.retention_interval_s) and 0.001 <= cfg.retention_interval_s
            <= 3600):
        raise ConfigError("retention_interval_s must be 0.001 to 3600 seconds, not "
                          f"{cfg.retention_interval_s!r}")


class Retention:
    def __init__(self, store: Store, writer: Writer, metrics: Metrics, cfg: Config) -> None:
        check_settings(cfg)
        self.store, self.writer, self.metrics = store, writer, metrics
        self.retention_s = cfg.retention_s
        self.dedup_window_s = cfg.dedup_window_s
        self.batch = cfg.retention_batch
        self.interval_s = cfg.retention_interval_s
        self._since_ms = int(time.time() * 1000)  # finishes from now on are indexed
        self._backfill_until: bytes | None = None  # the last order before this start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        self._backfill_until = self.store.last_order_key()
        cut = archive.repair(self.store.path, self.store.archive_lengths(), self._all_live)
        for what in cut:  # a crash between an archive write and its commit
            logger.warning("archive: cut an uncommitted tail: %s", what)
        self._thread.start()  # with retention_s 0 it still ends dedup windows that run out
        if self.retention_s > 0:
            logger.info("retention: finished orders older than %g s go to %s, %d per %g s",
                        self.retention_s, archive.folder(self.store.path), self.batch,
                        self.interval_s)
        else:
            logger.info("retention off (retention_s 0): finished orders stay in the live store")

    def _all_live(self, order_ids: list[str]) -> bool:
        """Every one of these orders is in the live store (``archive.repair``)."""
        with self.store.read() as txn:
            for order_id in order_ids:
                try:
                    if self.store.load(txn, order_id) is None:
                        return False
                except CorruptRecord:
                    pass  # its record is there, unreadable: still live
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        delay, backoff = self.interval_s, self.interval_s
        try:
            while not self._stop.wait(delay):
                try:
                    self.sweep()
                    delay = backoff = self.interval_s
                except Exception as exc:  # contained: the orders stay live, try again later
                    self.metrics.retention_errors.inc()
                    logger.exception("retention batch failed (orders stay live; next try in "
                                     "%.1f s): %s", backoff, exc)
                    delay, backoff = backoff, min(MAX_BACKOFF_S, backoff * 2)
        except BaseException:  # never a dead thread in a live process
            logger.critical("retention thread failed; exiting", exc_info=True)
            logging.shutdown()
            os._exit(70)

    def sweep(self, now: float | None = None) -> int:
        """One batch (``retention_batch`` orders at most), handed to the
        writer in parts of at most ``RETIRE_PART``, each archived and
        committed before the next is read: the writer deletes a part in one
        loop turn, so a turn never grows with the batch. Returns how many
        orders left the live store."""
        now = time.time() if now is None else now
        moved, left = 0, self.batch
        while left > 0:
            part = min(left, RETIRE_PART)
            done = self._part(now, part)
            if done is None:
                break  # nothing (more) to do
            moved += done
            left -= part
        return moved

    def _part(self, now: float, limit: int) -> int | None:
        """Up to ``limit`` orders (and expired dedup entries, and backfilled
        index entries) archived and retired in one commit; None if there was
        nothing to do."""
        started = time.perf_counter()
        rows = (self.store.finished_before(now - self.retention_s, limit)
                if self.retention_s > 0 else [])
        expired = self.store.expired_before(now - self.dedup_window_s, limit)
        backfill = self.store.backfill_scan(self._since_ms, limit, self._backfill_until)
        if not rows and not expired and not backfill:
            return None
        committed = self.store.archive_lengths()
        by_day: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        entries: list[list[Any]] = []
        taken: set[bytes] = set()
        for done_key, raw in rows:
            ms = int.from_bytes(done_key[:8], "big")
            if raw is None or done_key[8:] in taken:  # a stray index entry: retire drops it
                entries.append([done_key, b"", "", 0, "", b""])
                continue
            taken.add(done_key[8:])
            record, state, ext = _archive_record(done_key[8:].decode(), raw, ms, now)
            day = archive.day_of(ms / 1000)
            entries.append([done_key, record_digest(raw), day, 0, state, ext])
            by_day[day].append((len(entries) - 1, record))
        lengths: dict[str, tuple[int, int]] = {}
        for day, items in by_day.items():
            chunks = [items[i:i + archive.MEMBER_ORDERS]
                      for i in range(0, len(items), archive.MEMBER_ORDERS)]
            members = [archive.encode_records([r for _, r in chunk]) for chunk in chunks]
            base = committed.get(day, 0)
            offsets, end = archive.append(archive.file_for(self.store.path, day), base,
                                          members)
            for chunk, offset in zip(chunks, offsets, strict=True):
                for index, _ in chunk:
                    entries[index][3] = offset
            lengths[day] = (base, end)
        outcome = self._commit(lengths, [tuple(e) for e in entries], expired, backfill)
        if isinstance(outcome, int):
            self.metrics.retention_batch_seconds.observe(time.perf_counter() - started)
            return outcome
        if outcome == "stopping":
            return None  # the writer still commits it (or not) before it stops; either is safe
        raise RuntimeError(f"retention batch not committed: {outcome}")

    def _commit(self, lengths: dict[str, tuple[int, int]], entries: list[Any],
                expired: list[bytes], backfill: tuple[Any, ...]) -> Any:
        """Hand the batch to the writer and wait for its answer. A barrier
        behind it is the fence: the next batch is never written to a file
        while this one might still commit."""
        got: list[Any] = []
        fence = threading.Event()
        self.writer.tell(Retire(lengths, entries, expired, Collect(got), backfill))
        self.writer.tell(Barrier((Wake(fence),)))
        while not fence.wait(0.5):
            if self._stop.is_set():
                return "stopping"
        return got[0] if got else "not committed (the store writer refused it)"


def _archive_record(order_id: str, raw: bytes, ms: int,
                    now: float) -> tuple[dict[str, Any], str, bytes]:
    """The archive record of one order, its state and its ext key. An order
    whose record cannot be decoded is archived raw (nothing is dropped)."""
    try:
        order = snapshot.decode(raw)
        view: dict[str, Any] = order.view()
        state = str(order.state)
        ext = ext_key(order.source_system, order.external_id)
        out = {"order": view, "finished_ts": ms / 1000, "archived_ts": now}
    except Exception as exc:  # noqa: BLE001 - any decoding problem: keep the bytes, say why
        logger.error("archiving order %s whose record cannot be decoded: %s", order_id, exc,
                     extra={"order_id": order_id})
        state, ext = "unreadable", b""
        out = {"order": {"order_id": order_id}, "unreadable": f"{type(exc).__name__}: {exc}",
               "raw": raw, "finished_ts": ms / 1000, "archived_ts": now}
    return out, state, ext
