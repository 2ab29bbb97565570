"""What the store's parts share: keys, record decoding, cursor moves, and
``StoreView``, the base of the parts that read (``Store``, ``OrderListing``,
``RetentionIndex``)."""

from __future__ import annotations

import hashlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from oms import snapshot
from oms.model import Order

SCAN_CHUNK = 512  # records per read transaction in long scans

logger = logging.getLogger(__name__)


class StoreView:
    """An open data folder as its parts see it: the folder, the named
    databases, and short read transactions (``Store`` provides them)."""

    path: Path
    db: dict[str, Any]

    def read(self) -> AbstractContextManager[lmdb.Transaction[bytes]]:
        raise NotImplementedError


class CorruptRecord(ValueError):
    """A record that cannot be decoded; carries its key."""

    def __init__(self, key: bytes, why: str) -> None:
        super().__init__(f"record {key!r} cannot be decoded: {why}")
        self.key = key


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


def decode_order(key: bytes, raw: bytes) -> Order:
    """The order in a snapshot record of any version (``oms.snapshot``)."""
    try:
        return snapshot.decode(raw)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is reported with its key
        raise CorruptRecord(key, f"{type(exc).__name__}: {exc}") from None


TS_BYTES = 8


def ts_key(ms: int, key: bytes) -> bytes:
    """A time-ordered index key: milliseconds (8 bytes big-endian), then the order id."""
    return max(0, ms).to_bytes(TS_BYTES, "big") + key


def ts_of(key: bytes) -> int:
    return int.from_bytes(key[:TS_BYTES], "big")


def record_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def bump(txn: lmdb.Transaction[bytes], db: Any, key: bytes, by: int) -> None:
    raw = txn.get(key, db=db)
    txn.put(key, str((int(raw) if raw else 0) + by).encode(), db=db)


class Tally:
    """What one write transaction puts once, at its end (``Store.write``),
    rather than at every change: the last order number it gave out
    (``Store.next_order_id``: a put an order) and its counter deltas (the
    ``live:<state>`` counters: a get and a put an order). Kept for the open
    transaction only: another one starts from what is stored."""

    __slots__ = ("deltas", "seq", "txn")

    def __init__(self) -> None:
        self.txn: lmdb.Transaction[bytes] | None = None  # whose numbers these are
        self.seq = 0  # the last order number it gave out; 0: none yet
        self.deltas: dict[bytes, int] = {}

    def of(self, txn: lmdb.Transaction[bytes]) -> Tally:
        """This tally, for ``txn`` (an aborted transaction's is dropped)."""
        if self.txn is not txn:
            self.txn, self.seq, self.deltas = txn, 0, {}
        return self

    def next_seq(self, txn: lmdb.Transaction[bytes], meta: Any) -> int:
        """The next order number: read once a transaction, put at its end."""
        if not self.of(txn).seq:
            raw = txn.get(b"seq", db=meta)
            self.seq = int(raw) if raw else 0
        self.seq += 1
        return self.seq

    def add(self, txn: lmdb.Transaction[bytes], key: bytes, by: int) -> None:
        deltas = self.of(txn).deltas
        deltas[key] = deltas.get(key, 0) + by

    def settle(self, txn: lmdb.Transaction[bytes], meta: Any) -> None:
        """Put ``txn``'s numbers into ``meta`` (its last step before the commit)."""
        if self.txn is txn:
            if self.seq:
                txn.put(b"seq", str(self.seq).encode(), db=meta)
            for key, by in self.deltas.items():
                try:
                    bump(txn, meta, key, by)
                except ValueError:  # damaged: counted again from here, not the batch failed
                    logger.error("counter %r held %r, not a number: set to this commit's %d",
                                 key, txn.get(key, db=meta), by)
                    txn.put(key, str(by).encode(), db=meta)
        self.txn, self.seq, self.deltas = None, 0, {}


def delete_prefix(cur: lmdb.Cursor[bytes], prefix: bytes) -> None:
    found = cur.set_range(prefix)
    while found and cur.key().startswith(prefix):
        found = cur.delete()


def seek_before(cur: lmdb.Cursor[bytes], before: bytes | None) -> bool:
    """Put the cursor on the last key before ``before`` (the last key if None)."""
    if before is None:
        return cur.last()
    if cur.set_range(before):
        return cur.prev()
    return cur.last()


def seek_after(cur: lmdb.Cursor[bytes], after: bytes | None) -> bool:
    """Put the cursor on the first key after ``after`` (the first key if None)."""
    if after is None:
        return cur.first()
    found = cur.set_range(after)
    if found and cur.key() == after:
        found = cur.next()
    return found


@dataclass(frozen=True, slots=True)
class Created:
    """Outcome of ``create_order``. kind: accepted | duplicate | conflict; the
    store writer adds unavailable (the commit failed: nothing was stored) and
    error (this one write failed)."""

    kind: str
    order_id: str
    state: str
    order: Order | None = None
