"""``oms bench --shards N``: the same load against one process and against N
shards behind the front, in one run, so the two are measured on the same
machine under the same conditions (docs/performance.md, "Shards").

For each: orders finished per second (closed loop, after warm-up), and the
CPU seconds the service used per order, summed over every process of it
(one ``oms serve``; or the supervisor, the front and the N shards), with the
simulators' and the load generator's CPU reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Harness, ProcessDied
from bench.load import LoadGen
from bench.ports import free_block
from oms.sample import sample_orders


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += children.get(p, [])
    return total


def run_one(workdir: Path, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    serve = ["--workers", str(args.workers)]
    if shards > 1:
        serve += ["--shards", str(shards), "--shard-base-port", str(free_block(4 * shards))]
    harness = Harness(workdir, ["--delivery-s", "0"], serve)
    out: dict[str, Any] = {"shards": shards}
    try:
        harness.start_simulators()
        harness.start_service()
        harness.wait_ready()
        if shards > 1:  # every shard answers (the front answers once shard 0 does)
            _wait_front_ready(workdir / "data")
        assert harness.svc is not None and harness.sim is not None
        gen = LoadGen(harness.eps.intake, harness.eps.events, "bench")
        prefix = f"SH{shards}-{int(time.time()) % 100000}-"
        orders = sample_orders(10**9, seed=3, source="bench", prefix=prefix)
        parts0 = _parts_cpu(workdir / "data", shards)
        svc0, sim0, own0 = tree_cpu_s(harness.svc.pid), harness.sim.cpu_s(), time.process_time()
        wall0 = time.monotonic()
        try:
            run = gen.run(orders, args.orders, window=args.window,
                          warmup=int(args.orders * args.warmup), quiet=args.quiet,
                          label=f"{shards} shard{'s' if shards > 1 else ''}",
                          give_up_s=args.give_up, check=harness.check_alive)
        finally:
            gen.close()
        wall = time.monotonic() - wall0
        svc_cpu = tree_cpu_s(harness.svc.pid) - svc0
        parts = {name: round(cpu - parts0.get(name, 0.0), 2)
                 for name, cpu in _parts_cpu(workdir / "data", shards).items()}
        if parts:
            out["cpu_s_by_process"] = parts
        out.update({
            "orders": run.submitted, "finished": run.finished,
            "orders_per_s": round(run.rate("finished"), 1),
            "seconds": round(wall, 2),
            "service_cpu_s": round(svc_cpu, 2),
            "service_cpu_ms_per_order": round(1000 * svc_cpu / max(run.finished, 1), 3),
            "service_cores_used": round(svc_cpu / wall, 2) if wall else None,
            "simulators_cpu_s": round(harness.sim.cpu_s() - sim0, 2),
            "load_generator_cpu_s": round(time.process_time() - own0, 2),
            "unfinished": len(run.unfinished), "errors": dict(run.errors),
        })
    except ProcessDied as exc:
        out["error"] = str(exc)
    finally:
        harness.stop()
    return out


def _run_retrying(workdir: Path, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    """A run whose port was taken by another process between the check and the
    bind (a shared machine) is started again once, on other ports."""
    out = run_one(workdir, shards, args)
    if "Address already in use" in out.get("error", ""):
        shutil.rmtree(workdir, ignore_errors=True)
        out = run_one(workdir, shards, args)
    return out


def _parts_cpu(data: Path, shards: int) -> dict[str, float]:
    """CPU seconds so far of the front and of each shard (by the pids in their
    lock and ready files)."""
    if shards < 2:
        return {}
    files = {"front": data / "front" / "ready"}
    files.update({f"shard-{k}": data / f"shard-{k}" / "oms.lock" for k in range(shards)})
    out = {}
    for name, file in files.items():
        try:
            pid = int(file.read_text().split()[1])
            out[name] = tree_cpu_s(pid)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _wait_front_ready(data: Path, timeout: float = 60.0) -> None:
    """Each shard answers its own intake (its Unix socket, named in ``front.json``)."""
    from gateways.client import Client

    cfg = json.loads((data / "front.json").read_text())
    deadline = time.monotonic() + timeout
    for shard in cfg["shards"]:
        with Client(shard["intake"], timeout=1.0) as client:
            client.wait_ready(max(1.0, deadline - time.monotonic()))


def run_scaling(args: argparse.Namespace) -> int:
    if args.smoke:
        args.orders, args.window = min(args.orders, 300), 64
    workdir = Path(tempfile.mkdtemp(prefix="oms-bench-shards-"))
    load1 = os.getloadavg()[0]
    try:
        runs = [_run_retrying(workdir / "one", 1, args),
                _run_retrying(workdir / "many", args.shards, args)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    one, many = runs
    result = {"scenario": "shards", "shards": args.shards, "orders": args.orders,
              "window": args.window, "cpus": os.cpu_count(),
              "load_average_before": round(load1, 2),
              "load_average_after": round(os.getloadavg()[0], 2), "runs": runs}
    if one.get("orders_per_s") and many.get("orders_per_s"):
        result["speedup"] = round(many["orders_per_s"] / one["orders_per_s"], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"shards-{stamp}.json").write_text(json.dumps(result, indent=2))
    lines = [f"oms bench --shards {args.shards}: retail, closed loop (window {args.window}), "
             f"{args.orders} orders per run, {os.cpu_count()} CPUs, load average "
             f"{result['load_average_before']} before, {result['load_average_after']} after",
             "", f"{'processes':<24} {'orders/s':>9} {'CPU ms/order':>13} "
             f"{'cores used':>11} {'sim CPU s':>10} {'loadgen CPU s':>14}"]
    for r in runs:
        name = "1 (oms serve)" if r["shards"] == 1 else f"{r['shards']} shards + front"
        if "error" in r:
            lines.append(f"{name:<24} failed: {r['error'].splitlines()[0]}")
            continue
        lines.append(f"{name:<24} {r['orders_per_s']:>9} {r['service_cpu_ms_per_order']:>13} "
                     f"{r['service_cores_used']:>11} {r['simulators_cpu_s']:>10} "
                     f"{r['load_generator_cpu_s']:>14}")
    if many.get("cpu_s_by_process"):
        lines.append("CPU seconds by process with shards: " + ", ".join(
            f"{k} {v}" for k, v in many["cpu_s_by_process"].items()))
    if "speedup" in result:
        lines.append(f"\nspeed-up with {args.shards} shards: x{result['speedup']}")
    print("\n".join(lines))
    failed = any("error" in r or r.get("unfinished") for r in runs)
    return 1 if failed else 0
