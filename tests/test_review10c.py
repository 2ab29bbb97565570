"""Hostile review 10 (c): the archive damaged by hand, the operator CLI on
it, the sharded front under faults, CURVE key folders. Real files, real
processes, loopback only, bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, free_port
from helpers import curve_keys, poll_until, retail_order
from test_shards import Sharded, front_metric
from test_store_full import readyz, submit_until_refused

from actors.security import SecurityError
from gateways.client import Client
from storage import archive

ROOT = Path(__file__).resolve().parent.parent


def _view(order_id: str, ext: str) -> dict[str, Any]:
    return {"order_id": order_id, "order_type": "retail", "state": "completed",
            "source_system": "web", "external_id": ext, "customer": {"id": "c1"},
            "items": [], "steps": [], "history": []}


def _write_day(data: Path, day: str, batches: list[list[str]]) -> Path:
    """An archive file of ``day`` with one member per batch of order ids."""
    path = archive.file_for(data, day)
    members = [archive.encode_records([
        {"order": _view(oid, f"ext-{oid}"), "finished_ts": 1.0e9, "archived_ts": 1.1e9}
        for oid in batch]) for batch in batches]
    archive.append(path, 0, members)
    return path


def _oms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_archive_file_does_not_hide_the_other_files_from_the_cli(
        tmp_path: Path, damage: str) -> None:
    """Before: `oms archive find` read the files newest first with
    ``gzip.open(...).read()``; one file cut short or damaged by hand (a
    copy that stopped, a bad disk block) raised EOFError / BadGzipFile /
    zlib.error out of the CLI as a traceback, so no older file was searched
    and `oms archive list --count` died the same way."""
    data = tmp_path / "data"
    _write_day(data, "2026-01-01", [["O000000000001"]])
    newer = _write_day(data, "2026-01-02", [["O000000000002"], ["O000000000003"]])
    raw = bytearray(newer.read_bytes())
    first = len(archive.encode_records([{"order": _view("O000000000002", "ext-O000000000002"),
                                         "finished_ts": 1.0e9, "archived_ts": 1.1e9}]))
    if damage == "truncated":
        del raw[-10:]
    else:
        for at in range(first + 12, first + 40):  # the second member's deflate data
            raw[at] ^= 0x5A
    newer.write_bytes(bytes(raw))
    for oid in ("O000000000001", "O000000000002"):  # older file; before the damage
        found = _oms("archive", "--data", str(data), "find", oid, "--json")
        assert found.returncode == 0, found.stderr
        assert "Traceback" not in found.stderr
        assert json.loads(found.stdout)["order"]["order_id"] == oid
    assert "orders-2026-01-02.gz" in _oms("archive", "--data", str(data), "find",
                                          "O000000000001").stderr
    lost = _oms("archive", "--data", str(data), "find", "O000000000003")
    assert lost.returncode == 1 and "Traceback" not in lost.stderr
    assert "not searched past the damage in orders-2026-01-02.gz" in lost.stderr
    listed = _oms("archive", "--data", str(data), "list", "--count", "--json")
    assert listed.returncode == 1 and "Traceback" not in listed.stderr  # a script notices
    rows = {r["day"]: r for r in json.loads(listed.stdout)}
    assert rows["2026-01-01"]["orders"] == 1 and "damaged_at" not in rows["2026-01-01"]
    assert rows["2026-01-02"]["orders"] == 1 and rows["2026-01-02"]["damaged_at"] == first


def test_a_damaged_member_is_an_archive_error_for_the_service_lookup(tmp_path: Path) -> None:
    """The service's get_order of an archived order reads one member
    (``find_in_member``); a damaged one raised ``zlib.error``, which
    ``actors.lookup.find_archived`` does not catch (it names OSError,
    ValueError, KeyError): now it is ``ArchiveDamaged``, a ValueError."""
    path = _write_day(tmp_path, "2026-01-01", [["O000000000001", "O000000000002"]])
    raw = bytearray(path.read_bytes())
    for at in range(12, 30):
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unreadable from byte 0"):
        archive.find_in_member(path, 0, "O000000000002")
    with pytest.raises(archive.ArchiveDamaged):
        list(archive.iter_file(path))


@pytest.mark.slow
def test_one_public_key_under_two_names_is_refused_not_resolved_by_sort_order(
        procs: Any, tmp_path: Path, make_service: Any) -> None:
    """Before: ``load_clients`` mapped each public key to the name of the
    LAST file holding it, in sorted order. A channel's key copied by mistake
    as ``operator.key`` (sorted after ``aaa.key``) made that channel an
    operator on the next SIGHUP, silently. Now the folder is refused: at
    start (exit 2 / SecurityError) and on SIGHUP (the keys in force stay)."""
    keys = curve_keys(tmp_path / "keys", ["aaa"])
    secret = str(keys.folder / "server" / "server.key_secret")
    eps, port = Endpoints(), free_port()
    svc = procs(eps.serve_args(tmp_path / "data") + [
        "--curve-server-key", secret, "--curve-clients", str(keys.allowed),
        "--metrics-port", str(port)], "serve")
    with Client(eps.intake, curve=keys.opts("aaa")) as aaa:
        aaa.wait_ready(30)
        assert aaa.request({"type": "order_counts"})["code"] == "unauthorized"
    (keys.allowed / "operator.key").write_text((keys.allowed / "aaa.key").read_text())
    svc.p.send_signal(signal.SIGHUP)
    log = tmp_path / "serve.log"
    poll_until(lambda: "keys not reloaded" in log.read_text(), timeout=20)
    assert "hold the same public key" in log.read_text()
    assert front_metric(port, "oms_client_keys_reload_failed") == 1  # not only a log line
    with Client(eps.intake, curve=keys.opts("aaa")) as again:  # a new connection
        assert again.request({"type": "order_counts"})["code"] == "unauthorized"
    with pytest.raises(SecurityError, match="same public key"):
        make_service(curve_server_key=secret, curve_clients=str(keys.allowed))


@pytest.mark.slow
def test_the_fronts_readyz_says_not_ready_while_a_shard_cannot_write(
        procs: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """docs/protocol.md: while the store cannot write, `unavailable` answers
    and "/readyz says not ready while it lasts". Behind the front, the
    front's /readyz is the service's; before, it said ready whenever every
    shard answered its ping (a `get_order`), so a shard whose store could not
    write kept the front ready while every order routed to it was refused."""
    monkeypatch.setenv("OMS_MAP_SIZE_MB", "1")  # every shard's map capped at 2 MB
    monkeypatch.setenv("OMS_MAX_MAP_SIZE_MB", "2")
    port = free_port()
    s = Sharded(procs, tmp_path, serve_args=("--metrics-port", str(port)))
    poll_until(lambda: readyz(port) == 200, timeout=30)
    with s.client(timeout=20) as client:  # one customer: one shard fills
        _accepted, refused = submit_until_refused(client, "CAP-")
        assert refused and {r["code"] for r in refused} == {"unavailable"}
        poll_until(lambda: readyz(port) == 503, timeout=15)
        assert client.submit(retail_order("cap-again"))["code"] == "unavailable"


def test_the_consoles_login_sends_nobody_to_another_host() -> None:
    r"""Before: ``next=/\evil.example`` after a login passed the "local
    path" check (it starts with one slash, urlsplit sees no host) and the
    console redirected there; browsers read a backslash as a slash and
    drop tabs and newlines, so the operator landed on //evil.example."""
    pytest.importorskip("flask")
    from console.app import _local

    for hostile in ("/\\evil.example/", "/\\\\evil.example", "/\t/evil.example",
                    "/\n/evil.example", "\\/evil.example", "/ /evil.example"):
        assert not _local(hostile), hostile
    for fine in ("/", "/search?go=1", "/orders/O000000000001", "/search?q=a%20b"):
        assert _local(fine), fine


