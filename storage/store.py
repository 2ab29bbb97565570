"""The order store: LMDB, one writer, many lock-free readers.

Named databases (keys are UTF-8):

- ``orders``: order id -> snapshot record (msgpack, format version 2 or 1:
  ``oms.snapshot``, the only code that reads or writes one).
- ``ext``: ``source_system NUL external_id`` -> [order id, payload digest];
  the idempotency index of ``submit_order``.
- ``active``: order id -> b"" for every order not yet finished; recovery
  reads only these.
- ``events``: ``order id NUL system NUL event_id`` -> b""; domain events
  already recorded (a repeat is acknowledged and ignored).
- ``inbox``: same key -> the event; recorded but not yet consumed by its
  order. The order deletes it in the same transaction that stores the state
  the event led to.
- ``meta``: ``seq`` -> the last order number given out; ``probe`` -> when
  the writer last tried whether a failing store can write again.

Only the store writer (``actors.store_writer``) opens write transactions.
Readers use ``read()``; the writer's ``exclusive()`` waits for them to finish
before it grows the map, because LMDB forbids resizing with a transaction
open in the process.

For retention (``actors.retention``, ``storage.archive``) also:

- ``done``: ``finish time (8 bytes, ms, big-endian) + order id`` -> state, for
  every finished order still live: retention reads the oldest first.
- ``arch``: order id -> [day, member offset, state, finish ms, ext key] for
  an archived order, kept for the dedup window.
- ``expiry``: ``finish time + order id`` -> b"": when each archived order's
  ``ext`` and ``arch`` entries fall out of the dedup window.
- in ``meta``: ``live:<state>`` and ``archived`` counters, each archive
  file's committed length (``arch:<day>``), the upgrade scan's
  ``backfill_since`` and ``backfill_at``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from oms import codec, snapshot
from oms.model import Order
from oms.sharding import sharded_order_id
from storage import files
from storage.listing import OrderListing
from storage.records import (
    SCAN_CHUNK,
    CorruptRecord,
    Created,
    Tally,
    decode_order,
    event_key,
    ext_key,
    format_order_id,
    seek_after,
    usable_order_id,
)
from storage.retention_index import RetentionIndex

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAP_SIZE = 256 * MIB
_DBS: tuple[str, ...] = ("orders", "ext", "active", "events", "inbox", "meta")
_DBS += ("done", "arch", "expiry")  # retention's (see above)


class StoreLocked(RuntimeError):
    """Another service already has this data folder open."""


class StoreFull(RuntimeError):
    """The map reached its configured cap: no write fits until it is raised."""


class Fenced(StoreLocked):
    """A newer copy of this shard has started on the same data (its epoch is
    higher): this one must not write (docs/scaling.md, fencing)."""


FENCED_EXIT = 75


class _ReadGate:
    """Many readers or one resizer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Wait for the readers inside to leave (new ones wait meanwhile).
        Every read transaction is short and waits for nothing while open, so
        this ends; a wait of over 5 s is logged, so it would not be silent."""
        with self._cond:
            self._exclusive = True
            started = time.monotonic()
            while self._readers:
                if not self._cond.wait(5.0):
                    logger.warning("store map growth waits for %d open reader(s) for %.0f s",
                                   self._readers, time.monotonic() - started)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Store(OrderListing, RetentionIndex):
    """An open data folder. Listing (``OrderListing``) and the retention
    index (``RetentionIndex``) are its parts, in their own modules."""

    def __init__(self, path: str | Path, map_size: int = DEFAULT_MAP_SIZE,
                 sync: bool = True, max_map_size: int = 0, epoch: int = 0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        self.max_map_size = max_map_size  # 0: grow as long as the disk allows
        self.env = lmdb.open(
            str(self.path), map_size=opening_map_size(self.path, map_size, max_map_size),
            max_dbs=len(_DBS), sync=sync,
            metasync=sync, max_readers=512, lock=True,
        )
        self.db = {name: self.env.open_db(name.encode()) for name in _DBS}
        self.gate = _ReadGate()
        self.tally = Tally()  # what the open write transaction puts at its end
        # ids whose active entry a failed write or ``retire`` may have dropped (rare; grows only)
        self.unlisted: set[bytes] = set()  # ``put_order`` then ignores ``listed``
        self.epoch = epoch
        if epoch:
            self._take_epoch()

    def _take_epoch(self) -> None:
        """Fencing (a shard on Ray): record our epoch, unless a newer copy did."""
        with self.env.begin(write=True) as txn:
            stored = int(txn.get(b"epoch", b"0", db=self.db["meta"]))
            if stored > self.epoch:
                txn.abort()
                self.env.close()
                self._lock_file.close()
                raise Fenced(f"data folder {self.path} belongs to epoch {stored}; this copy "
                             f"has epoch {self.epoch} and must not run")
            txn.put(b"epoch", str(self.epoch).encode(), db=self.db["meta"])

    def _take_lock(self) -> Any:
        try:
            return files.take_lock(self.path / "oms.lock", "")  # held until close
        except files.Held as held:
            raise StoreLocked(f"data folder {self.path} is in use by {held.owner}; stop that "
                              "service or pass another --data folder") from None

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        self._lock_file.close()

    # -- reading (any thread) ----------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction[bytes]]:
        with self.gate.shared(), self.env.begin(buffers=False) as txn:
            yield txn

    def load(self, txn: lmdb.Transaction[bytes], order_id: str) -> Order | None:
        if not usable_order_id(order_id):
            return None
        raw = txn.get(order_id.encode(), db=self.db["orders"])
        return None if raw is None else decode_order(order_id.encode(), raw)

    def get_order(self, order_id: str) -> Order | None:
        with self.read() as txn:
            return self.load(txn, order_id)

    def find_external(self, source_system: str, external_id: str) -> str | None:
        with self.read() as txn:
            raw = txn.get(ext_key(source_system, external_id), db=self.db["ext"])
        return None if raw is None else codec.unpack(raw)[0]

    def is_active(self, txn: lmdb.Transaction[bytes], order_id: str) -> bool:
        return usable_order_id(order_id) and txn.get(order_id.encode(),
                                                     db=self.db["active"]) is not None

    def active_ids(self) -> list[str]:
        with self.read() as txn:
            return [k.decode() for k in txn.cursor(db=self.db["active"]).iternext(values=False)]

    def scan_active(self, chunk: int = SCAN_CHUNK
                    ) -> Iterator[tuple[bytes, Order | CorruptRecord]]:
        """Every unfinished order (or why its record is unreadable), in id
        order. Read in chunks of ``chunk`` orders, each in its own short read
        transaction, and decoded and handed out only after that transaction
        ended: the caller never holds a read slot, so a map growth (which
        waits for readers) is never held up by whatever the caller waits for."""
        after: bytes | None = None
        while True:
            rows: list[tuple[bytes, bytes | None]] = []
            with self.read() as txn:
                active = txn.cursor(db=self.db["active"])
                orders = txn.cursor(db=self.db["orders"])
                found = seek_after(active, after)
                while found and len(rows) < chunk:
                    key = active.key()
                    rows.append((key, orders.get(key)))
                    found = active.next()
            for key, raw in rows:
                if raw is None:
                    yield key, CorruptRecord(key, "listed as active but missing")
                    continue
                try:
                    yield key, decode_order(key, raw)
                except CorruptRecord as exc:
                    yield key, exc
            if not found:
                return
            after = rows[-1][0]

    def inbox(self, chunk: int = SCAN_CHUNK) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Recorded domain events not yet consumed by their orders (chunked
        short reads, as ``scan_active``)."""
        after: bytes | None = None
        while True:
            with self.read() as txn:
                cur = txn.cursor(db=self.db["inbox"])
                found = seek_after(cur, after)
                rows: list[tuple[bytes, bytes]] = []
                while found and len(rows) < chunk:
                    rows.append((cur.key(), cur.value()))
                    found = cur.next()
            for key, raw in rows:
                yield key, codec.unpack(raw)
            if not found:
                return
            after = rows[-1][0]

    def stats(self) -> dict[str, int]:
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {"map_size": info["map_size"], "used": used}

    # -- writing (the store writer only) -----------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction, committed when the ``with`` ends, after the
        numbers it kept to put once (``tally``); aborted if it raises."""
        txn = self.env.begin(write=True)
        if self.epoch and int(txn.get(b"epoch", b"0", db=self.db["meta"])) > self.epoch:
            txn.abort()  # a newer copy runs on this data: never write, go down loudly
            logger.critical("fenced: a newer copy of this shard (epoch above %d) writes to "
                            "%s; exiting without writing", self.epoch, self.path)
            logging.shutdown()
            os._exit(FENCED_EXIT)
        with txn:
            yield txn
            self.tally.settle(txn, self.db["meta"])

    def grow(self) -> int:
        """Double the map (up to ``max_map_size``); waits until no reader is
        inside. Raises ``StoreFull`` when the map is already at its cap."""
        current = self.env.info()["map_size"]
        new = current * 2
        if self.max_map_size:
            if current >= self.max_map_size:
                raise StoreFull(f"the store is full: its map is at the {current // MIB} MiB "
                                "cap (max_map_size_mb)")
            new = min(new, self.max_map_size)
        with self.gate.exclusive():
            self.env.set_mapsize(new)
        logger.warning("store map grown to %d MiB", new // (1024 * 1024))
        return new

    def probe(self, txn: lmdb.Transaction[bytes]) -> None:
        """A small real write (an empty commit writes nothing): can it write again?"""
        txn.put(b"probe", str(time.time()).encode(), db=self.db["meta"])

    def next_order_id(self, txn: lmdb.Transaction[bytes], vshard: int | None = None) -> str:
        """The next id; a shard (``vshard`` given) ends it with the virtual
        shard (``oms.sharding``, docs/scaling.md); its number, ``Tally.next_seq``."""
        seq = self.tally.next_seq(txn, self.db["meta"])
        return format_order_id(seq) if vshard is None else sharded_order_id(seq, vshard)

    def known_create(self, txn: lmdb.Transaction[bytes], key: bytes,
                     digest: bytes) -> Created | None:
        """A create of an external id already taken: ``duplicate`` (the same
        payload) or ``conflict``; None for a new one."""
        raw = txn.get(key, db=self.db["ext"])
        if raw is None:
            return None
        order_id, known = codec.unpack(raw)
        if known != digest:
            return Created("conflict", order_id, "")
        rec = txn.get(order_id.encode(), db=self.db["orders"])
        state = snapshot.record_state(rec) if rec else self.archived_state(txn, order_id)
        return Created("duplicate", order_id, state)

    def create_order(self, txn: lmdb.Transaction[bytes], source_system: str, external_id: str,
                     digest: bytes, build: Any, vshard: int | None = None) -> Created:
        """Idempotent create: ``build(order_id)`` makes the order if it is new."""
        key = ext_key(source_system, external_id)
        if (known := self.known_create(txn, key, digest)) is not None:
            return known
        order_id = self.next_order_id(txn, vshard)
        order: Order = build(order_id)
        txn.put(key, codec.pack([order_id, digest]), db=self.db["ext"])
        record = snapshot.encode(order)
        self.put_order(txn, order_id, record, active=True)
        if order.finished:  # its Start (actors.effects.NewOrder) finished it: as a save would
            self.put_order(txn, order_id, record, active=False, state=order.state._value_)
        return Created("accepted", order_id, str(order.state), order)

    def put_order(self, txn: lmdb.Transaction[bytes], order_id: str, record: bytes,
                  active: bool, consumed: tuple[bytes, ...] | list[bytes] = (),
                  listed: bool = False, state: str | None = None) -> None:
        """``listed``: its previous write left it in ``active``: no put there.
        ``state``: a finished order's state, if at hand (``note_finished``)."""
        key = order_id.encode()
        if not active and txn.get(key, db=self.db["arch"]) is not None:
            return  # archived already: its final view is in the archive
        txn.put(key, record, db=self.db["orders"])
        if active:
            if not listed or key in self.unlisted:
                txn.put(key, b"", db=self.db["active"])
        elif txn.delete(key, db=self.db["active"]):
            self.note_finished(txn, key, record, state=state)
        for ev in consumed:
            txn.delete(ev, db=self.db["inbox"])

    def record_event(self, txn: lmdb.Transaction[bytes], order_id: str, system: str,
                     event_id: str, event: dict[str, Any], key: bytes = b"") -> str:
        """Record a domain event once (``key``: its ``event_key``, if known)."""
        if not usable_order_id(order_id):
            return "unknown_order"
        key = key or event_key(order_id, system, event_id)
        oid = order_id.encode()
        if txn.get(oid, db=self.db["active"]) is None:
            if txn.get(key, db=self.db["events"]) is not None:
                return "duplicate"
            known = txn.get(oid, db=self.db["orders"]) is not None or (
                txn.get(oid, db=self.db["arch"]) is not None)
            return "finished_order" if known else "unknown_order"
        if not txn.put(key, b"", db=self.db["events"], overwrite=False):
            return "duplicate"  # (the put wrote nothing: a get and a put in one call)
        txn.put(key, codec.pack(event), db=self.db["inbox"])
        return "recorded"

def opening_map_size(path: Path, map_size: int, max_map_size: int = 0) -> int:
    """The map size to open with: the data file's size plus ``map_size`` of
    headroom (LMDB would otherwise reopen a store bigger than ``map_size`` at
    exactly its file size, i.e. full, and the first write of recovery would
    have to grow it), at most ``max_map_size`` (0: no cap) unless the file is
    already bigger. Rounded up to whole MiB."""
    data = path / "data.mdb"
    used = data.stat().st_size if data.exists() else 0
    want = max(map_size, used + map_size)
    if max_map_size:
        want = max(min(want, max_map_size), used)
    return -(-want // MIB) * MIB


