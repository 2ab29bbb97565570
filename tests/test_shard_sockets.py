"""The shards' own endpoints are Unix sockets in a folder only the service's
user may enter (``shards.rundir``, docs/scaling.md and docs/security.md):
with CURVE on, nothing on the host but the front (and that user) reaches a
shard, which would serve it as it serves the front, past every identity rule.
Real processes, real sockets; the hostile folders are refused at start."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import curve_keys, retail_order
from test_shards import Sharded

from gateways.client import Client, wait_terminal
from shards import rundir

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # one another user may run (this venv's may be in /root)


def tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def connect_as_nobody(path: Path) -> str:
    """What another user of the host gets connecting to the Unix socket ``path``."""
    def become_nobody() -> None:  # pragma: no cover - runs in the child
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    script = ("import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1]); print('connected')\n"
              "except OSError as exc:\n    print(type(exc).__name__)\n")
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", script, str(path)], capture_output=True,
                         text=True, timeout=30, preexec_fn=become_nobody, check=True)
    return out.stdout.strip()


def stale_socket(path: Path) -> None:
    """A socket file with no listener: what a process killed with -9 leaves."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


@pytest.mark.slow
def test_with_curve_no_local_client_reaches_a_shard_past_the_front(
        procs: Any, tmp_path: Path) -> None:
    from conftest import free_port

    # data in a folder every user may pass through (pytest's own tmp is 0700):
    # only DATA/run's 0700 stands between another user and the shards
    open_dir = Path(tempfile.mkdtemp(prefix="oms-sock-"))
    try:
        open_dir.chmod(0o755)
        data = open_dir / "data"
        data.mkdir(mode=0o755)
        keys = curve_keys(tmp_path / "keys", ["web", "domains"])
        s = Sharded(procs, tmp_path, data=data, sim_args=(
            "--curve-key", str(keys.folder / "own" / "domains.key_secret"),
            "--service-key", str(keys.folder / "server" / "server.key")), serve_args=(
            "--curve-server-key", str(keys.folder / "server" / "server.key_secret"),
            "--curve-clients", str(keys.allowed), "--metrics-port", str(free_port())))
        run = data / "run"
        st = os.lstat(run)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
        front = json.loads((data / "front.json").read_text())
        assert [sh["intake"] for sh in front["shards"]] == [f"ipc://{run}/0.intake",
                                                            f"ipc://{run}/1.intake"]
        for k in (0, 1):
            for name in rundir.NAMES:
                assert stat.S_ISSOCK(os.lstat(run / f"{k}.{name}").st_mode)
            # a shard listens on TCP for its metrics only; its former ports are closed
            assert tcp_listening_ports(s.shard_pid(k)) == {s.base + 4 * k + 3}
            for port in range(s.base + 4 * k, s.base + 4 * k + 3):
                with pytest.raises(ConnectionRefusedError), socket.create_connection(
                        ("127.0.0.1", port), timeout=5):
                    pass
        with Client(f"tcp://127.0.0.1:{s.base}", timeout=0.5) as direct, \
                pytest.raises(TimeoutError):
            direct.request({"type": "order_counts"})  # no CURVE, past the front: nothing
        if os.geteuid() == 0 and Path(SYSTEM_PYTHON).exists():
            # another user: may pass through DATA, not into DATA/run
            with socket.socket(socket.AF_UNIX) as control:  # a socket open to all, in DATA
                control.bind(str(data / "control"))
                control.listen()
                (data / "control").chmod(0o777)
                assert connect_as_nobody(data / "control") == "connected"
            for k in (0, 1):  # even a socket open to all (a umask of 0): the folder stops it
                (run / f"{k}.intake").chmod(0o777)
                assert connect_as_nobody(run / f"{k}.intake") == "PermissionError"
        with Client(s.eps.intake, curve=keys.opts("web"), timeout=10) as web:
            web.wait_ready(20)
            reply = web.submit(retail_order("sock-1"))
            assert reply["type"] == "accepted", reply
            wait_terminal(web, [reply["order_id"]], timeout=30)
        assert s.svc.terminate() == 0
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


@pytest.mark.slow
def test_socket_files_left_by_a_killed_run_do_not_stop_a_start(
        procs: Any, tmp_path: Path) -> None:
    """(A clean stop leaves them too: libzmq 4.3 does not remove a socket
    file when it closes; each start binds over what it finds.)"""
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True, mode=0o700)
    for k in (0, 1):
        for name in rundir.NAMES:
            stale_socket(run / f"{k}.{name}")
    s = Sharded(procs, tmp_path)
    with s.client(timeout=10) as client:
        client.wait_ready(20)
        reply = client.submit(retail_order("stale-1", customer={"id": "stale-c"}))
        assert reply["type"] == "accepted", reply
    # a second copy of shard 0 (same folder, same sockets) must not bind over
    # the live one's: it stops at the folder's lock (exit 2) before any bind
    ep = {name: f"ipc://{run}/0.{name}" for name in rundir.NAMES}
    copy = procs(["serve", "--data", str(s.data / "shard-0"), "--intake", ep["intake"],
                  "--events", ep["events"], "--domain-events", ep["domain"],
                  "--metrics-port", "0"], "copy")
    assert copy.p.wait(60) == 2
    with Client(ep["intake"], timeout=5) as direct:  # a new connection: the live shard's
        assert direct.request({"type": "order_counts"})["type"] == "order_counts"
    assert s.svc.terminate() == 0


