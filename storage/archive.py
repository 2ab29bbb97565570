"""The order archive: append-only files of finished orders, one per UTC day.

Retention (``actors.retention``) moves finished orders out of the live LMDB
store into ``<data>/archive/orders-YYYY-MM-DD.gz`` (the day the order
finished). A file is a series of gzip members; each member holds up to
``MEMBER_ORDERS`` records, each a 4-byte big-endian length and a msgpack
map ``{order: <the final order view>, finished_ts, archived_ts}``.
``zcat`` of a file gives the records back to back; Python's ``gzip`` reads
the members as one stream.

Exactly once: a batch is appended, flushed and fsynced before the store
writer deletes its orders; the same LMDB transaction records the file's new
committed length (``meta`` ``arch:<day>``) and, per order, where its member
starts (the ``arch`` index). A crash after the fsync and before that commit
leaves bytes past the committed length: they are cut off (``repair``) before
the file is appended to again and when retention starts, and those orders,
still live, are archived again. So an order is in exactly one place.

This module does file I/O only; it never opens LMDB.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from oms import codec

MEMBER_ORDERS = 32  # records per gzip member: a get_order reads one member
_LEN = struct.Struct(">I")
PREFIX, SUFFIX = "orders-", ".gz"


def folder(data: str | Path) -> Path:
    return Path(data) / "archive"


def day_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def file_for(data: str | Path, day: str) -> Path:
    return folder(data) / f"{PREFIX}{day}{SUFFIX}"


def encode_records(records: list[dict[str, Any]]) -> bytes:
    """One gzip member holding ``records``."""
    raw = b"".join(_LEN.pack(len(p)) + p for p in (codec.pack(r) for r in records))
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    return comp.compress(raw) + comp.flush()


def decode_records(raw: bytes) -> Iterator[dict[str, Any]]:
    pos = 0
    while pos + _LEN.size <= len(raw):
        (n,) = _LEN.unpack_from(raw, pos)
        pos += _LEN.size
        if pos + n > len(raw):
            raise ValueError("archive record cut short")
        yield codec.unpack(raw[pos:pos + n])
        pos += n


def append(path: Path, committed: int, members: list[bytes]) -> tuple[list[int], int]:
    """Append ``members`` after the first ``committed`` bytes (anything past
    them is an uncommitted tail from a crash, and is cut off); flush and
    fsync. Returns each member's offset and the file's new length."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent.parent)  # the archive folder's own entry
    new = not path.exists()
    with open(path, "ab") as f:
        size = f.seek(0, os.SEEK_END)
        if size < committed:  # never pad a damaged or replaced file with zeros
            raise OSError(f"archive file {path} has {size} bytes, fewer than the "
                          f"{committed} committed: restore it (orders stay live meanwhile)")
        if size > committed:
            f.truncate(committed)
            f.seek(committed)
        offsets = []
        for member in members:
            offsets.append(f.tell())
            f.write(member)
        f.flush()
        os.fsync(f.fileno())
        end = f.tell()
    if new:  # the new directory entry must be durable too
        _fsync_dir(path.parent)
    return offsets, end


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(data: str | Path, committed: dict[str, int],
           live: Callable[[list[str]], bool] | None = None) -> list[str]:
    """Cut every archive file to its committed length. A file with none
    recorded is an uncommitted first write, emptied, when ``live`` says every
    order it holds is still in the live store (they are archived again);
    otherwise this store never wrote it (a store deleted or replaced while
    its archive stayed) and its orders exist nowhere else: it is set aside
    (renamed ``...gz.set-aside-<time>``), whole. Returns what was done."""
    cut = []
    for path in sorted(folder(data).glob(f"{PREFIX}*{SUFFIX}")):
        day = path.name[len(PREFIX):-len(SUFFIX)]
        keep = committed.get(day, 0)
        size = path.stat().st_size
        if day not in committed and size > 0 and live is not None and not live(_ids(path)):
            aside = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
            path.rename(aside)
            _fsync_dir(path.parent)
            cut.append(f"{path.name}: no committed length in this store; {size} bytes set "
                       f"aside as {aside.name}")
        elif size > keep:
            with open(path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            cut.append(f"{path.name}: {size - keep} bytes past the committed {keep}")
    return cut


class ArchiveDamaged(ValueError):
    """An archive file cannot be read from ``offset`` on (damaged or cut
    short by hand): the records before it were read."""

    def __init__(self, path: Path, offset: int, reason: object) -> None:
        super().__init__(f"{path.name}: unreadable from byte {offset}: {reason}")
        self.path, self.offset = path, offset


def _member(f: BinaryIO, path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The records of the member starting at ``offset``, and where it ends."""
    d = zlib.decompressobj(31)
    out, pos = [], offset
    f.seek(offset)
    try:
        while not d.eof:
            chunk = f.read(64 * 1024)
            if not chunk:
                raise ArchiveDamaged(path, offset, "the member is cut short")
            out.append(d.decompress(chunk))
            pos += len(chunk)
        records = list(decode_records(b"".join(out)))
    except (zlib.error, ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors
        raise exc if isinstance(exc, ArchiveDamaged) else ArchiveDamaged(path, offset, exc) \
            from None
    if not all(isinstance(r, dict) and isinstance(r.get("order"), dict) for r in records):
        raise ArchiveDamaged(path, offset, "not an archive record")
    return records, pos - len(d.unused_data)


def _ids(path: Path) -> list[str]:
    """The order ids of a file's readable records."""
    ids: list[str] = []
    try:
        for rec in iter_file(path):
            ids.append(str(rec["order"].get("order_id")))
    except ArchiveDamaged:
        pass  # a torn write: what was readable
    return ids


def read_member(path: Path, offset: int) -> list[dict[str, Any]]:
    """The records of the one member starting at ``offset``
    (``ArchiveDamaged`` when it cannot be read)."""
    with open(path, "rb") as f:
        return _member(f, path, offset)[0]


def find_in_member(path: Path, offset: int, order_id: str) -> dict[str, Any] | None:
    for rec in read_member(path, offset):
        if rec["order"].get("order_id") == order_id:
            return rec
    return None


def iter_file(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a file, member by member; ``ArchiveDamaged`` at the
    first member that cannot be read (after yielding those before it)."""
    with open(path, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, 0
        while offset < size:
            records, offset = _member(f, path, offset)
            yield from records


def files(data: str | Path) -> list[Path]:
    return sorted(folder(data).glob(f"{PREFIX}*{SUFFIX}"))
