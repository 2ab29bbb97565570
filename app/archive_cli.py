"""`oms archive`: list the archive files, find an archived order (reads the files directly)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from storage.archive import PREFIX, SUFFIX, ArchiveDamaged, files, folder, iter_file


def add_parser(sub: Any) -> None:
    p = sub.add_parser("archive", help="archived (retired) orders: list files, find an order",
                       description="Reads the archive files in the data folder directly "
                       "(of a sharded folder: every shard's); works with the service "
                       "running or stopped.")
    p.add_argument("--data", help="data folder (env OMS_DATA; default ./oms-data)")
    asub = p.add_subparsers(dest="action", required=True)
    ls = asub.add_parser("list", help="archive files: day and size (and orders, --count)")
    ls.add_argument("--count", action="store_true",
                    help="also count each file's orders (reads every file)")
    ls.add_argument("--json", action="store_true")
    find = asub.add_parser("find", help="an archived order by id or by external id")
    find.add_argument("order_id", nargs="?")
    find.add_argument("--source", help="source_system (with --external-id)")
    find.add_argument("--external-id")
    find.add_argument("--json", action="store_true")


def cmd_archive(args: argparse.Namespace) -> int:
    from actors.settings import load_config

    data = load_config(None, data=args.data).data
    if not _is_data_folder(Path(data)):  # not "0 files": the archive was never looked at
        print(f"oms archive: {data} is not an oms data folder (no data.mdb, shards manifest "
              "or archive in it); give it with --data or OMS_DATA", file=sys.stderr)
        return 2
    if args.action == "list":
        rows = []
        for path in _all_files(data):
            row: dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size,
                                   "day": path.name[len(PREFIX):len(PREFIX) + 10]}
            if args.count:
                row["orders"], cut = _count(path)
                if cut is not None:
                    row["damaged_at"] = cut.offset
                    print(f"oms archive list: {cut}", file=sys.stderr)
            rows.append(row)
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                n = f"{r['orders']:>9} orders  " if args.count else ""
                note = f"  DAMAGED from byte {r['damaged_at']}" if "damaged_at" in r else ""
                print(f"{r['day']}  {n}{r['bytes']:>12} bytes  {r['file']}{note}")
            total = f", {sum(r['orders'] for r in rows)} orders" if args.count else ""
            print(f"{len(rows)} files, {sum(r['bytes'] for r in rows)} bytes{total}")
        return 1 if any("damaged_at" in r for r in rows) else 0
    if not args.order_id and not (args.source and args.external_id):
        print("oms archive find: give ORDER_ID, or --source and --external-id",
              file=sys.stderr)
        return 2
    damaged: list[str] = []
    for path in reversed(_all_files(data)):
        try:
            for rec in iter_file(path):
                if _matches(rec["order"], args):
                    _show(rec, path, args.json)
                    return 0
        except ArchiveDamaged as exc:  # the orders past the damage cannot be searched
            print(f"oms archive find: {exc}", file=sys.stderr)
            damaged.append(path.name)
    more = f" (not searched past the damage in {', '.join(damaged)})" if damaged else ""
    print(f"no such order in the archive{more}", file=sys.stderr)
    return 1


def _is_data_folder(data: Path) -> bool:
    """A folder ``oms serve`` wrote: its store, a sharded folder's manifest,
    or an archive (kept when the store was moved away)."""
    from shards import manifest as mf

    return data.is_dir() and any((data / name).exists()
                                 for name in ("data.mdb", mf.FILE, folder(data).name))


def _all_files(data: str) -> list[Path]:
    """The archive files of the folder, oldest day first; of a sharded
    folder (``oms serve --shards N``), those of every shard's folder."""
    from shards import manifest as mf

    roots = [Path(data)]
    if (roots[0] / mf.FILE).exists():
        roots = [p for p in sorted(roots[0].glob("shard-*")) if p.is_dir()]
    found = [p for root in roots for p in files(root)]
    found += [p for root in roots for p in folder(root).glob(f"{PREFIX}*{SUFFIX}.set-aside-*")]
    return sorted(found, key=lambda p: (p.name, str(p)))


def _count(path: Any) -> tuple[int, ArchiveDamaged | None]:
    n = 0
    try:
        for _ in iter_file(path):
            n += 1
    except ArchiveDamaged as exc:
        return n, exc
    return n, None


def _matches(view: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.order_id:
        return bool(view.get("order_id") == args.order_id)
    return bool(view.get("source_system") == args.source
                and view.get("external_id") == args.external_id)


def _show(rec: dict[str, Any], path: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(dict(rec, file=str(path)), default=repr))
        return
    from app.orders_cli import render_order

    print(f"archived in {path.name}, finished "
          f"{_when(rec['finished_ts'])}, archived {_when(rec['archived_ts'])}")
    if "unreadable" in rec:  # retention keeps a record it could not decode, as raw bytes
        print(f"{rec['order'].get('order_id')}: its record could not be decoded when it was "
              f"archived ({rec['unreadable']}); its {len(rec.get('raw') or b'')} raw bytes "
              "are kept in the archive (--json shows them)")
        return
    print(render_order(rec["order"]))


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
