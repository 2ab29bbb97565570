"""The order store: LMDB, one writer, many lock-free readers.

Named databases (keys are UTF-8):

- ``orders``: order id -> snapshot record (msgpack, format version ``v``).
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

For retention (``actors.retention``, ``oms.archive``) also:

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
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from oms import codec
from oms.model import Order
from oms.sharding import sharded_order_id

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAP_SIZE = 256 * MIB
SCAN_CHUNK = 512  # records per read transaction in long scans
LIST_BUDGET = 5_000  # records list_orders examines per call at most
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


class CorruptRecord(ValueError):
    """A record that cannot be decoded; carries its key."""

    def __init__(self, key: bytes, why: str) -> None:
        super().__init__(f"record {key!r} cannot be decoded: {why}")
        self.key = key


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


@dataclass(frozen=True, slots=True)
class Created:
    """Outcome of ``create_order``. kind: accepted | duplicate | conflict; the
    store writer adds unavailable (the commit failed: nothing was stored) and
    error (this one write failed)."""

    kind: str
    order_id: str
    state: str
    order: Order | None = None


MAX_ORDER_ID = 64  # longer ids are not ours (ours are 13 characters)


def _hash(*parts: str) -> bytes:
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=20).digest()


def ext_key(source_system: str, external_id: str) -> bytes:
    """Fixed size: LMDB keys are at most 511 bytes, ids up to 1,000 characters."""
    return _hash(source_system, external_id)


def event_key(order_id: str, system: str, event_id: str) -> bytes:
    """Order id first (so an order's events sort together), then a hash."""
    return order_id.encode() + b"\x00" + _hash(system, event_id)


def usable_order_id(order_id: object) -> bool:
    return isinstance(order_id, str) and 0 < len(order_id) <= MAX_ORDER_ID


def format_order_id(seq: int) -> str:
    """Order ids sort in acceptance order and are never reused."""
    return f"O{seq:012d}"


class Store:
    """An open data folder."""

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
        handle = open(self.path / "oms.lock", "a+")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise StoreLocked(
                f"data folder {self.path} is in use by {owner}; "
                "stop that service or pass another --data folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        return handle

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
                    ) -> Iterator[tuple[bytes, dict[str, Any] | CorruptRecord]]:
        """Every unfinished order's raw record (or why it is unreadable), in id
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
                found = _seek_after(active, after)
                while found and len(rows) < chunk:
                    key = active.key()
                    rows.append((key, orders.get(key)))
                    found = active.next()
            for key, raw in rows:
                if raw is None:
                    yield key, CorruptRecord(key, "listed as active but missing")
                    continue
                try:
                    yield key, codec.unpack(raw)
                except Exception as exc:  # noqa: BLE001 - any decoding problem is reported with its key
                    yield key, CorruptRecord(key, f"{type(exc).__name__}: {exc}")
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
                found = _seek_after(cur, after)
                rows: list[tuple[bytes, bytes]] = []
                while found and len(rows) < chunk:
                    rows.append((cur.key(), cur.value()))
                    found = cur.next()
            for key, raw in rows:
                yield key, codec.unpack(raw)
            if not found:
                return
            after = rows[-1][0]

    def list_orders(self, flt: ListFilter, limit: int, after: str | None,
                    budget: int = LIST_BUDGET, chunk: int = SCAN_CHUNK
                    ) -> tuple[list[Order], str | None]:
        """Orders matching ``flt``, newest first, older than the cursor ``after``.

        Bounded work: at most ``budget`` records are examined per call, read
        in chunks of short read transactions (so a call never holds a read
        slot for long). Returns the orders (at most ``limit``) and the cursor
        to continue with: the last order id examined when more orders may
        exist (the limit was reached or the budget spent), else None. A page
        may hold fewer than ``limit`` orders, even none, and still have a
        cursor. New orders get higher ids, so paging never repeats or skips
        an order while orders are added."""
        if flt.source_system is not None and flt.external_id is not None:
            return self._list_one(flt, after), None
        out: list[Order] = []
        cursor = after.encode()[:MAX_ORDER_ID] if after is not None else None
        examined, more = 0, True
        while more and len(out) < limit and examined < budget:
            rows: list[tuple[bytes, bytes]] = []
            with self.read() as txn:
                cur = txn.cursor(db=self.db["orders"])
                found = _seek_before(cur, cursor)
                while found and len(rows) < min(chunk, budget - examined):
                    rows.append((cur.key(), cur.value()))
                    found = cur.prev()
            more = found
            for n, (key, raw) in enumerate(rows):
                examined += 1
                cursor = key
                order = _listed(key, raw, flt)
                if order is not None:
                    out.append(order)
                    if len(out) == limit:
                        more = more or n + 1 < len(rows)
                        break
        return out, (cursor.decode() if more and cursor is not None else None)

    def _list_one(self, flt: ListFilter, after: str | None) -> list[Order]:
        """source_system + external_id name at most one order: the index finds it."""
        with self.read() as txn:
            raw = txn.get(ext_key(flt.source_system or "", flt.external_id or ""),
                          db=self.db["ext"])
            if raw is None:
                return []
            order_id = codec.unpack(raw)[0]
            if after is not None and order_id >= after:
                return []
            rec = txn.get(order_id.encode(), db=self.db["orders"])
        order = None if rec is None else _listed(order_id.encode(), rec, flt)
        return [] if order is None else [order]

    def stats(self) -> dict[str, int]:
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {"map_size": info["map_size"], "used": used}

    # -- writing (the store writer only) -----------------------------------

    def write(self) -> lmdb.Transaction[bytes]:
        txn = self.env.begin(write=True)
        if self.epoch and int(txn.get(b"epoch", b"0", db=self.db["meta"])) > self.epoch:
            txn.abort()  # a newer copy runs on this data: never write, go down loudly
            logger.critical("fenced: a newer copy of this shard (epoch above %d) writes to "
                            "%s; exiting without writing", self.epoch, self.path)
            logging.shutdown()
            os._exit(FENCED_EXIT)
        return txn

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
        """A small real write (an empty commit writes nothing), to learn
        whether the store can write again."""
        txn.put(b"probe", str(time.time()).encode(), db=self.db["meta"])

    def next_order_id(self, txn: lmdb.Transaction[bytes], vshard: int | None = None) -> str:
        """The next id; a shard (``vshard`` given) ends it with the virtual
        shard (``oms.sharding``, docs/scaling.md)."""
        raw = txn.get(b"seq", db=self.db["meta"])
        seq = (int(raw) if raw else 0) + 1
        txn.put(b"seq", str(seq).encode(), db=self.db["meta"])
        return format_order_id(seq) if vshard is None else sharded_order_id(seq, vshard)

    def create_order(self, txn: lmdb.Transaction[bytes], source_system: str, external_id: str,
                     digest: bytes, build: Any, vshard: int | None = None) -> Created:
        """Idempotent create: ``build(order_id)`` makes the order if it is new."""
        key = ext_key(source_system, external_id)
        raw = txn.get(key, db=self.db["ext"])
        if raw is not None:
            order_id, known = codec.unpack(raw)
            if known != digest:
                return Created("conflict", order_id, "")
            rec = txn.get(order_id.encode(), db=self.db["orders"])
            state = codec.unpack(rec)["state"] if rec else self.archived_state(txn, order_id)
            return Created("duplicate", order_id, state)
        order_id = self.next_order_id(txn, vshard)
        order: Order = build(order_id)
        txn.put(key, codec.pack([order_id, digest]), db=self.db["ext"])
        self.put_order(txn, order_id, codec.pack(order.to_record()), active=True)
        return Created("accepted", order_id, str(order.state), order)

    def put_order(self, txn: lmdb.Transaction[bytes], order_id: str, record: bytes,
                  active: bool, consumed: tuple[bytes, ...] = ()) -> None:
        key = order_id.encode()
        if not active and txn.get(key, db=self.db["arch"]) is not None:
            return  # archived already: its final view is in the archive
        txn.put(key, record, db=self.db["orders"])
        if active:
            txn.put(key, b"", db=self.db["active"])
        elif txn.delete(key, db=self.db["active"]):
            self.note_finished(txn, key, record)
        for ev in consumed:
            txn.delete(ev, db=self.db["inbox"])

    def record_event(self, txn: lmdb.Transaction[bytes], order_id: str, system: str,
                     event_id: str, event: dict[str, Any]) -> str:
        """Record a domain event once: "recorded", "duplicate" or "unknown_order"."""
        if not usable_order_id(order_id):
            return "unknown_order"
        key = event_key(order_id, system, event_id)
        if txn.get(key, db=self.db["events"]) is not None:
            return "duplicate"
        if txn.get(order_id.encode(), db=self.db["active"]) is None:
            known = txn.get(order_id.encode(), db=self.db["orders"]) is not None or (
                txn.get(order_id.encode(), db=self.db["arch"]) is not None)
            return "finished_order" if known else "unknown_order"
        txn.put(key, b"", db=self.db["events"])
        txn.put(key, codec.pack(event), db=self.db["inbox"])
        return "recorded"

    # -- retention (actors.retention; writes in the store writer only) -------

    def note_finished(self, txn: lmdb.Transaction[bytes], key: bytes, record: bytes,
                      now: float | None = None) -> None:
        """An order just finished: index it by finish time for retention."""
        state = str(codec.unpack(record)["state"])
        ms = int((time.time() if now is None else now) * 1000)
        txn.put(_ts_key(ms, key), state.encode(), db=self.db["done"])
        _bump(txn, self.db["meta"], b"live:" + state.encode(), 1)

    def archived_state(self, txn: lmdb.Transaction[bytes], order_id: str) -> str:
        marker = self.archive_marker(txn, order_id)
        return marker[2] if marker else "acknowledged"

    def archive_marker(self, txn: lmdb.Transaction[bytes], order_id: str) -> list[Any] | None:
        """[day, member offset, state, finish ms, ext key] of an archived order
        still inside the dedup window, else None."""
        if not usable_order_id(order_id):
            return None
        raw = txn.get(order_id.encode(), db=self.db["arch"])
        return None if raw is None else codec.unpack(raw)

    def find_archived(self, order_id: str) -> list[Any] | None:
        with self.read() as txn:
            return self.archive_marker(txn, order_id)

    def finished_before(self, cutoff: float, limit: int) -> list[tuple[bytes, bytes | None]]:
        """Up to ``limit`` finished orders that finished before ``cutoff``,
        oldest first: (done key, raw record or None if already gone)."""
        out: list[tuple[bytes, bytes | None]] = []
        end = _ts_key(int(cutoff * 1000), b"")
        with self.read() as txn:
            orders = txn.cursor(db=self.db["orders"])
            cur = txn.cursor(db=self.db["done"])
            found = cur.first()
            while found and len(out) < limit:
                key = cur.key()
                if key >= end:
                    break
                out.append((key, orders.get(key[_TS_BYTES:])))
                found = cur.next()
        return out

    def expired_before(self, cutoff: float, limit: int) -> list[bytes]:
        """Up to ``limit`` expiry keys of archived orders finished before ``cutoff``."""
        end = _ts_key(int(cutoff * 1000), b"")
        with self.read() as txn:
            out: list[bytes] = []
            for key in txn.cursor(db=self.db["expiry"]).iternext(values=False):
                if key >= end or len(out) >= limit:
                    break
                out.append(key)
        return out

    def archive_lengths(self) -> dict[str, int]:
        """Each archive file's committed length, by day."""
        with self.read() as txn:
            cur = txn.cursor(db=self.db["meta"])
            out = {}
            found = cur.set_range(b"arch:")
            while found and cur.key().startswith(b"arch:"):
                out[cur.key()[5:].decode()] = int(cur.value())
                found = cur.next()
        return out

    def retire(self, txn: lmdb.Transaction[bytes], lengths: dict[str, tuple[int, int]],
               orders: list[tuple[bytes, bytes, str, int, str, bytes]],
               expired: list[bytes], backfill: tuple[Any, ...] = ()) -> int | str:
        """Delete archived orders from the live store, in the writer's
        transaction. ``lengths``: day -> (committed length the batch was
        appended after, new length); if a file's committed length is not that
        base any more (a batch from before a restart or a lost answer), the
        batch is refused whole: "stale". ``orders``: (done key, record digest,
        day, member offset, state, ext key). ``expired``: expiry keys whose
        ``ext`` and ``arch`` entries go. ``backfill``: (since ms, next cursor,
        [(done key, state)]) from ``backfill_scan``. Returns how many orders left."""
        meta, db = self.db["meta"], self.db
        for day, (base, _new) in lengths.items():
            raw = txn.get(b"arch:" + day.encode(), db=meta)
            if (int(raw) if raw else 0) != base:
                return "stale"
        moved = 0
        for done_key, digest, day, offset, state, ext in orders:
            key = done_key[_TS_BYTES:]
            was = txn.get(done_key, db=db["done"])
            if was is None:
                continue  # already retired by an earlier batch
            txn.delete(done_key, db=db["done"])
            _bump(txn, meta, b"live:" + was, -1)
            raw = txn.get(key, db=db["orders"])
            if raw is None or not digest:
                continue  # a stray index entry: the order left already
            if record_digest(raw) != digest:
                logger.error("order %s changed after it finished; the archive holds the "
                             "version read at its sweep", key.decode(),
                             extra={"order_id": key.decode()})
            txn.delete(key, db=db["orders"])
            txn.delete(key, db=db["active"])
            for name in ("events", "inbox"):
                _delete_prefix(txn.cursor(db=db[name]), key + b"\x00")
            ms = _ts_of(done_key)
            txn.put(key, codec.pack([day, offset, state, ms, ext]), db=db["arch"])
            txn.put(_ts_key(ms, key), b"", db=db["expiry"])
            moved += 1
        for day, (_base, new) in lengths.items():
            txn.put(b"arch:" + day.encode(), str(new).encode(), db=meta)
        if moved:
            _bump(txn, meta, b"archived", moved)
        if backfill:
            since, cursor, found = backfill
            if txn.get(b"backfill_since", db=meta) is None:
                txn.put(b"backfill_since", str(since).encode(), db=meta)
            for done_key, state in found:
                if txn.put(done_key, state.encode(), db=db["done"], overwrite=False):
                    _bump(txn, meta, b"live:" + state.encode(), 1)
            txn.put(b"backfill_at", cursor, db=meta)
        for exp in expired:
            key = exp[_TS_BYTES:]
            raw = txn.get(key, db=db["arch"])
            if raw is not None:
                ext = codec.unpack(raw)[4]
                entry = txn.get(ext, db=db["ext"]) if ext else None
                if entry is not None and codec.unpack(entry)[0] == key.decode():
                    txn.delete(ext, db=db["ext"])
                txn.delete(key, db=db["arch"])
            txn.delete(exp, db=db["expiry"])
        return moved

    def backfill_scan(self, since_ms: int, limit: int) -> tuple[Any, ...]:
        """Orders that finished before the finish-time index existed (before
        ``since_ms``, the first start with retention) have no ``done``
        entry: find up to ``limit`` records' worth of them, from where the
        last scan stopped. () when the scan is over (or was never needed)."""
        with self.read() as txn:
            meta = self.db["meta"]
            at = txn.get(b"backfill_at", db=meta)
            if at == b"\xff":
                return ()
            stored = txn.get(b"backfill_since", db=meta)
            since = int(stored) if stored else since_ms
            cur = txn.cursor(db=self.db["orders"])
            found_any = cur.set_range(at + b"\x00") if at else cur.first()
            found: list[tuple[bytes, str]] = []
            scanned, last = 0, at or b""
            while found_any and scanned < limit:
                key, raw = cur.item()
                scanned, last = scanned + 1, key
                if txn.get(key, db=self.db["active"]) is None:
                    try:
                        rec = codec.unpack(raw)
                        ms, state = int(float(rec["uts"]) * 1000), str(rec["state"])
                    except Exception:  # noqa: BLE001 - archived raw by the sweep, with why
                        ms, state = 0, "unreadable"
                    if ms < since:
                        found.append((_ts_key(ms, key), state))
                found_any = cur.next()
            return (since, last if found_any else b"\xff", found)

    def retention_stats(self, now: float | None = None) -> dict[str, Any]:
        """Read at scrape time: finished orders still live by state, the age
        of the oldest, orders archived, and the data file's size."""
        with self.read() as txn:
            cur = txn.cursor(db=self.db["done"])
            oldest = _ts_of(cur.key()) / 1000 if cur.first() else None
            meta = txn.cursor(db=self.db["meta"])
            live: dict[str, int] = {}
            found = meta.set_range(b"live:")
            while found and meta.key().startswith(b"live:"):
                live[meta.key()[5:].decode()] = int(meta.value())
                found = meta.next()
            archived = int(txn.get(b"archived", db=self.db["meta"]) or 0)
            in_window = txn.stat(self.db["arch"])["entries"]
        try:
            size = (self.path / "data.mdb").stat().st_size
        except OSError:
            size = 0
        now = time.time() if now is None else now
        return {"finished_live": live, "archived_total": archived,
                "archived_in_window": in_window, "file_bytes": size,
                "oldest_finished_age_s": max(0.0, now - oldest) if oldest else 0.0}

@dataclass(frozen=True, slots=True)
class ListFilter:
    """What ``list_orders`` keeps; None matches anything."""

    state: str | None = None
    reason: str | None = None
    source_system: str | None = None
    customer_id: str | None = None
    external_id: str | None = None
    created_before: float | None = None

    def matches(self, rec: dict[str, Any]) -> bool:
        """On the raw record, so only matches are decoded into an Order."""
        cust = rec.get("cust")
        return ((self.state is None or rec.get("state") == self.state)
                and (self.reason is None or rec.get("reason") == self.reason)
                and (self.source_system is None or rec.get("src") == self.source_system)
                and (self.external_id is None or rec.get("ext") == self.external_id)
                and (self.customer_id is None
                     or (isinstance(cust, dict) and cust.get("id") == self.customer_id))
                and (self.created_before is None or (
                    isinstance(rec.get("cts"), int | float)
                    and rec["cts"] <= self.created_before)))


def _listed(key: bytes, raw: bytes, flt: ListFilter) -> Order | None:
    """The order if its record matches; an unreadable record is logged, skipped."""
    try:
        rec = codec.unpack(raw)
        if not isinstance(rec, dict) or not flt.matches(rec):
            return None
        return Order.from_record(rec)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is reported with its key
        logger.error("list_orders skips record %r: %s: %s", key, type(exc).__name__, exc)
        return None


def _seek_before(cur: lmdb.Cursor[bytes], before: bytes | None) -> bool:
    """Put the cursor on the last key before ``before`` (the last key if None)."""
    if before is None:
        return cur.last()
    if cur.set_range(before):
        return cur.prev()
    return cur.last()


def _seek_after(cur: lmdb.Cursor[bytes], after: bytes | None) -> bool:
    """Put the cursor on the first key after ``after`` (the first key if None)."""
    if after is None:
        return cur.first()
    found = cur.set_range(after)
    if found and cur.key() == after:
        found = cur.next()
    return found


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


def decode_order(key: bytes, raw: bytes) -> Order:
    try:
        return Order.from_record(codec.unpack(raw))
    except Exception as exc:  # noqa: BLE001 - any decoding problem is reported with its key
        raise CorruptRecord(key, f"{type(exc).__name__}: {exc}") from None


_TS_BYTES = 8


def _ts_key(ms: int, key: bytes) -> bytes:
    """A time-ordered index key: milliseconds (8 bytes big-endian), then the order id."""
    return max(0, ms).to_bytes(_TS_BYTES, "big") + key


def _ts_of(key: bytes) -> int:
    return int.from_bytes(key[:_TS_BYTES], "big")


def record_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _bump(txn: lmdb.Transaction[bytes], db: Any, key: bytes, by: int) -> None:
    raw = txn.get(key, db=db)
    txn.put(key, str((int(raw) if raw else 0) + by).encode(), db=db)


def _delete_prefix(cur: lmdb.Cursor[bytes], prefix: bytes) -> None:
    found = cur.set_range(prefix)
    while found and cur.key().startswith(prefix):
        found = cur.delete()
