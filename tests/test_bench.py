"""The bench runs (a smoke run, not a measurement: targets live in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "reports"
    result = subprocess.run([sys.executable, "-m", "oms.cli", "bench", "--smoke", "--quiet",
                             "--out", str(out), *args], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput:" in result.stdout
    (report,) = out.glob("*.json")
    assert (out / report.name.replace(".json", ".txt")).exists()
    return json.loads(report.read_text())


def test_retail_smoke_with_baseline(tmp_path: Path) -> None:
    report = bench(tmp_path, "--scenario", "retail", "--baseline")
    assert report["finished"] == report["orders"] == 300
    base = report["baseline"]  # the same workload through the same load generator
    assert base["finished"] == base["orders"] == 300 and base["orders_per_s"] > 0
    assert base["outcomes"] == {"completed": 300} and not base["errors"]
    assert {"load_generator", "simulators"} <= set(report["others_cpu_s"])
    assert report["machine"]["cpus"] >= 1 and "pykka" in report["machine"]["versions"]


@pytest.mark.parametrize("scenario", ["intake", "mixed", "engine"])
def test_other_scenarios_smoke(tmp_path: Path, scenario: str) -> None:
    report = bench(tmp_path, "--scenario", scenario)
    assert report["orders_per_s"] > 0


def test_open_loop_smoke(tmp_path: Path) -> None:
    report = bench(tmp_path, "--scenario", "retail", "--rate", "200")
    assert report["mode"].startswith("open loop")
    assert report["completion_latency_s"]["p99"] > 0
