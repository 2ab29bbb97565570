"""The bench's tools on a shared machine: the port range from OMS_TEST_PORTS,
a report that says met / NOT met per target, progress without carriage
returns when the output is not a terminal. Real subprocesses, real sockets."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import pytest

from bench.report import render, render_summary, summarize_runs, target_verdicts

PICK = ("from bench.ports import free_port\n"
        "ports = []\n"
        "try:\n"
        "    for _ in range(17):\n"
        "        ports.append(free_port())\n"
        "except RuntimeError as exc:\n"
        "    print(' '.join(map(str, ports)))\n"
        "    print(exc)\n")


def py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, **env), check=False)


def test_oms_test_ports_sets_the_range() -> None:
    low = random.Random().randrange(24000, 29000, 16)
    high = low + 15
    out = py(PICK, OMS_TEST_PORTS=f"{low}-{high}")
    assert out.returncode == 0, out.stderr
    ports_line, exhausted = out.stdout.splitlines()
    ports = [int(p) for p in ports_line.split()]
    # every port handed out is inside the range, each once (a port another
    # process holds on this shared machine is skipped, never handed out)
    assert ports and len(set(ports)) == len(ports) and all(low <= p <= high for p in ports)
    assert f"no free loopback port in {low}-{high}" in exhausted
    assert "OMS_TEST_PORTS" in exhausted


def test_a_bad_range_is_an_error_naming_the_variable() -> None:
    for bad in ("20000", "x-y", "30000-20000", "80-90", "20000-20003"):
        out = py("import bench.ports", OMS_TEST_PORTS=bad)
        assert out.returncode != 0 and "OMS_TEST_PORTS" in out.stderr, (bad, out.stderr)


def test_default_range_is_below_the_ephemeral_ports() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMS_TEST_PORTS"}
    out = subprocess.run([sys.executable, "-c", "import bench.ports as p; print(p.LOW, p.HIGH)"],
                         capture_output=True, text=True, timeout=30, env=env, check=False)
    low, high = map(int, out.stdout.split())
    assert low == 15000 and high >= 15999


def result(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scenario": "retail", "mode": "closed loop", "orders": 100, "accepted": 100,
        "finished": 100, "orders_per_s": 6000.0, "seconds": 1.0,
        "machine": {"cpus": 2, "mem_gb": 4, "python": "3.11", "versions": {}},
        "baseline": {"orders_per_s": 30000.0}}
    base.update(over)
    return base


def test_report_says_met_or_not_met_for_each_target() -> None:
    closed = result(service={"cpu_s": 0.05, "peak_rss_mb": 80.0, "threads": 11},
                    baseline={"orders_per_s": 30000.0, "finished": 100,
                              "service": {"cpu_s": 0.01}})
    verdicts = {what: (verdict, value) for what, verdict, value in target_verdicts(closed)}
    assert verdicts == {
        "closed loop: service CPU per order <= 2.5x the baseline's": ("NOT met", 5.0),
        "closed loop: throughput >= 0.5x the baseline's": ("NOT met", 0.2)}
    text = render(closed)
    assert "NOT met       closed loop: throughput >= 0.5x the baseline's (measured 0.2)" in text
    no_base = target_verdicts(result(baseline=None))
    assert [v for _, v, _ in no_base] == ["not measured", "not measured"]
    fast = result(mode="open loop, 500/s", offered_per_s=500.0,
                  completion_latency_s={"p50": 0.012, "p99": 0.2})
    assert [(w[-6:], v) for w, v, _ in target_verdicts(fast)] == [
        (" 30 ms", "met"), ("150 ms", "NOT met")]
    assert "NOT met       open loop at >= 500/s: completion p99 <= 150 ms " \
        "(measured 200.0 ms)" in render(fast)  # in the target's unit, not seconds
    opened = summarize_runs([fast, fast, result(scenario="retail", mode="open loop, 500/s",
                                                offered_per_s=500.0,
                                                completion_latency_s={"p50": 0.0165,
                                                                      "p99": 0.02})])
    assert "completion p50 <= 30 ms (median 12.0 ms; met in 3 of 3 runs)" in \
        render_summary(opened)
    intake = summarize_runs([result(scenario="intake", orders_per_s=15_799.0)])
    assert "(median 15,799; met in 1 of 1 runs)" in render_summary(intake)
    slow = result(mode="open loop, 300/s", offered_per_s=300.0)
    assert target_verdicts(slow) == []  # the open-loop targets are at 500/s
    waiting = target_verdicts(result(scenario="waiting", waiting_orders=100_000, rss_mb=420.0,
                                     threads=70, restart_to_accepting_s=1.2))
    assert [v for _, v, _ in waiting] == ["met", "met", "NOT met", "met"]


def test_repeated_runs_are_judged_by_their_median() -> None:
    """Three closed-loop runs: CPU ratios 2.0, 2.4 and 3.0 (median 2.4: met,
    in 2 of 3 runs); a fourth run that failed before it measured anything is
    left out of every figure, and counted as failed."""
    def closed(cpu_s: float, base_cpu_s: float) -> dict[str, Any]:
        return result(service={"cpu_s": cpu_s}, orders_per_s=6000.0,
                      baseline={"orders_per_s": 10000.0, "finished": 100,
                                "service": {"cpu_s": base_cpu_s}})
    runs = [closed(0.02, 0.01), closed(0.024, 0.01), closed(0.03, 0.01),
            result(error="the service died", finished=0, orders_per_s=0.0, baseline=None)]
    s = summarize_runs(runs)
    assert s["runs"] == 4 and s["failed_runs"] == 1
    ratio = s["figures"]["service CPU / baseline's"]
    assert [ratio["min"], ratio["median"], ratio["max"]] == pytest.approx([2.0, 2.4, 3.0])
    assert s["figures"]["service CPU per order (us)"]["runs"] == pytest.approx([200, 240, 300])
    cpu, thr = s["targets"]
    assert (cpu["verdict"], cpu["runs_met"], thr["verdict"], thr["runs_met"]) == (
        "met", 2, "met", 3)
    assert (cpu["median"], thr["median"]) == pytest.approx((2.4, 0.6))
    text = render_summary(s)
    assert "service CPU / baseline's           2.00 / 2.40 / 3.00  (3 runs)" in text
    assert "FAILED:       1 of 4 runs" in text
    assert "met           closed loop: service CPU per order <= 2.5x the baseline's " \
        "(median 2.4; met in 2 of 3 runs)" in text
    worse = summarize_runs([closed(0.03, 0.01), closed(0.026, 0.01), closed(0.02, 0.01)])
    assert worse["targets"][0]["verdict"] == "NOT met"  # median 2.6, though one run met it


def test_a_failed_run_is_left_out_of_every_figure_and_verdict() -> None:
    """A run whose own or baseline's orders did not all finish failed (its
    exit code is 1): its figures, which would move the medians (a baseline's
    CPU over 300 of 10,000 orders, a service's over the orders it finished),
    decide nothing."""
    def run(cpu: float, base_cpu: float, base_finished: int = 100, **extra: Any) -> Any:
        return result(service={"cpu_s": cpu}, orders_per_s=6000.0, **extra,
                      baseline={"orders_per_s": 10000.0, "finished": base_finished,
                                "service": {"cpu_s": base_cpu}, **extra.pop("base", {})})
    good = run(0.05, 0.0175)  # CPU ratio 2.86: NOT met
    broken_base = run(0.05, 0.0002, base_finished=3)
    broken_base["baseline"]["unfinished"] = {"B1": "inProgress"}
    unfinished = run(0.01, 0.0175, unfinished={"O1": "inProgress"})
    s = summarize_runs([good, broken_base, unfinished, unfinished])
    assert s["failed_runs"] == 3
    cpu = s["targets"][0]
    assert (cpu["verdict"], len(cpu["runs"])) == ("NOT met", 1)
    assert all(len(f["runs"]) == 1 for f in s["figures"].values())
    assert "FAILED:       3 of 4 runs, left out of every figure and verdict" in render_summary(s)


def test_progress_writes_no_carriage_returns_when_not_a_terminal() -> None:
    code = ("from bench.load import Progress\n"
            "p = Progress(1000, 'orders', False)\n"
            "for i in range(0, 1001, 10):\n    p.show(i)\n"
            "p.show(1000, force=True)\np.close()\n")
    out = py(code)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    lines = out.stderr.splitlines()
    assert 1 <= len(lines) <= 3 and "1000/1000" in lines[-1], lines