@pytest.mark.slow
def test_a_data_path_too_long_for_the_sockets_uses_a_private_temporary_folder(
        procs: Any, tmp_path: Path) -> None:
    from app.cli import main

    data = tmp_path / ("long-" * 18) / "data"
    assert not rundir.fits(data.absolute() / "run", 2)
    s = Sharded(procs, tmp_path, data=data)
    front = json.loads((data / "front.json").read_text())
    where = Path(front["shards"][0]["intake"].removeprefix("ipc://")).parent
    assert where.parent == Path(tempfile.gettempdir()) and where.name.startswith("oms-run-")
    st = os.lstat(where)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert "too long for the shards' sockets" in s.svc.log.read_text()
    # a second supervisor on the folder is refused before it rewrites front.json
    # (its temporary folder would have moved the running front's connections)
    assert main(serve_argv(data)) == 2
    assert json.loads((data / "front.json").read_text()) == front
    with s.client(timeout=10) as client:
        client.wait_ready(20)
        reply = client.submit(retail_order("long-1"))
        assert reply["type"] == "accepted", reply
    assert s.svc.terminate() == 0
    assert not where.exists()  # removed at stop


def serve_argv(data: Path) -> list[str]:
    """``oms serve --shards 2`` on ``data``, on ports of this test's range: a
    start that should have been refused must not take the default ports
    (another service on the host may be using them)."""
    from bench.ports import free_block, free_endpoint

    return ["serve", "--data", str(data), "--shards", "2", "--intake", free_endpoint(),
            "--events", free_endpoint(), "--domain-events", free_endpoint(),
            "--metrics-port", "0", "--shard-base-port", str(free_block(8))]


def refused(data: Path, capsys: Any) -> str:
    """``oms serve --shards 2`` on ``data``: exit 2; its message."""
    from app.cli import main

    assert main(serve_argv(data)) == 2
    return capsys.readouterr().err


def test_a_socket_folder_others_may_enter_is_refused_not_changed(tmp_path: Path,
                                                                 capsys: Any) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o755)
    err = refused(tmp_path, capsys)
    assert "has mode 0755" in err and "chmod 700" in err
    assert stat.S_IMODE(os.lstat(run).st_mode) == 0o755  # as found
    run.chmod(0o710)
    assert "has mode 0710" in refused(tmp_path, capsys)


def test_a_socket_folder_that_is_a_link_or_a_file_is_refused(tmp_path: Path,
                                                             capsys: Any) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)  # private, but not where the service looks
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "run").symlink_to(elsewhere)
    assert "is a symbolic link" in refused(tmp_path / "data", capsys)
    assert list(elsewhere.iterdir()) == []
    (tmp_path / "data" / "run").unlink()
    (tmp_path / "data" / "run").symlink_to(tmp_path / "nowhere")  # dangling: not made
    assert "is a symbolic link" in refused(tmp_path / "data", capsys)
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "data" / "run").unlink()
    (tmp_path / "data" / "run").write_text("")
    assert "is not a folder" in refused(tmp_path / "data", capsys)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_socket_folder_of_another_user_is_refused(tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    assert f"belongs to user id {NOBODY}" in refused(tmp_path, capsys)


def test_too_long_both_in_data_and_in_tmpdir_is_refused(tmp_path: Path, capsys: Any,
                                                        monkeypatch: Any) -> None:
    long_tmp = tmp_path / ("t" * 120)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    err = refused(tmp_path / ("d" * 120), capsys)
    assert "longer than 107 bytes" in err and "shorter --data" in err
    assert list(long_tmp.iterdir()) == []  # the temporary folder made is gone again


def test_the_path_limit_is_libzmq_s(tmp_path: Path) -> None:
    """``rundir.fits`` agrees with what ZeroMQ binds: a socket path of exactly
    the limit binds, one byte more is refused."""
    ctx = zmq.Context.instance()
    base = len(os.fsencode(tmp_path / "x" / "1.domain")) - 1  # the folder name's length: 1
    for extra, fits in ((0, True), (1, False)):
        folder = tmp_path / ("x" * (rundir.PATH_MAX - base + extra))
        assert rundir.fits(folder, 2) is fits
        folder.mkdir()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if fits:
                sock.bind(f"ipc://{rundir.socket_path(folder, 1, 'domain')}")
            else:
                with pytest.raises(zmq.ZMQError):
                    sock.bind(f"ipc://{rundir.socket_path(folder, 1, 'domain')}")
        finally:
            sock.close()
