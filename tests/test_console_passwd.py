"""``oms console passwd FILE NAME`` run twice at once: each reads the file,
changes its line and writes it back, so without a lock one update was lost.
The update is serialised across processes by an ``flock`` on ``FILE.lock``.
Real processes, tmp folders; no sleeps (the waiting run says so first)."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
from pathlib import Path

from console.auth import authenticate, load_users
from storage import files

ROOT = Path(__file__).resolve().parent.parent


def passwd(file: Path, name: str) -> subprocess.Popen[str]:
    """``oms console passwd FILE NAME --password-stdin``, started (the
    password comes from a file next to FILE)."""
    secret = file.with_name(f"{name}.input")
    secret.write_text(f"{name}-password\n")
    with open(secret) as stdin:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "console", "passwd",
                                 str(file), name, "--password-stdin"], cwd=ROOT, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def test_a_passwd_waits_for_the_lock_and_reads_the_file_after_it(tmp_path: Path) -> None:
    """The test holds the lock as another passwd would, and changes the file
    meanwhile: the waiting run says it waits, then keeps that change."""
    file = tmp_path / "users"
    finished(passwd(file, "ann"))
    with open(tmp_path / "users.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = passwd(file, "bea")
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready, "no word from the waiting passwd"
        line = proc.stderr.readline()
        assert "waiting for" in line and "users.lock" in line, line
        assert proc.poll() is None and "bea:" not in file.read_text()
        # the other writer's update, made while it holds the lock
        files.write_atomically(file, file.read_text() + "cat:viewer:" +
                               file.read_text().splitlines()[-1].split(":", 2)[2] + "\n",
                               mode=0o600)
    finished(proc)
    users = load_users(file)
    assert sorted(users) == ["ann", "bea", "cat"]
    assert authenticate(users, "bea", "bea-password") is not None


def test_concurrent_passwd_runs_lose_no_user(tmp_path: Path) -> None:
    file = tmp_path / "users"
    names = [f"user{k}" for k in range(6)]
    procs = [passwd(file, name) for name in names]
    for proc in procs:
        finished(proc)
    users = load_users(file)
    assert sorted(users) == names
    assert oct(file.stat().st_mode & 0o777) == "0o600"


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    os.symlink(victim, tmp_path / "users.lock")
    proc = passwd(tmp_path / "users", "ann")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "oms console passwd:" in err and "symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "keep me\n" and not (tmp_path / "users").exists()
