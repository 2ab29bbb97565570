"""The front's dedup index (``DATA/front``, docs/scaling.md): one LMDB table,
``ext_key(source_system, external_id)`` -> the virtual shard the key was
first submitted to.

The keys met in one poll round are recorded together (``record``) and
committed synced in one transaction (``commit``, one fsync) before any
submit of that round is forwarded. The folder is locked while the front
runs: a second front on it refuses to start.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

import lmdb

from shards.front_config import FrontMetrics

logger = logging.getLogger("shards.front")


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

    def commit(self) -> None:
        """Commit this round's entries (one fsync). The index keeps every key
        for good (50 to 130 bytes each): a full map is doubled, never an
        error (before, its fixed 64 MiB ended the front at each round with
        a new submit after about a million orders)."""
        if self.batch:
            started = time.perf_counter()
            while True:
                try:
                    with self.env.begin(write=True, db=self.db) as txn:
                        for key, vshard in self.batch.items():
                            txn.put(key, bytes([vshard]))
                    break
                except lmdb.MapFullError:  # the transaction was aborted: grow, write again
                    size = self.env.info()["map_size"] * 2
                    logger.info("dedup index map full: grown to %d MiB", size >> 20)
                    self.env.set_mapsize(size)
            self.m.index_commit.observe(time.perf_counter() - started)
            self.batch.clear()

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        self._lock.close()