def test_archive_find_shows_an_order_archived_unreadable(tmp_path: Path) -> None:
    """Retention archives an order whose record it cannot decode as raw
    bytes ("nothing is dropped"); `oms archive find ID` then rendered its
    view ``{order_id}`` as a full order and died with KeyError."""
    from actors.retention import _archive_record

    rec, state, _ = _archive_record("O000000000007", b"\xc1 not a snapshot", 1_700_000_000_000,
                                    1.8e9)
    assert state == "unreadable"
    archive.append(archive.file_for(tmp_path, "2023-11-14"), 0, [archive.encode_records([rec])])
    found = _oms("archive", "--data", str(tmp_path), "find", "O000000000007")
    assert found.returncode == 0, found.stderr
    assert "could not be decoded" in found.stdout and "Traceback" not in found.stderr
    as_json = _oms("archive", "--data", str(tmp_path), "find", "O000000000007", "--json")
    assert as_json.returncode == 0 and "unreadable" in json.loads(as_json.stdout)


def _fill_front_index(folder: Path) -> int:
    """The front's dedup index as after about half a million orders: its
    LMDB at the 64 MiB it was opened with, full. How many keys it holds."""
    import lmdb

    from storage.records import ext_key

    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=64 * 1024 * 1024, max_dbs=2, sync=False,
                    metasync=False)
    db, n = env.open_db(b"ext"), 0
    for batch in (20_000, 500, 20, 1):  # to the last key that fits
        try:
            while True:
                with env.begin(write=True, db=db) as txn:
                    for k in range(n, n + batch):
                        txn.put(ext_key("web", f"old-{k}"), bytes([k % 64]))
                n += batch
        except lmdb.MapFullError:
            pass  # that transaction was aborted: smaller batches
    env.sync(True)
    env.close()
    return n


