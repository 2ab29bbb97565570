"""A data folder whose name is not valid UTF-8 (bytes such as
``b'/srv/x\\xff'``, which Python carries as a lone surrogate): every command
that takes ``--data`` refuses it with one line and exit 2, never a
traceback part way through the start (LMDB and ZeroMQ's socket paths take
UTF-8 only). Real processes, tmp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ports import free_block, free_endpoint

ROOT = Path(__file__).resolve().parent.parent


def run(argv: list[str | bytes]) -> subprocess.CompletedProcess[bytes]:
    """``python -m app.cli ARGV`` in a process of its own; a command that is
    still running at the deadline is killed and fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "app.cli", *argv], cwd=ROOT, check=False,
                              capture_output=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"not refused: {exc.stderr!r}") from None


def assert_refused(done: subprocess.CompletedProcess[bytes], name: str) -> None:
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert f"{name}: " in err and "must be a UTF-8 path" in err, err
    assert "\\xff" in err and "udcff" not in err, err  # the bytes as given, no Python repr


def serve(data: bytes, *more: str) -> list[str | bytes]:
    eps = [free_endpoint() for _ in range(3)]
    return ["serve", "--data", data, "--intake", eps[0], "--events", eps[1],
            "--domain-events", eps[2], "--metrics-port", "0", *more]


@pytest.mark.parametrize("shards", [1, 2])
def test_serve_refuses_a_data_folder_named_by_bytes_that_are_not_utf8(
        tmp_path: Path, shards: int) -> None:
    data = os.fsencode(tmp_path) + b"/x\xff"
    done = run(serve(data, "--shards", str(shards), "--shard-base-port", str(free_block(8))))
    assert_refused(done, "oms serve")
    assert not os.path.exists(data)  # refused before anything was made


def test_serve_refuses_it_from_oms_data_as_well(tmp_path: Path) -> None:
    data = os.fsencode(tmp_path) + b"/x\xff"
    eps = [free_endpoint() for _ in range(3)]
    env = {**os.environb, b"OMS_DATA": data}
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--intake", eps[0],
                           "--events", eps[1], "--domain-events", eps[2],
                           "--metrics-port", "0"], cwd=ROOT, capture_output=True, timeout=60,
                          check=False, env=env)
    assert_refused(done, "oms serve")


def test_sharded_serve_refuses_a_link_whose_target_is_not_utf8(tmp_path: Path) -> None:
    """``--data`` is UTF-8 but a symbolic link to a folder that is not: the
    shards' socket folder is taken by the real path, which ZeroMQ cannot use."""
    target = os.fsencode(tmp_path) + b"/real\xff"
    os.mkdir(target)
    os.symlink(target, tmp_path / "link")
    done = run(serve(os.fsencode(tmp_path / "link"), "--shards", "2",
                     "--shard-base-port", str(free_block(8))))
    assert_refused(done, "oms serve")
    assert "real path" in done.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("argv, name", [
    (["shards", "show", "--data"], "oms shards show"),
    (["shards", "move", "--processes", "2", "--data"], "oms shards move"),
    (["archive", "list", "--data"], "oms archive list"),
    (["demo", "--orders", "1", "--data"], "oms demo"),
])
def test_other_commands_taking_data_refuse_it(tmp_path: Path, argv: list[str],
                                               name: str) -> None:
    data = os.fsencode(tmp_path) + b"/x\xff"
    os.mkdir(data)  # present, so no "not a data folder" answers first
    full: list[str | bytes] = (["archive", "--data", data, "list"] if argv[0] == "archive"
                               else [*argv, data])
    done = run(full)
    assert_refused(done, name)
