"""Review 13: the sharded service's private socket folder (``shards.rundir``),
``DATA/supervisor.lock`` and the start's failures, attacked as another user
of the host and as an unlucky operator would (docs/scaling.md, "Who can
reach a shard"). Real processes and sockets where a process is involved."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import poll_until, retail_order
from test_shard_sockets import NOBODY
from test_shards import Sharded

from app.cli import main
from bench.ports import free_block, free_endpoint
from shards import rundir

ROOT = Path(__file__).resolve().parent.parent


def refused(data: Path, env: dict[str, str] | None = None, shards: int = 2) -> str:
    """``oms serve --shards 2`` (or ``shards``) on ``data`` (a process of its
    own, on ports of this test's range): exits 2 at once; its message. A
    start that is not refused is stopped at the deadline and fails the test."""
    eps = [free_endpoint() for _ in range(3)]
    argv = [sys.executable, "-m", "app.cli", "serve", "--shards", str(shards), "--data",
            str(data),
            "--intake", eps[0], "--events", eps[1], "--domain-events", eps[2],
            "--metrics-port", "0", "--shard-base-port", str(free_block(8))]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **(env or {})}) as proc:
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.terminate()
            err = proc.communicate(timeout=60)[1]
            raise AssertionError(f"started, not refused: {err[-2000:]}") from None
    assert proc.returncode == 2, err[-2000:]
    return err


def gone(pid: int) -> bool:
    """``pid`` has exited (a zombie its stopped parent has not reaped counts:
    its files, and so its locks, are closed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_a_move_is_refused_while_the_supervisor_runs_even_with_its_shards_down(
        procs: Any, tmp_path: Path, capsys: Any) -> None:
    """Between a shard's exit and its restart (0.5 to 10 s of backoff) its
    folder's lock is free: ``oms shards move`` must not rewrite the manifest
    and move records under the running front (which routes with the old
    owners) just because no shard holds its lock at that moment."""
    s = Sharded(procs, tmp_path)
    sup = s.svc.p.pid
    shards = [s.shard_pid(k) for k in (0, 1)]
    manifest = (s.data / "shards.json").read_text()
    os.kill(sup, signal.SIGSTOP)  # holds the restart back: the window, made to last
    try:
        for pid in shards:
            os.kill(pid, signal.SIGKILL)
        poll_until(lambda: all(gone(pid) for pid in shards), timeout=30)
        capsys.readouterr()
        assert main(["shards", "move", "--data", str(s.data), "--processes", "3"]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {sup} (oms serve --shards)" in err, err
        assert (s.data / "shards.json").read_text() == manifest
        assert not (s.data / "shard-2").exists()
    finally:
        os.kill(sup, signal.SIGCONT)
    with s.client(timeout=10) as client:  # the supervisor restarts both: served again
        client.wait_ready(30)
        reply = client.submit(retail_order("move-1", customer={"id": "move-c"}))
        assert reply["type"] == "accepted", reply
    assert s.svc.terminate() == 0
    # stopped: the move runs, and holds the folder while it does
    assert main(["shards", "move", "--data", str(s.data), "--processes", "3"]) == 0
    assert "processes" in capsys.readouterr().out


def test_a_serve_is_refused_while_a_move_holds_the_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "supervisor.lock", "a+") as held:  # what a running move holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 (oms shards move)\n")
        held.flush()
        err = refused(data)
    assert "in use by pid 4242 (oms shards move)" in err, err
    assert not (data / "front.json").exists() and not (data / "run").exists()


@pytest.mark.parametrize("hostile", ["folder", "fifo"])
def test_a_lock_path_that_is_no_file_is_exit_2_not_a_traceback(
        tmp_path: Path, hostile: str) -> None:
    """As ``oms serve`` says of its own ``oms.lock`` ("cannot start", exit 2)."""
    lock = tmp_path / "supervisor.lock"
    lock.mkdir() if hostile == "folder" else os.mkfifo(lock)
    err = refused(tmp_path)
    assert "cannot start" in err and "supervisor.lock" in err, err
    assert not (tmp_path / "run").exists()


def test_a_settings_file_that_cannot_be_written_is_exit_2_and_frees_the_folder(
        tmp_path: Path) -> None:
    (tmp_path / "front.json").mkdir()  # replace() of a file over a folder: EISDIR
    err = refused(tmp_path)
    assert "cannot start" in err and "front.json" in err, err
    with open(tmp_path / "supervisor.lock", "a+") as lock:  # released on the way out
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- the folders above DATA/run: nobody else may swap it after the check --------


def test_a_data_folder_others_may_write_to_is_refused(tmp_path: Path) -> None:
    """Another user who may write to DATA (or to any folder above it) can
    rename DATA/run away once the supervisor checked it and put a folder of
    their own there: the shards then bind in it, and that user can swap a
    shard's socket for a listener of their own, which the front connects to."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky
    err = refused(shared / "data")
    assert f"{shared}" in err and "other users may write to it" in err, err
    assert not (shared / "data" / "run").exists()
    shared.chmod(0o1777)  # sticky (as /tmp): nobody else may rename what is ours
    made = rundir.open_run_dir(shared / "data", 2)
    assert made.path == shared / "data" / "run" and not made.temporary


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
@pytest.mark.parametrize("deep", [False, True])
def test_a_data_folder_of_another_user_is_refused(tmp_path: Path, deep: bool) -> None:
    """E.g. a data folder in /tmp that another user made first. Refused
    before anything is written in it, and with a path too long for the
    sockets as well (they would be in /tmp): that user could replace
    ``front.json`` (read again at each restart of the front) with one
    without CURVE keys, or its shard folders."""
    data = tmp_path / ("long-" * 18 if deep else "") / "data"
    data.mkdir(mode=0o755, parents=True)
    os.chown(data, NOBODY, NOBODY)
    err = refused(data)
    assert f"{data} belongs to user id {NOBODY}" in err, err
    assert sorted(data.iterdir()) == []


def test_a_link_in_the_data_path_is_resolved_once_at_start(tmp_path: Path) -> None:
    """The sockets' paths are the real ones, so a link along DATA's path
    changed later (by whoever may change it) moves no shard's socket."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    made = rundir.open_run_dir(tmp_path / "link" / "data", 2)
    assert made.path == real / "data" / "run"
    assert stat.S_IMODE(os.lstat(made.path).st_mode) == 0o700


def test_a_temporary_folder_in_a_folder_others_may_write_to_is_refused(
        tmp_path: Path) -> None:
    open_tmp = tmp_path / "tmp"
    open_tmp.mkdir()
    open_tmp.chmod(0o777)  # TMPDIR writable by all, not sticky
    err = refused(tmp_path / ("d" * 120), env={"TMPDIR": str(open_tmp)})
    assert f"{open_tmp}" in err and "other users may write to it" in err, err
    assert list(open_tmp.iterdir()) == []


@pytest.mark.slow
def test_a_data_folder_that_takes_no_unix_socket_uses_a_temporary_folder(
        procs: Any, tmp_path: Path) -> None:
    """A filesystem without Unix sockets (SMB, vfat, some FUSE mounts: bind
    gives EPERM or EOPNOTSUPP) served the shards' TCP ports before; an
    immutable DATA/run (chattr +i: EPERM to any bind in it, even root's)
    stands in for one here. The shards' sockets go to a private temporary
    folder, as for a path too long, instead of every shard exiting 2."""
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True, mode=0o700)
    if subprocess.run(["chattr", "+i", str(run)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    try:
        s = Sharded(procs, tmp_path)
        front = (s.data / "front.json").read_text()
        assert f"ipc://{run}/" not in front and "oms-run-" in front
        assert "takes no Unix socket" in s.svc.log.read_text()
        with s.client(timeout=10) as client:
            client.wait_ready(20)
            reply = client.submit(retail_order("nosock-1"))
            assert reply["type"] == "accepted", reply
        assert s.svc.terminate() == 0
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)


# -- lock files: whoever may write to their folder cannot make the service
#    truncate another file through them -------------------------------------


@pytest.mark.parametrize("lock", ["supervisor.lock", "shard-0/oms.lock", "oms.lock"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_that_names_another_file_is_refused_and_that_file_kept(
        tmp_path: Path, lock: str, kind: str) -> None:
    """A lock is opened for writing (and truncated) by a service that often
    runs as root: a link planted at its path (by a user who could write to
    the data folder, before the start refused that folder, or to a shard's
    folder) made it overwrite the file it names, /etc/passwd as well as
    this ``victim``. Refused instead: exit 2, the file as it was."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    data = tmp_path / "data"
    (data / lock).parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        (data / lock).symlink_to(victim)
    else:
        os.link(victim, data / lock)
    if lock.startswith("shard-0"):  # a shard's own lock: its start fails, so does the service's
        err = refused(data)
        assert "shard-0 exited with code 2" in err, err
    else:
        err = refused(data, shards=2 if lock == "supervisor.lock" else 1)
    assert "cannot start" in err and lock.rsplit("/", 1)[-1] in err, err
    assert victim.read_text() == "precious\n"
