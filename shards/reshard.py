"""``oms shards show|move``: where the virtual shards are, and moving whole
virtual shards between processes while the service is stopped
(docs/scaling.md, "Changing the number of processes").

A move keeps as many virtual shards in place as it can (each process ends
with V/M or V/M + 1 of them). For each virtual shard that moves, its records
are copied to the new owner (only where absent there), the new owner's
counter is raised to the old owner's, the manifest is rewritten, and only
then are the records deleted from the old owner. Running it again after a
crash finishes the job: every process is swept for records of virtual
shards it does not own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from oms.config import ConfigError
from oms.sharding import vshard_of_order_id
from shards import manifest as mf
from storage.store import Store


def balanced(owner: list[int], processes: int) -> list[int]:
    """A new owner list over ``processes`` that moves as few virtual shards as it can."""
    vshards = len(owner)
    quota = [vshards // processes + (1 if p < vshards % processes else 0)
             for p in range(processes)]
    new: list[int | None] = [None] * vshards
    kept: Counter[int] = Counter()
    for v, p in enumerate(owner):
        if p < processes and kept[p] < quota[p]:
            new[v] = p
            kept[p] += 1
    free = [p for p in range(processes) for _ in range(quota[p] - kept[p])]
    for v in range(vshards):
        if new[v] is None:
            new[v] = free.pop(0)
    return [int(p) for p in new]  # type: ignore[arg-type]


def _order_of(table: str, key: bytes, value: bytes) -> str:
    if table == "ext":  # [order id, payload digest]
        return str(msgpack.unpackb(value, raw=False)[0])
    if table in ("done", "expiry"):  # finish time (8 bytes) + order id
        return key[8:].decode(errors="replace")
    return key.split(b"\x00", 1)[0].decode()  # orders, active: the id; events, inbox: id NUL ...


# retention's `arch` entries point into their process's archive files, which do
# not move: archived orders stay with the process that archived them
TABLES = ("orders", "ext", "active", "events", "inbox", "done", "expiry")


def _records(store: Store, vshards: int, wanted: Any
             ) -> list[tuple[int, str, bytes, bytes]]:
    """(virtual shard, table, key, value) of every record of the virtual
    shards ``wanted(v)`` in one store."""
    out = []
    with store.env.begin() as txn:
        for table in TABLES:
            for key, value in txn.cursor(db=store.db[table]):
                v = vshard_of_order_id(_order_of(table, key, value), vshards)
                if v is not None and wanted(v):
                    out.append((v, table, key, value))
    return out


def _seq(store: Store) -> int:
    with store.env.begin() as txn:
        raw = txn.get(b"seq", db=store.db["meta"])
    return int(raw) if raw else 0


def move(data: str | Path, processes: int) -> dict[str, Any]:
    """Rebalance onto ``processes``; returns what moved. The service must be
    stopped: the folder's lock (a running supervisor holds it, even while
    its shards are down) and each shard folder's are taken."""
    if mf.load(data) is None:
        raise ConfigError(f"{data} is not a sharded data folder (no {mf.FILE})")
    with mf.take_lock(Path(data), "oms shards move"):
        return _move(data, processes)


def _move(data: str | Path, processes: int) -> dict[str, Any]:
    m = mf.load(data)
    if m is None:  # removed since: nothing to move
        raise ConfigError(f"{data} is not a sharded data folder (no {mf.FILE})")
    if processes < 2:
        raise ConfigError("a sharded folder needs at least 2 processes (its ids carry their "
                          "virtual shard)")
    mf.check_counts(processes, m.vshards)
    new_owner = balanced(m.owner, processes)
    stores = {p: Store(mf.shard_folder(data, p)) for p in range(max(m.processes, processes))}
    copied: Counter[str] = Counter()
    try:
        # 1. copy every record to its new owner (only where absent: a rerun after a
        #    crash never overwrites newer data), and raise the owner's counter
        seqs = {p: _seq(store) for p, store in stores.items()}
        for p, store in stores.items():
            rows = _records(store, m.vshards, lambda v, p=p: new_owner[v] != p)
            for q, target in stores.items():
                mine = [r for r in rows if new_owner[r[0]] == q]
                if not mine:
                    continue
                with target.env.begin(write=True) as txn:
                    for _, table, key, value in mine:
                        if txn.put(key, value, db=target.db[table], overwrite=False):
                            copied[table] += 1
                    if seqs[p] > _seq_in(txn, target):
                        txn.put(b"seq", str(seqs[p]).encode(), db=target.db["meta"])
        # 2. the manifest names the new owners
        m.owner, m.processes = new_owner, processes
        m.epochs = (m.epochs + [0] * processes)[:processes]
        mf.save(data, m)
        # 3. delete from each process what it no longer owns
        for p, store in stores.items():
            rows = _records(store, m.vshards, lambda v, p=p: new_owner[v] != p)
            with store.env.begin(write=True) as txn:
                for _, table, key, _ in rows:
                    txn.delete(key, db=store.db[table])
    finally:
        for store in stores.values():
            store.close()
    return {"processes": processes, "records_copied": dict(copied),
            "vshards_per_process": dict(sorted(Counter(new_owner).items()))}


def _seq_in(txn: Any, store: Store) -> int:
    raw = txn.get(b"seq", db=store.db["meta"])
    return int(raw) if raw else 0


def show(data: str | Path) -> dict[str, Any]:
    m = mf.load(data)
    if m is None:
        raise ConfigError(f"{data} is not a sharded data folder (no {mf.FILE})")
    return {"vshards": m.vshards, "processes": m.processes,
            "vshards_of": {p: m.vshards_of(p) for p in range(m.processes)}}
