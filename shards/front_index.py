"""The front's dedup index (``DATA/front``, docs/scaling.md): one LMDB table,
``ext_key(source_system, external_id)`` -> the virtual shard the key was
first submitted to.

The keys met in one poll round are recorded together (``record``) and
committed synced in one transaction (``commit``, one fsync) before any
submit of that round is forwarded. The folder is locked while the front
runs: a second front on it refuses to start.

A commit that fails (a full disk, an I/O error) keeps nothing of its
round: those submits are answered ``unavailable`` and never forwarded
(``shards.front_routing.Routing.end_round``), and the index is not
``writable`` (the front's /readyz says not ready) until a write succeeds
again: the next round's commit, or ``probe``, tried every ``PROBE_S``
meanwhile (and once at start). An LMDB panic is raised: the front exits and is restarted.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from shards.front_config import FrontMetrics

logger = logging.getLogger("shards.front")

PROBE_S = 0.5  # while the index cannot write: how often ``probe`` tries a write
PROBE_KEY = b"\x00probe"  # put and deleted in one transaction: never kept


class DedupIndex:
    def __init__(self, folder: Path, metrics: FrontMetrics) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / "front.lock", "a+")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{folder} is in use by another front") from None
        self.env = lmdb.open(str(folder), map_size=64 * 1024 * 1024, max_dbs=2, sync=True,
                             metasync=True)
        self.db = self.env.open_db(b"ext")
        self.m = metrics
        self.batch: dict[bytes, int] = {}  # recorded this round, not committed yet
        self.writable = True  # the last write succeeded
        self._tried = 0.0  # when the last write was tried (``probe``)
        self._write(_put_delete)  # a front (re)started on a full disk starts not ready

    def lookup(self, key: bytes) -> int | None:
        """The key's virtual shard (recorded this round or committed), or None."""
        known = self.batch.get(key)
        if known is None:
            with self.env.begin(db=self.db) as txn:
                raw = txn.get(key)
            known = raw[0] if raw else None
        return known

    def uncommitted(self, key: bytes) -> bool:
        return key in self.batch

    def record(self, key: bytes, vshard: int) -> None:
        self.batch[key] = vshard

    def commit(self) -> bool:
        """Commit this round's entries (one fsync); False when the write
        failed, and then nothing of this round is kept. The index keeps every
        key for good (50 to 130 bytes each): a full map is doubled, never an
        error (before, its fixed 64 MiB ended the front at each round with
        a new submit after about a million orders)."""
        if not self.batch:
            return True
        started = time.perf_counter()
        batch, self.batch = self.batch, {}

        def put_all(txn: lmdb.Transaction) -> None:
            for key, vshard in batch.items():
                txn.put(key, bytes([vshard]))
        if not self._write(put_all):
            return False
        self.m.index_commit.observe(time.perf_counter() - started)
        return True

    def probe(self, now: float) -> None:
        """While the index cannot write: a write that keeps nothing, at most
        every ``PROBE_S``, so /readyz follows the disk without a submit."""
        if not self.writable and now - self._tried >= PROBE_S:
            self._write(_put_delete)

    def _write(self, fill: Callable[[lmdb.Transaction], None]) -> bool:
        self._tried = time.monotonic()
        try:
            while True:
                try:
                    with self.env.begin(write=True, db=self.db) as txn:
                        fill(txn)
                    break
                except lmdb.MapFullError:  # the transaction was aborted: grow, write again
                    size = self.env.info()["map_size"] * 2
                    logger.info("dedup index map full: grown to %d MiB", size >> 20)
                    self.env.set_mapsize(size)
        except lmdb.PanicError:
            raise  # the environment is unusable: the front exits, is restarted
        except (lmdb.Error, OSError) as exc:
            if self.writable:
                logger.error("dedup index write failed; submits are answered unavailable "
                             "until it writes again: %s", exc)
            self.writable = False
            return False
        if not self.writable:
            logger.warning("dedup index writes work again")
            self.writable = True
        return True

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        self._lock.close()


def _put_delete(txn: lmdb.Transaction) -> None:
    """A write that keeps nothing (``DedupIndex.probe``)."""
    txn.put(PROBE_KEY, b"")
    txn.delete(PROBE_KEY)
