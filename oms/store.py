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
- ``meta``: ``seq`` -> the last order number given out.

Only the store writer (``actors.store_writer``) opens write transactions.
Readers use ``read()``; the writer's ``exclusive()`` waits for them to finish
before it grows the map, because LMDB forbids resizing with a transaction
open in the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from oms import codec
from oms.model import Order
from oms.sharding import sharded_order_id

logger = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 256 * 1024 * 1024
_DBS = ("orders", "ext", "active", "events", "inbox", "meta")


class StoreLocked(RuntimeError):
    """Another service already has this data folder open."""


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
        with self._cond:
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class Created:
    """Outcome of ``create_order``. kind: accepted | duplicate | conflict."""

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
                 sync: bool = True, epoch: int = 0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock()
        self.env = lmdb.open(
            str(self.path), map_size=map_size, max_dbs=len(_DBS), sync=sync,
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
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.gate.shared(), self.env.begin(buffers=False) as txn:
            yield txn

    def load(self, txn: lmdb.Transaction, order_id: str) -> Order | None:
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

    def is_active(self, txn: lmdb.Transaction, order_id: str) -> bool:
        return usable_order_id(order_id) and txn.get(order_id.encode(),
                                                     db=self.db["active"]) is not None

    def active_ids(self) -> list[str]:
        with self.read() as txn:
            return [k.decode() for k in txn.cursor(db=self.db["active"]).iternext(values=False)]

    def scan_active(self) -> Iterator[tuple[bytes, dict[str, Any] | CorruptRecord]]:
        """Every unfinished order's raw record (or why it is unreadable), in id
        order, from one read transaction."""
        with self.read() as txn:
            orders = txn.cursor(db=self.db["orders"])
            for key in txn.cursor(db=self.db["active"]).iternext(values=False):
                raw = orders.get(key)
                if raw is None:
                    yield key, CorruptRecord(key, "listed as active but missing")
                    continue
                try:
                    yield key, codec.unpack(raw)
                except Exception as exc:  # any decoding problem is reported with its key
                    yield key, CorruptRecord(key, f"{type(exc).__name__}: {exc}")

    def inbox(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Recorded domain events not yet consumed by their orders."""
        with self.read() as txn:
            return [(k, codec.unpack(v)) for k, v in txn.cursor(db=self.db["inbox"])]

    def list_orders(self, state: str | None, source_system: str | None, limit: int,
                    after: str | None, scan_limit: int = 100_000, reason: str | None = None,
                    created_before: float | None = None) -> tuple[list[Order], str | None]:
        """Orders in id (acceptance) order after the cursor ``after``."""
        out: list[Order] = []
        last = None
        with self.read() as txn:
            cur = txn.cursor(db=self.db["orders"])
            start = after.encode()[:MAX_ORDER_ID] + b"\x00" if after else None
            found = cur.set_range(start) if start else cur.first()
            scanned = 0
            while found and len(out) < limit and scanned < scan_limit:
                key, raw = cur.item()
                scanned += 1
                last = key.decode()
                try:
                    order = decode_order(key, raw)
                except CorruptRecord as exc:
                    logger.error("%s", exc)
                else:
                    if (state is None or order.state == state) and (
                        source_system is None or order.source_system == source_system
                    ) and (reason is None or order.state_reason == reason) and (
                        created_before is None or order.created_ts <= created_before
                    ):
                        out.append(order)
                found = cur.next()
            more = found
        return out, (last if more else None)

    def stats(self) -> dict[str, int]:
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        return {"map_size": info["map_size"], "used": used}

    # -- writing (the store writer only) -----------------------------------

    def write(self) -> lmdb.Transaction:
        txn = self.env.begin(write=True)
        if self.epoch and int(txn.get(b"epoch", b"0", db=self.db["meta"])) > self.epoch:
            txn.abort()  # a newer copy runs on this data: never write, go down loudly
            logger.critical("fenced: a newer copy of this shard (epoch above %d) writes to "
                            "%s; exiting without writing", self.epoch, self.path)
            logging.shutdown()
            os._exit(FENCED_EXIT)
        return txn

    def grow(self) -> int:
        """Double the map; waits until no reader is inside."""
        with self.gate.exclusive():
            new = self.env.info()["map_size"] * 2
            self.env.set_mapsize(new)
        logger.warning("store map grown to %d MiB", new // (1024 * 1024))
        return new

    def next_order_id(self, txn: lmdb.Transaction, vshard: int | None = None) -> str:
        """The next id; a shard (``vshard`` given) ends it with the virtual
        shard (``oms.sharding``, docs/scaling.md)."""
        raw = txn.get(b"seq", db=self.db["meta"])
        seq = (int(raw) if raw else 0) + 1
        txn.put(b"seq", str(seq).encode(), db=self.db["meta"])
        return format_order_id(seq) if vshard is None else sharded_order_id(seq, vshard)

    def create_order(self, txn: lmdb.Transaction, source_system: str, external_id: str,
                     digest: bytes, build: Any, vshard: int | None = None) -> Created:
        """Idempotent create: ``build(order_id)`` makes the order if it is new."""
        key = ext_key(source_system, external_id)
        raw = txn.get(key, db=self.db["ext"])
        if raw is not None:
            order_id, known = codec.unpack(raw)
            if known != digest:
                return Created("conflict", order_id, "")
            rec = txn.get(order_id.encode(), db=self.db["orders"])
            state = codec.unpack(rec)["state"] if rec else "acknowledged"
            return Created("duplicate", order_id, state)
        order_id = self.next_order_id(txn, vshard)
        order: Order = build(order_id)
        txn.put(key, codec.pack([order_id, digest]), db=self.db["ext"])
        self.put_order(txn, order_id, codec.pack(order.to_record()), active=True)
        return Created("accepted", order_id, str(order.state), order)

    def put_order(self, txn: lmdb.Transaction, order_id: str, record: bytes,
                  active: bool, consumed: tuple[bytes, ...] = ()) -> None:
        key = order_id.encode()
        txn.put(key, record, db=self.db["orders"])
        if active:
            txn.put(key, b"", db=self.db["active"])
        else:
            txn.delete(key, db=self.db["active"])
        for ev in consumed:
            txn.delete(ev, db=self.db["inbox"])

    def record_event(self, txn: lmdb.Transaction, order_id: str, system: str,
                     event_id: str, event: dict[str, Any]) -> str:
        """Record a domain event once: "recorded", "duplicate" or "unknown_order"."""
        if not usable_order_id(order_id):
            return "unknown_order"
        key = event_key(order_id, system, event_id)
        if txn.get(key, db=self.db["events"]) is not None:
            return "duplicate"
        if txn.get(order_id.encode(), db=self.db["active"]) is None:
            known = txn.get(order_id.encode(), db=self.db["orders"]) is not None
            return "finished_order" if known else "unknown_order"
        txn.put(key, b"", db=self.db["events"])
        txn.put(key, codec.pack(event), db=self.db["inbox"])
        return "recorded"


def decode_order(key: bytes, raw: bytes) -> Order:
    try:
        return Order.from_record(codec.unpack(raw))
    except Exception as exc:  # any decoding problem is reported with its key
        raise CorruptRecord(key, f"{type(exc).__name__}: {exc}") from None