@pytest.mark.slow
def test_the_front_takes_orders_after_its_first_64_mib(procs: Any, tmp_path: Path) -> None:
    """Before: the front opened its dedup index with a fixed 64 MiB map and
    keeps every key for good (about 50 bytes each); at about 1.3 million orders
    the commit raised MapFullError out of the front's loop, so the front
    died at each round with a new submit, was restarted, and died again:
    the sharded service took no new order, ever. Now the map doubles."""
    held = _fill_front_index(tmp_path / "data" / "front")
    assert held > 1_000_000
    s = Sharded(procs, tmp_path)
    with s.client(timeout=30) as client:
        replies = [r for _q, r in client.pipeline(
            {"type": "submit_order", "order": retail_order(f"new-{n}", customer={"id": f"c{n}"})}
            for n in range(1500))]
        assert {r["type"] for r in replies} == {"accepted"}
        old = client.request({"type": "get_order", "source_system": "web",
                              "external_id": "old-1"})
        assert old["code"] == "not_found"  # known to the index, never created: harmless


def test_archive_find_does_not_let_an_order_drive_the_terminal(tmp_path: Path) -> None:
    """`oms orders` and `oms order show` print channel text through
    ``app.cli.Printable`` (control characters as ``\\xNN``); `oms archive
    find` printed the archived view raw, so an external id or a reason
    holding ``ESC [2J`` or an OSC title sequence reached the terminal."""
    view = dict(_view("O000000000009", "evil\x1b[2J\x1b]0;owned\x07"),
                state_reason="x\x1b[31mred")
    rec = {"order": view, "finished_ts": 1.0e9, "archived_ts": 1.1e9}
    archive.append(archive.file_for(tmp_path, "2026-01-03"), 0, [archive.encode_records([rec])])
    found = _oms("archive", "--data", str(tmp_path), "find", "O000000000009")
    assert found.returncode == 0, found.stderr
    assert "\x1b" not in found.stdout and "\x07" not in found.stdout
    assert "\\x1b[2J" in found.stdout


def test_archive_find_on_a_sharded_folder_looks_in_every_shard(tmp_path: Path) -> None:
    """Each shard archives into its own ``DATA/shard-K/archive``; `oms
    archive --data DATA find` looked only in ``DATA/archive`` and answered
    "no such order in the archive" for every archived order of a sharded
    service, and `list` showed no file."""
    from shards import manifest as mf

    data = tmp_path / "data"
    mf.open_or_create(data, 2)
    _write_day(mf.shard_folder(data, 0), "2026-01-01", [["O000000000100"]])
    _write_day(mf.shard_folder(data, 1), "2026-01-01", [["O000000000201"]])
    for oid in ("O000000000100", "O000000000201"):
        found = _oms("archive", "--data", str(data), "find", oid, "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["order"]["order_id"] == oid
    listed = _oms("archive", "--data", str(data), "list", "--count", "--json")
    assert sum(r["orders"] for r in json.loads(listed.stdout)) == 2


def test_a_new_store_does_not_empty_the_archive_it_finds(make_service: Any,
                                                         tmp_path: Path) -> None:
    """Before: at start, retention cut every archive file to the length its
    store had committed, and a file with none recorded to zero bytes. A
    store deleted or replaced (a corrupt data.mdb removed, a store restored
    elsewhere) while DATA/archive stayed had every archive file emptied at
    the next start: the only copy of those finished orders, destroyed. Now
    such a file is set aside, whole."""
    data = tmp_path / "data"
    path = _write_day(data, "2025-12-01", [["O000000000001", "O000000000002"]])
    size = path.stat().st_size
    make_service(data=str(data))
    kept = [p for p in archive.folder(data).iterdir() if p.name.startswith(path.name)]
    assert [p.stat().st_size for p in kept] == [size]
    records = list(archive.iter_file(kept[0]))
    assert [r["order"]["order_id"] for r in records] == ["O000000000001", "O000000000002"]
    listed = _oms("archive", "--data", str(data), "list", "--count", "--json")
    assert [(r["day"], r["orders"]) for r in json.loads(listed.stdout)] == [("2025-12-01", 2)]
    assert _oms("archive", "--data", str(data), "find", "O000000000002").returncode == 0


@pytest.mark.slow
def test_the_fronts_readyz_follows_a_hung_shard_and_fan_outs_answer(
        procs: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """SIGSTOP a shard (hung, connections open): the front's /readyz turns
    503 and `list_orders` / `order_counts`, which ask every shard, answer
    `internal` in bounded time (never silence); after SIGCONT all is back."""
    import os

    monkeypatch.setenv("OMS_FRONT_GIVE_UP_S", "2")
    port = free_port()
    s = Sharded(procs, tmp_path, serve_args=("--metrics-port", str(port)))
    poll_until(lambda: readyz(port) == 200, timeout=30)
    with s.client(timeout=20) as client:
        os.kill(s.shard_pid(1), signal.SIGSTOP)
        try:
            poll_until(lambda: readyz(port) == 503, timeout=20)
            for req in ({"type": "list_orders"}, {"type": "order_counts"}):
                reply = client.request(req)
                assert reply["type"] == "error" and reply["code"] == "internal", reply
        finally:
            os.kill(s.shard_pid(1), signal.SIGCONT)
        poll_until(lambda: readyz(port) == 200, timeout=20)
        counts = client.request({"type": "order_counts"})
        assert counts["type"] == "order_counts" and counts["writable"] is True
