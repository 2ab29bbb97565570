"""Session 12 review of the suite on two pytest-xdist workers: the Debian
tools some tests install (chromium for ``test_console``, prometheus for
``test_observability`` and ``test_retention``) are one resource of the
host. Two workers that ran ``apt-get`` at once had the second fail on
dpkg's lock and skip its tests quietly; ``test_retention`` relied on
``test_observability`` having installed promtool before it, which under
``--dist loadfile`` another worker may not have done yet.
``helpers.debian_tools`` installs on one lock file, each caller looking
again once it holds it. A stand-in ``apt-get`` on ``PATH`` (not ours: the
host's package manager) records what it is asked and whether two runs
overlap."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from helpers import debian_tools

FAKE_APT = """#!/bin/sh
dir=$(dirname "$0")
if [ -e "$dir/running" ]; then echo overlap >> "$dir/log"; fi
touch "$dir/running"
echo "$*" >> "$dir/log"
sleep 0.5
case "$*" in *install*)
  printf '#!/bin/sh\\n' > "$dir/oms-fake-tool"; chmod +x "$dir/oms-fake-tool";;
esac
rm -f "$dir/running"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="debian_tools installs only as root")
def test_two_workers_installing_at_once_install_once_in_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = tmp_path / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found: list[dict[str, str | None]] = []
    workers = [threading.Thread(target=lambda: found.append(
        debian_tools(("oms-fake-tool",), ("oms-fake-package",)))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert found == [{"oms-fake-tool": str(tmp_path / "oms-fake-tool")}] * 2
    log = (tmp_path / "log").read_text().splitlines()
    assert log == ["-o DPkg::Lock::Timeout=300 update -q",
                   "-o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "
                   "oms-fake-package"]  # once, and never two at a time ("overlap")
