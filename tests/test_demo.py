"""``oms demo``, the README's first command: real simulator and service
processes on the embedded default endpoints."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oms.config import DEFAULT_SYSTEMS

pytestmark = pytest.mark.slow


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "demo", "--data",
                           str(tmp_path / "demo"), *args], capture_output=True, text=True,
                          timeout=180, check=False)


def test_demo_drives_sample_orders_to_the_end(tmp_path: Path) -> None:
    result = demo(tmp_path, "--orders", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "30/30 orders finished" in result.stdout
    assert "applied twice for the same order and arguments: 0" in result.stdout
    assert "service stopped (exit 0)" in result.stdout
    after_stop = result.stdout.split("service stopped (exit 0)")[1]
    assert "where to look next:" in after_stop and "the service has stopped" in after_stop
    assert "oms serve --data" in after_stop and "oms order show O" in after_stop
    assert "\r" not in result.stdout  # not a terminal: no redrawn progress bar


def test_demo_says_at_once_when_a_port_is_taken(tmp_path: Path) -> None:
    port = int(DEFAULT_SYSTEMS["shipping"].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = demo(tmp_path, "--orders", "30", "--timeout", "150")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the simulators exited (code 2)" in result.stdout
    assert f"cannot open an endpoint: Address already in use (addr='tcp://127.0.0.1:{port}')" \
        in result.stdout
