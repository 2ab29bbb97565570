"""The bench runs (a smoke run, not a measurement: targets live in bench/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import endpoint

from bench.faults import sequencing_overlaps
from bench.harness import Harness, ProcessDied
from bench.load import LoadGen
from oms.sample import sample_orders

pytestmark = pytest.mark.slow


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "reports"
    result = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--smoke", "--quiet",
                             "--out", str(out), *args], capture_output=True, text=True,
                            timeout=180, check=False)
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


def test_missed_summaries_are_read_with_get_order(eps: Any, service: Any) -> None:
    """Events come from a PUB that publishes nothing: every result comes from
    get_order, as for a channel whose subscription was late or whose events dropped."""
    silent = zmq.Context.instance().socket(zmq.PUB)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(endpoint())
    gen = LoadGen(eps.intake, silent.getsockopt_string(zmq.LAST_ENDPOINT), "bench")
    try:
        run = gen.run(sample_orders(20, seed=5, source="bench", prefix="MISS-"), 20,
                      window=8, stall_s=0.2, give_up_s=60, quiet=True)
    finally:
        gen.close()
        silent.close()
    assert run.finished == 20 and run.reconciled == 20 and not run.unfinished
    assert run.outcomes == {"completed": 20}


def test_orders_that_never_finish_are_listed_not_waited_for(make_service: Any,
                                                            eps: Any) -> None:
    make_service()  # no domain systems: every order waits on its first command
    gen = LoadGen(eps.intake, eps.events, "bench")
    try:
        run = gen.run(sample_orders(5, seed=5, source="bench", prefix="STUCK-"), 5,
                      window=5, stall_s=0.2, give_up_s=1.5, quiet=True)
    finally:
        gen.close()
    assert run.finished == 0 and len(run.unfinished) == 5
    assert set(run.unfinished.values()) <= {"acknowledged", "inProgress"}


def test_a_process_that_dies_fails_the_run_with_its_log(tmp_path: Path) -> None:
    harness = Harness(tmp_path, ["--no-such-option"], [])
    try:
        harness.start_simulators()
        assert harness.sim is not None
        harness.sim.p.wait(timeout=60)  # it has died (not merely about to): no race with ready
        harness.start_service()
        with pytest.raises(ProcessDied, match="simulate exited with code 2"):
            harness.wait_ready(timeout=60)
    finally:
        harness.stop()


def test_fault_soak_smoke(tmp_path: Path) -> None:
    """One kill -9 of the service, a frozen provisioning system and a
    restarted crm under load: every acknowledged order ends terminal, nothing
    is applied twice, and the report says so."""
    out = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--scenario", "soak", "--faults", "--quiet",
         "--rate", "40", "--duration", "8", "--kill-every", "4", "--outage-every", "3",
         "--outage-s", "1.5", "--give-up", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False)
    (report,) = out.glob("*.json")
    faults = json.loads(report.read_text())["faults"]
    assert faults["kills"] == 1 and len(faults["restart_to_ready_s"]) == 3
    assert {"freeze provisioning", "restart crm"} <= set(faults["done"])
    assert faults["acknowledged"] == 320 and faults["not_acknowledged"] == 0
    assert faults["stuck"] == 0, (faults["stuck_by_state"], faults["stuck_examples"])
    assert faults["applied_twice"] == faults["retail_once_ops_over_once"] == 0
    assert sum(faults["terminal"].values()) == 320
    assert faults["sequencing_overlaps"] == 0 and faults["telecom_checked"] > 50
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict:      every acknowledged order terminal, nothing applied twice: met" \
        in result.stdout


def test_fault_soak_needs_its_own_soak_service() -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--scenario", "retail",
                             "--faults"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "--faults needs --scenario soak" in result.stderr


def test_repeat_runs_each_with_its_own_service_and_summarizes(tmp_path: Path) -> None:
    """``--repeat 2``: two runs, each its own report (not overwritten within
    a second), and a summary with each figure's min / median / max and each
    target's verdict by its median."""
    out = tmp_path / "reports"
    result = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--smoke", "--quiet",
                             "--scenario", "intake", "--repeat", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted(out.glob("*-run?.json"))
    assert [p.name[-10:] for p in runs] == ["-run1.json", "-run2.json"]
    assert all(json.loads(p.read_text())["accepted"] == 300 for p in runs)
    (summary,) = out.glob("*-summary.json")
    s = json.loads(summary.read_text())
    assert s["runs"] == 2 and s["failed_runs"] == 0
    assert len(s["figures"]["orders/s"]["runs"]) == 2
    (target,) = s["targets"]
    assert target["target"].startswith(">= 7,590 orders/s") and len(target["runs"]) == 2
    assert "-- run 2 of 2" in result.stdout and "targets (by the median):" in result.stdout


@pytest.mark.parametrize("args", [["--repeat", "0"], ["--repeat", "2", "--scenario", "engine"],
                                  ["--repeat", "2", "--scenario", "soak", "--faults"],
                                  ["--repeat", "2", "--intake", "tcp://127.0.0.1:9"]])
def test_repeat_is_refused_where_it_cannot_work(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "bench", *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "--repeat needs" in result.stderr


def test_sequencing_check_finds_overlapping_and_reordered_orders() -> None:
    def view(start: float | None, end: float, state: str = "completed") -> dict:
        hist = [{"state": "acknowledged", "ts": 0.0}]
        hist += [{"state": "inProgress", "ts": start}] if start is not None else []
        return {"order_type": "telecom", "history": hist + [{"state": state, "ts": end}]}

    customer = dict.fromkeys(["O1", "O2", "O3", "O4"], "c1") | {"O5": "c2"}
    fine = {"O1": view(1, 2), "O2": view(None, 2.5, "cancelled"), "O3": view(2, 3),
            "O4": view(3.5, 4), "O5": view(1, 5)}
    assert sequencing_overlaps(fine, customer) == []
    overlap = dict(fine, O3=view(1.5, 3))
    assert sequencing_overlaps(overlap, customer) == ["c1: O3 started 0.500 s before O1 ended"]
    reordered = dict(fine, O4=view(0.5, 0.9))  # ran before O3, accepted after it
    assert len(sequencing_overlaps(reordered, customer)) == 1
