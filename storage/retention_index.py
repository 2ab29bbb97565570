"""The store's retention part: the finish-time index of finished orders, the
per-order archive markers and the dedup window (``actors.retention`` reads;
the store writer writes). The databases are described in ``storage.store``."""

from __future__ import annotations

import logging
import time
from typing import Any

import lmdb

from oms import codec, snapshot
from storage.records import (
    TS_BYTES,
    StoreView,
    Tally,
    bump,
    delete_prefix,
    record_digest,
    ts_key,
    ts_of,
    usable_order_id,
)

logger = logging.getLogger(__name__)


class RetentionIndex(StoreView):
    """Finished orders by finish time, archived orders' markers."""

    unlisted: set[bytes]  # (``Store.unlisted``)
    tally: Tally  # (``Store.tally``)

    def note_finished(self, txn: lmdb.Transaction[bytes], key: bytes, record: bytes,
                      now: float | None = None, state: str | None = None) -> None:
        """An order just finished: index it by finish time for retention.
        ``state``: the record's state, if the caller has it (a save from an
        order actor): reading it back out of a 2 KB record is some 2.3 us."""
        if state is None:
            state = snapshot.record_state(record)
        ms = int((time.time() if now is None else now) * 1000)
        txn.put(ts_key(ms, key), state.encode(), db=self.db["done"])
        self.tally.add(txn, b"live:" + state.encode(), 1)  # put at the commit

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
        end = ts_key(int(cutoff * 1000), b"")
        with self.read() as txn:
            orders = txn.cursor(db=self.db["orders"])
            cur = txn.cursor(db=self.db["done"])
            found = cur.first()
            while found and len(out) < limit:
                key = cur.key()
                if key >= end:
                    break
                out.append((key, orders.get(key[TS_BYTES:])))
                found = cur.next()
        return out

    def expired_before(self, cutoff: float, limit: int) -> list[bytes]:
        """Up to ``limit`` expiry keys of archived orders finished before ``cutoff``."""
        end = ts_key(int(cutoff * 1000), b"")
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
            key = done_key[TS_BYTES:]
            was = txn.get(done_key, db=db["done"])
            if was is None:
                continue  # already retired by an earlier batch
            txn.delete(done_key, db=db["done"])
            bump(txn, meta, b"live:" + was, -1)
            raw = txn.get(key, db=db["orders"])
            if raw is None or not digest:
                continue  # a stray index entry: the order left already
            if record_digest(raw) != digest:
                logger.error("order %s changed after it finished; the archive holds the "
                             "version read at its sweep", key.decode(),
                             extra={"order_id": key.decode()})
            txn.delete(key, db=db["orders"])
            if txn.delete(key, db=db["active"]):  # active again: its actor's next
                self.unlisted.add(key)  # snapshot must list it again, as it always did
            for name in ("events", "inbox"):
                delete_prefix(txn.cursor(db=db[name]), key + b"\x00")
            ms = ts_of(done_key)
            txn.put(key, codec.pack([day, offset, state, ms, ext]), db=db["arch"])
            txn.put(ts_key(ms, key), b"", db=db["expiry"])
            moved += 1
        for day, (_base, new) in lengths.items():
            txn.put(b"arch:" + day.encode(), str(new).encode(), db=meta)
        if moved:
            bump(txn, meta, b"archived", moved)
        if backfill:
            since, cursor, found = backfill
            if txn.get(b"backfill_since", db=meta) is None:
                txn.put(b"backfill_since", str(since).encode(), db=meta)
            for done_key, state in found:
                if txn.put(done_key, state.encode(), db=db["done"], overwrite=False):
                    bump(txn, meta, b"live:" + state.encode(), 1)
            txn.put(b"backfill_at", cursor, db=meta)
        for exp in expired:
            key = exp[TS_BYTES:]
            raw = txn.get(key, db=db["arch"])
            if raw is not None:
                ext = codec.unpack(raw)[4]
                entry = txn.get(ext, db=db["ext"]) if ext else None
                if entry is not None and codec.unpack(entry)[0] == key.decode():
                    txn.delete(ext, db=db["ext"])
                txn.delete(key, db=db["arch"])
            txn.delete(exp, db=db["expiry"])
        return moved

    def last_order_key(self) -> bytes | None:
        """The greatest order key in the store now (None if it holds none)."""
        with self.read() as txn:
            cur = txn.cursor(db=self.db["orders"])
            return cur.key() if cur.last() else None

    def backfill_scan(self, since_ms: int, limit: int,
                      until: bytes | None) -> tuple[Any, ...]:
        """Orders that finished before the finish-time index existed (before
        ``since_ms``, the first start with retention) have no ``done``
        entry: find up to ``limit`` records' worth of them, from where the
        last scan stopped, up to the key ``until`` (``last_order_key`` when
        this process started: an order created later has always been indexed
        when it finished, so the scan never chases the orders coming in).
        () when the scan is over (or was never needed)."""
        with self.read() as txn:
            meta = self.db["meta"]
            at = txn.get(b"backfill_at", db=meta)
            if at == b"\xff":
                return ()
            stored = txn.get(b"backfill_since", db=meta)
            since = int(stored) if stored else since_ms
            cur = txn.cursor(db=self.db["orders"])
            found_any = until is not None and (cur.set_range(at + b"\x00") if at else cur.first())
            found: list[tuple[bytes, str]] = []
            scanned, last = 0, at or b""
            while found_any and scanned < limit:
                key, raw = cur.item()
                if until is None or key > until:
                    found_any = False
                    break
                scanned, last = scanned + 1, key
                if txn.get(key, db=self.db["active"]) is None:
                    try:
                        head = snapshot.head(raw)
                        ms, state = int(float(head.updated_ts) * 1000), str(head.state)
                    except Exception:  # noqa: BLE001 - archived raw by the sweep, with why
                        ms, state = 0, "unreadable"
                    if ms < since:
                        found.append((ts_key(ms, key), state))
                found_any = cur.next()
            return (since, last if found_any and last != until else b"\xff", found)

    def retention_stats(self, now: float | None = None) -> dict[str, Any]:
        """Read at scrape time: finished orders still live by state, the age
        of the oldest, orders archived, and the data file's size."""
        with self.read() as txn:
            cur = txn.cursor(db=self.db["done"])
            oldest = ts_of(cur.key()) / 1000 if cur.first() else None
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
