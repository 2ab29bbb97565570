"""``oms demo``: the simulated domain systems and the service as real
processes, sample orders with a progress bar, and a summary of outcomes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from gateways.client import Client
from oms import codec
from oms.config import Config, check_utf8_path
from oms.sample import sample_orders
from oms.states import TERMINAL

MARKER = ".oms-demo-folder"
LOGS = {"service": "serve.log", "simulators": "simulate.log"}


def _bar(done: int, total: int, started: float, tty: bool = True, width: int = 32) -> str:
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-6)
    return ("\r" if tty else "") + (f"  [{'#' * filled}{'.' * (width - filled)}] "
                                     f"{done}/{total} finished  {rate:6.1f}/s")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=out, stderr=out)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _report(cfg: Config) -> dict[str, Any]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.systems["warehouse"])
    sock.send(codec.pack({"type": "report", "all": True}))
    reply = codec.decode_map(sock.recv()) if sock.poll(3000) else {}
    sock.close()
    return reply


def run_demo(count: int, folder: str, timeout: float) -> int:
    check_utf8_path(folder, "--data")  # the service it starts refuses one
    base = Path(folder)
    if base.exists():
        if not (base / MARKER).exists():
            print(f"{base} exists and was not made by oms demo; pass --data NEW_FOLDER")
            return 2
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / MARKER).write_text("made by oms demo; deleted by the next oms demo\n")
    cfg = Config(data=str(base / "data"))
    print(f"oms demo: {count} sample orders through simulated warehouse, billing, shipping,"
          f" crm and provisioning\n  data and logs in {base}/")
    sim = _spawn(["simulate", "--scarce", "5", "--restock-s", "1.5", "--delivery-s", "1.0",
                  "--latency-ms", "2", "--fail", "capture_payment=0.04:payment_declined",
                  "--fail", "reserve_stock=0.05:unavailable", "--seed", "7"],
                 base / "simulate.log")
    svc = _spawn(["serve", "--data", cfg.data], base / "serve.log")
    client = Client(cfg.intake)
    notes: dict[str, Any] = {}
    try:
        return _drive(client, cfg, count, timeout, base, {"service": svc, "simulators": sim},
                      notes)
    finally:
        client.close()
        code = _stop(svc)
        _stop(sim)
        print(f"\nservice stopped (exit {code}); simulators stopped.")
        if "sample" in notes:
            _next_steps(cfg, base, notes["sample"])


def _died(procs: dict[str, subprocess.Popen[bytes]], base: Path) -> bool:
    """Say so if the service or the simulators have exited (a port in use, say)."""
    for name, proc in procs.items():
        code = proc.poll()
        if code is not None:
            log = base / LOGS[name]
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            print(f"\nthe {name} exited (code {code}); the end of {log}:")
            print("  " + "\n  ".join(tail))
            return True
    return False


def _drive(client: Client, cfg: Config, count: int, timeout: float, base: Path,
           procs: dict[str, subprocess.Popen[bytes]], notes: dict[str, Any]) -> int:
    deadline = time.monotonic() + 30
    while True:
        if _died(procs, base):
            return 1
        try:
            client.wait_ready(1.0)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                print(f"the service did not answer within 30 s; see {base}/serve.log")
                return 1
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"demo-shop")
    sub.connect(cfg.events)
    orders = list(sample_orders(count, seed=int(time.time()), prefix=f"D{os.getpid()}-",
                                telecom_ratio=0.25, scarce_ratio=0.08))
    started = time.monotonic()
    ids = []
    for _req, reply in client.pipeline({"type": "submit_order", "order": o} for o in orders):
        if reply["type"] == "accepted":
            ids.append(reply["order_id"])
        else:
            print(f"  not accepted: {reply}")
    accept_s = time.monotonic() - started
    print(f"  {len(ids)} orders accepted in {accept_s:.2f} s; following their events ...")
    finished: dict[str, str] = {}
    tty = sys.stdout.isatty()  # a redrawn bar on a terminal; one line at the end otherwise
    deadline = time.monotonic() + timeout
    shown = -1
    while len(finished) < len(ids) and time.monotonic() < deadline:
        if _died(procs, base):
            break
        if sub.poll(250):
            _topic, raw = sub.recv_multipart()
            ev = codec.decode_map(raw)
            if ev.get("type") == "order_summary":
                finished[ev["order_id"]] = ev["summary"]["state"]
        else:  # events are lossy by contract: confirm with get_order
            for req, reply in client.pipeline({"type": "get_order", "order_id": i}
                                              for i in ids if i not in finished):
                state = (reply.get("order") or {}).get("state")
                if state in TERMINAL:
                    finished[req["order_id"]] = state
        if len(finished) != shown and (tty or len(finished) == len(ids)):
            shown = len(finished)
            sys.stdout.write(_bar(shown, len(ids), started, tty))
            sys.stdout.flush()
    sub.close()
    if any(proc.poll() is not None for proc in procs.values()):
        return 1
    elapsed = time.monotonic() - started
    print()
    notes["sample"] = _summary(client, cfg, ids, finished, elapsed, base)
    return 0 if len(finished) == len(ids) else 1


def _summary(client: Client, cfg: Config, ids: list[str], finished: dict[str, str],
             elapsed: float, base: Path) -> str | None:
    views = {req["order_id"]: reply.get("order", {}) for req, reply in
             client.pipeline({"type": "get_order", "order_id": i} for i in ids)}
    by_outcome = Counter((v.get("order_type"), v.get("state"), v.get("state_reason") or "")
                         for v in views.values())
    print(f"\n  {'order type':<10} {'outcome':<12} {'reason':<18} {'orders':>6}")
    print(f"  {'-' * 10} {'-' * 12} {'-' * 18} {'-' * 6}")
    for (otype, state, reason), n in sorted(by_outcome.items(), key=lambda kv: -kv[1]):
        print(f"  {otype!s:<10} {state!s:<12} {reason:<18} {n:>6}")
    held = sum(1 for v in views.values() if any(h.get("reason") == "awaiting_stock"
                                                  for h in v.get("history", [])))
    print(f"\n  {len(finished)}/{len(ids)} orders finished in {elapsed:.1f} s; "
          f"{held} waited for back-ordered stock on the way.")
    report = _report(cfg)
    counts = report.get("counts", {})
    if counts:
        print("  domain operations applied: " + ", ".join(
            f"{k}={v}" for k, v in sorted(counts.items())))
        print(f"  applied twice for the same order and arguments: "
              f"{len(report.get('applied_twice', []))}")
    sample = next((i for i in ids if views.get(i, {}).get("state") == "completed"), None)
    if sample:
        from app.orders_cli import render_order

        print("\none of them, as `oms status` shows it:\n")
        print("  " + render_order(views[sample]).replace("\n", "\n  "))
    return sample


def _next_steps(cfg: Config, base: Path, sample: str | None) -> None:
    """What to do after the demo. Its service has stopped: start one on the
    demo's data to look at its orders."""
    print("\nwhere to look next:")
    print(f"  {base}/serve.log    the service's JSON log (one line per state change)")
    print("  the service has stopped; to browse the demo's orders, start it again on its data:")
    print(f"    oms serve --data {cfg.data} &")
    print("    oms health                      live and ready?")
    print("    oms orders                      newest first")
    print(f"    oms order show {sample or 'ORDER_ID'}")
    print(f"    curl http://127.0.0.1:{cfg.metrics_port}/metrics   Prometheus metrics")
    print("  new orders need the domain systems too: oms simulate & then oms submit --sample 5")
    from console.cli import DEFAULT_PORT

    print(f"    oms console                     the operators' web console, "
          f"http://127.0.0.1:{DEFAULT_PORT}/ (docs/console.md)")
    print("  docs/protocol.md (the wire contract), docs/operations.md, docs/architecture.md")
