"""Metrics, health, alerts and dashboard, checked against real tools: a live
scrape through ``promtool``, and a real Prometheus server scraping the
service (Debian's ``prometheus`` package; installed here if missing and we
may, else these tests are skipped with the reason)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Endpoints, free_port
from helpers import debian_tools, poll_until

from app.cli import main
from gateways.client import Client, wait_terminal
from oms.sample import sample_orders

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prom_tools() -> dict[str, str]:
    tools = debian_tools(("promtool", "prometheus"), ("prometheus",))
    if not all(tools.values()):
        pytest.skip("Debian's prometheus package is not installed and cannot be here")
    return tools  # type: ignore[return-value]


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read().decode()


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.fixture
def running(procs: Any, tmp_path: Path) -> tuple[Endpoints, int]:
    eps = Endpoints()
    port = free_port()
    sim = procs(eps.simulate_args() + ["--delivery-s", "0.05"], "simulate")
    serve = procs(eps.serve_args(tmp_path / "data") + ["--metrics-port", str(port)], "serve")
    with Client(eps.intake) as client:
        try:
            client.wait_ready(30)
        except TimeoutError as exc:  # say why: the logs of both processes
            raise AssertionError(
                f"{exc}; serve exited {serve.exited()}: {serve.tail()}\n"
                f"simulate exited {sim.exited()}: {sim.tail()}") from exc
    return eps, port


def run_orders(eps: Endpoints, count: int, prefix: str) -> list[str]:
    with Client(eps.intake, timeout=30) as client:
        ids = [r["order_id"] for _q, r in client.pipeline(
            {"type": "submit_order", "order": o}
            for o in sample_orders(count, seed=len(prefix), source="web", prefix=prefix))]
        wait_terminal(client, ids, timeout=120)
    return ids


def test_live_scrape_passes_promtool_and_series_do_not_grow(
        running: tuple[Endpoints, int], prom_tools: dict[str, str]) -> None:
    eps, port = running
    run_orders(eps, 10, "S10-")
    first = scrape(port)
    check = subprocess.run([prom_tools["promtool"], "check", "metrics"], input=first,
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    run_orders(eps, 300, "S300-")
    after = scrape(port)
    oms_first = {s for s in series(first) if s.startswith("oms_")}
    oms_after = {s for s in series(after) if s.startswith("oms_")}
    assert oms_after == oms_first, oms_after ^ oms_first
    assert not re.search(r'order_id="', after)
    print(f"\n{len(oms_first)} oms_ series after 10 orders, {len(oms_after)} after 310")


def test_health_endpoints_and_command(running: tuple[Endpoints, int]) -> None:
    _eps, port = running
    assert scrape(port, "/healthz") == "ok\n"
    assert scrape(port, "/readyz") == "ready\n"
    assert main(["health", "--url", f"http://127.0.0.1:{port}"]) == 0
    assert main(["health", "--url", f"http://127.0.0.1:{free_port()}"]) == 1


def test_dashboard_uses_only_metrics_found_in_a_real_scrape(
        running: tuple[Endpoints, int]) -> None:
    eps, port = running
    run_orders(eps, 20, "DASH-")
    text = scrape(port)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    dashboard = json.loads((ROOT / "deploy/grafana/oms.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:oms|process)_[a-z_]+)", e)}
    used = {m for m in used if not m.startswith("oms_front_")}  # test_shards scrapes those
    assert used and used <= names, used - names


def test_alert_rules_pass_their_unit_tests(prom_tools: dict[str, str]) -> None:
    folder = ROOT / "deploy/prometheus"
    result = subprocess.run([prom_tools["promtool"], "test", "rules", "alerts_test.yml"],
                            cwd=folder, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_prometheus_agrees_with_what_was_sent(
        running: tuple[Endpoints, int], prom_tools: dict[str, str], tmp_path: Path) -> None:
    eps, port = running
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ROOT / 'deploy/prometheus/alerts.yml'}']\n"
        "scrape_configs:\n  - job_name: oms\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n")
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen([prom_tools["prometheus"], f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=log)
    try:
        def query(expr: str) -> float | None:
            url = (f"http://127.0.0.1:{prom_port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": expr}))
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    data = json.loads(resp.read())["data"]["result"]
            except OSError:
                return None
            return float(data[0]["value"][1]) if data else None

        poll_until(lambda: query('up{job="oms"}') == 1.0, timeout=60, every=0.5)
        ids = run_orders(eps, 150, "PROM-")
        poll_until(lambda: query(
            'sum(oms_orders_received_total{outcome="accepted"})') == len(ids),
            timeout=60, every=0.5)
        poll_until(lambda: query(
            'sum(oms_order_transitions_total{state="completed"})') == len(ids),
            timeout=60, every=0.5)
        assert query('sum(oms_order_completion_seconds_count{order_type="retail"})') == len(ids)
        assert query("oms_ready") == 1.0
    finally:
        prom.terminate()
        prom.wait(20)
        log.close()
