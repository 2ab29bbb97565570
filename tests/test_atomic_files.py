"""Files the project writes (the front's settings, the shards' manifest, the
console's users) are written through ``storage.files.write_atomically``:
whatever a stale ``.tmp`` path holds, a FIFO or a symbolic link, is
replaced, never waited on or followed; and a FIFO given as the console's
users file is refused, not waited on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from shards import manifest as mf
from shards.supervisor import write_json
from storage import files

ROOT = Path(__file__).resolve().parent.parent


def test_the_file_is_replaced_whole_with_its_mode(tmp_path: Path) -> None:
    file = tmp_path / "front.json"
    file.write_text("old")
    os.chmod(file, 0o644)
    files.write_atomically(file, "new", mode=0o600)
    assert file.read_text() == "new"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert not (tmp_path / "front.json.tmp").exists()


def test_a_fifo_at_the_temporary_path_is_replaced_not_waited_on(tmp_path: Path) -> None:
    file = tmp_path / "front.json"
    os.mkfifo(tmp_path / "front.json.tmp")  # open(O_WRONLY) of it would wait for a reader
    write_json(file, {"shards": 2})
    assert json.loads(file.read_text()) == {"shards": 2}
    assert not (tmp_path / "front.json.tmp").exists()


def test_a_link_at_the_temporary_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    data = tmp_path / "data"
    data.mkdir()
    (data / "shards.json.tmp").symlink_to(victim)  # the manifest's temporary path
    manifest = mf.open_or_create(data, 2)
    mf.save(data, manifest)
    assert victim.read_text() == "keep me"
    assert mf.load(data) == manifest
    assert not (data / "shards.json.tmp").is_symlink()


def test_a_fifo_as_the_console_users_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "users"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "app.cli", "console", "passwd", str(fifo),
                           "bea", "--password-stdin"], cwd=ROOT, input="long-enough\n",
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "not a regular file: a FIFO" in done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # left as it was


def test_the_umask_applies_unless_a_mode_is_asked_for(tmp_path: Path) -> None:
    """An operator's umask (027 on a hardened host) keeps the service's own
    files from other users, as it does the LMDB files next to them; a mode
    asked for (the console's users file, 0600) holds whatever the umask."""
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "front.json", {"shards": 2})
        mf.save(tmp_path, mf.open_or_create(tmp_path, 2))
        os.umask(0)
        files.write_atomically(tmp_path / "users", "u\n", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "front.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "shards.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "users").stat().st_mode) == 0o600
