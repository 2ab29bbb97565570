"""``oms bench``: measure throughput, latency and scale of the service.

Scenarios:
  retail   the retail happy path, closed loop (or open loop with --rate)
  mixed    back-orders, payment declines and telecom orders with partial outcomes
  intake   accept and durably acknowledge only (orders then wait; no domain work)
  waiting  N orders left waiting for delivery: memory and threads per waiting
           order, and the time from restart to accepting orders with N in flight
  soak     a fixed --rate for --duration seconds; with --faults, the service is
           killed with -9 every --kill-every seconds, domain systems go down
           and replies are dropped, and the run ends by checking every order
           terminal and no effect applied twice (bench/faults.py)
  engine   the pure engine in-process: microseconds per step, no I/O

By default it starts its own simulators and service (in a temporary folder);
``--intake``/``--events`` target a running service instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from itertools import count
from pathlib import Path
from typing import Any

from actors.runtime import tune_gc
from bench.harness import Harness, ProcessDied, loop_turns, turn_quantiles
from bench.load import LoadGen, Run, percentiles
from bench.report import failed_run, write_reports, write_summary
from oms.sample import sample_orders


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load test: throughput, latency, scale",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="retail",
                   choices=["retail", "mixed", "intake", "waiting", "soak", "engine"])
    p.add_argument("--orders", type=int, default=20_000)
    p.add_argument("--window", type=int, default=1024, help="closed loop: orders in flight")
    p.add_argument("--rate", type=float, help="open loop: orders per second")
    p.add_argument("--duration", type=float, default=60.0, help="soak: seconds")
    p.add_argument("--warmup", type=float, default=0.1, help="share of orders not measured")
    p.add_argument("--baseline", action="store_true", help="also run the no-actor baseline")
    p.add_argument("--workers", type=int, default=2, help="no effect (the service runs "
                   "every actor on one event loop)")
    p.add_argument("--curve", action="store_true", help="CURVE on the channel sockets")
    p.add_argument("--intake", help="target a running service's intake instead")
    p.add_argument("--events", help="... and its events endpoint")
    p.add_argument("--retention-s", type=float, help="the service's --retention-s (soak: "
                   "watch the store stop growing)")
    p.add_argument("--dedup-window-s", type=float, help="the service's --dedup-window-s")
    p.add_argument("--out", default="bench-reports", help="folder for the reports")
    p.add_argument("--give-up", type=float, default=60.0, metavar="S",
                   help="stop a run when no order has finished for S seconds (the report "
                        "lists the unfinished ones and the exit code is 1)")
    p.add_argument("--shards", type=int, metavar="N",
                   help="run retail against one process and against N shards behind the "
                        "front, in the same run: orders/s and CPU per order for each")
    p.add_argument("--faults", action="store_true",
                   help="soak only: kill -9 the service, take domain systems down, drop "
                        "replies; then check every order terminal, nothing applied twice")
    p.add_argument("--kill-every", type=float, default=60.0, metavar="S",
                   help="--faults: kill -9 and restart the service every S seconds "
                        "(0: never; default 60)")
    p.add_argument("--outage-every", type=float, default=45.0, metavar="S",
                   help="--faults: a domain-system fault every S seconds, in turn: "
                        "provisioning frozen, crm restarted, billing unavailable "
                        "(0: never; default 45)")
    p.add_argument("--outage-s", type=float, default=8.0, metavar="S",
                   help="--faults: how long each domain-system fault lasts (default 8)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the scenario N times, each with a fresh service (and baseline), "
                        "and report each figure's and target's min / median / max: a target "
                        "is met when its median is (one run's figure moves with the host)")
    p.add_argument("--smoke", action="store_true", help="tiny run that checks the bench works")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _orders(scenario: str, prefix: str) -> Any:
    if scenario == "mixed":
        return sample_orders(10**9, seed=3, source="bench", prefix=prefix, telecom_ratio=0.3,
                             scarce_ratio=0.05)
    if scenario == "faults":  # telecom for 50 customers: sequencing across restarts
        return sample_orders(10**9, seed=3, source="bench", prefix=prefix, telecom_ratio=0.3,
                             scarce_ratio=0.02)
    if scenario == "intake":
        return (dict(o, order_type="intake") for o in
                sample_orders(10**9, seed=3, source="bench", prefix=prefix))
    return sample_orders(10**9, seed=3, source="bench", prefix=prefix)


SIM_ARGS = {
    "retail": ["--delivery-s", "0"],
    "soak": ["--delivery-s", "0"],
    "intake": [],
    "mixed": ["--delivery-s", "0", "--restock-s", "0.5", "--scarce", "200",
              "--fail", "capture_payment=0.03:payment_declined"],
    "waiting": ["--delivery-s", "86400"],  # the longest oms simulate takes: a day
}


def run_bench(args: argparse.Namespace) -> int:
    tune_gc()  # the load generator is a busy process too (see actors.runtime)
    if args.repeat < 1:
        raise SystemExit("oms bench: --repeat needs N >= 1")
    if args.repeat > 1 and (args.faults or args.intake or args.shards
                            or args.scenario == "engine"):
        raise SystemExit("oms bench: --repeat needs its own service and a load scenario "
                         "(not --faults, --intake, --shards or --scenario engine, which "
                         "repeats itself)")
    if getattr(args, "shards", None):
        if args.shards < 2:
            print("oms bench: --shards needs N >= 2 (1 is always measured too)")
            return 2
        from bench.shards import run_scaling

        return run_scaling(args)
    if args.smoke:
        args.orders, args.window, args.duration = min(args.orders, 300), 64, 2.0
        args.give_up = min(args.give_up, 30.0)
    if args.faults and (args.scenario != "soak" or args.intake):
        raise SystemExit("oms bench: --faults needs --scenario soak and its own service "
                         "(not --intake)")
    if args.repeat == 1:
        return 1 if run_once(args)[1] else 0
    results, failures = [], 0
    for n in range(1, args.repeat + 1):
        print(f"-- run {n} of {args.repeat}", flush=True)
        result, failed = run_once(args, f"-run{n}")
        results.append(result)
        failures += failed
        print(flush=True)
    print(write_summary(results, Path(args.out)))
    return 1 if failures else 0


def run_once(args: argparse.Namespace, suffix: str = "") -> tuple[dict[str, Any], bool]:
    """One run of the scenario (its own service, simulators and baseline):
    its result, and whether it failed. Its reports are written and printed."""
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}
    workdir = Path(tempfile.mkdtemp(prefix="oms-bench-"))
    result: dict[str, Any] = {"scenario": args.scenario, "config": config,
                              "machine": machine(), "started": time.time()}
    harness: Harness | None = None
    try:
        if args.scenario == "engine":
            from bench.engine import run_engine

            result.update(run_engine(args.orders))
        elif args.intake:
            intake, events = args.intake, args.events
        elif args.faults:
            from bench.chaos import FaultHarness
            from bench.faults import run_fault_soak

            harness = FaultHarness(workdir, ["--workers", str(args.workers)])
            harness.start_simulators()
            harness.start_service()
            harness.wait_ready()
            result.update(run_fault_soak(harness, args, _orders("faults", "FLT-")))
        else:
            serve = ["--workers", str(args.workers)]
            if args.retention_s is not None:
                serve += ["--retention-s", str(args.retention_s)]
            if args.dedup_window_s is not None:
                serve += ["--dedup-window-s", str(args.dedup_window_s)]
            harness = Harness(workdir, SIM_ARGS[args.scenario], serve, curve=args.curve)
            harness.start_simulators()
            if args.baseline:
                result["baseline"] = run_baseline(harness, args)
            harness.start_service()
            harness.wait_ready()
            intake, events = harness.eps.intake, harness.eps.events
        if args.scenario == "waiting":
            result.update(run_waiting(harness, intake, events, args))
        elif args.scenario != "engine" and not args.faults:
            result.update(run_load(harness, intake, events, args))
    except ProcessDied as exc:
        result["error"] = str(exc)
    finally:
        if harness is not None:
            result.update(harness.stop())
        failed = failed_run(result)
        if failed:
            result["logs"] = keep_logs(workdir, Path(args.out), suffix)
        shutil.rmtree(workdir, ignore_errors=True)
    text = write_reports(result, Path(args.out), suffix)
    print(text)
    if result.get("store_size"):
        from bench.storesize import render as render_store

        print(render_store(result["store_size"]))
    return result, failed


def keep_logs(workdir: Path, out: Path, suffix: str = "") -> str:
    """A failed run's process logs, kept next to its reports."""
    dest = out / f"logs-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    dest.mkdir(parents=True, exist_ok=True)
    for log in workdir.glob("*.log"):
        shutil.copy(log, dest / log.name)
    return str(dest)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import lmdb
    import msgpack
    import zmq

    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"host": platform.node(), "cpus": os.cpu_count(), "mem_gb": round(mem / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": {"pykka": version("pykka"), "pyzmq": zmq.__version__,
                         "libzmq": zmq.zmq_version(), "lmdb": lmdb.version(),
                         "msgpack": ".".join(map(str, msgpack.version))}}


def run_baseline(harness: Harness, args: argparse.Namespace) -> dict[str, Any]:
    """The same workload against the no-actor loop, measured the same way."""
    harness.start_baseline()
    try:
        harness.wait_ready()
        out = run_load(harness, harness.eps.intake, harness.eps.events, args, label="baseline")
    finally:
        assert harness.svc is not None
        harness.svc.stop()
        harness.svc = None
    out.pop("timeline", None)
    return out


def run_load(harness: Harness | None, intake: str, events: str,
             args: argparse.Namespace, label: str = "orders") -> dict[str, Any]:
    curve = harness.client_curve if harness and label != "baseline" else None
    gen = LoadGen(intake, events, "bench", curve)
    prefix = f"{args.scenario[:3].upper()}{int(time.time()) % 100000}-"
    total = args.orders
    rate = args.rate
    if args.scenario == "soak":
        rate = rate or 500.0
        total = int(rate * args.duration)
    port = getattr(harness, "metrics_port", None) if harness and label != "baseline" else None
    turns0 = loop_turns(port)
    cpu0 = harness.svc.cpu_s() if harness and harness.svc else 0.0
    sim0 = harness.sim.cpu_s() if harness and harness.sim else 0.0
    own0 = time.process_time()
    sampler = _store_sampler(harness, args)
    try:
        run = gen.run(_orders(args.scenario, prefix), total, window=args.window, rate=rate,
                      warmup=int(total * args.warmup), complete=args.scenario != "intake",
                      quiet=args.quiet, label=label, give_up_s=args.give_up,
                      check=harness.check_alive if harness else None)
    finally:
        gen.close()
        store = sampler.finish() if sampler else None
    out = summarize(run, args.scenario)
    out["mode"] = f"open loop at {rate:g}/s" if rate else f"closed loop, window {args.window}"
    out["offered_per_s"] = rate or None
    if harness and harness.svc:
        out["service"] = {"cpu_s": harness.svc.cpu_s() - cpu0,
                          "peak_rss_mb": harness.svc.peak_rss_mb(),
                          "threads": harness.svc.threads(),
                          "loop_turn_s": turn_quantiles(turns0, loop_turns(port))}
    out["others_cpu_s"] = {"load_generator": time.process_time() - own0}
    if harness and harness.sim:
        out["others_cpu_s"]["simulators"] = harness.sim.cpu_s() - sim0
    if store:
        out["store_size"] = store
    return out


def _store_sampler(harness: Harness | None, args: argparse.Namespace) -> Any:
    """Soak, own service: the live store's size over the run (bench.storesize)."""
    if args.scenario != "soak" or harness is None:
        return None
    from bench.storesize import StoreSampler

    sampler = StoreSampler(harness.workdir / "data", every_s=min(10.0, args.duration / 6))
    sampler.start()
    return sampler


def summarize(run: Run, scenario: str) -> dict[str, Any]:
    what = "accepted" if scenario == "intake" else "finished"
    return {
        "orders": run.submitted, "accepted": run.accepted, "finished": run.finished,
        "orders_per_s": run.rate(what), "seconds": run.ended - run.started,
        "accept_latency_s": percentiles(run.accept_lat),
        "completion_latency_s": percentiles(run.complete_lat),
        "outcomes": dict(run.outcomes), "errors": dict(run.errors),
        "reconciled": run.reconciled, "unfinished": run.unfinished,
        "timeline": run.timeline,
    }


def run_waiting(harness: Harness | None, intake: str, events: str,
                args: argparse.Namespace) -> dict[str, Any]:
    assert harness is not None and harness.svc is not None, "waiting needs its own service"
    idle_rss, idle_threads = harness.svc.rss_mb(), harness.svc.threads()
    gen = LoadGen(intake, events, "bench")
    try:
        run = gen.run(_orders("retail", f"WAIT{next(count())}-"), args.orders,
                      window=args.window, until_step="await_delivery", quiet=args.quiet,
                      give_up_s=args.give_up, check=harness.check_alive)
    finally:
        gen.close()
    time.sleep(1.0)  # let the last snapshots flush and their actors passivate
    rss, threads = harness.svc.rss_mb(), harness.svc.threads()
    harness.svc.stop()
    harness.start_service()
    started = time.monotonic()
    harness.wait_ready()
    restart_s = time.monotonic() - started
    out = summarize(run, "waiting")
    out.update({
        "mode": f"closed loop, window {args.window}",
        "waiting_orders": run.finished,
        "idle_rss_mb": idle_rss, "rss_mb": rss, "idle_threads": idle_threads,
        "threads": threads,
        "kb_per_waiting_order": (rss - idle_rss) * 1024 / max(run.finished, 1),
        "restart_to_accepting_s": restart_s,
        "rss_after_restart_mb": harness.svc.rss_mb(),
    })
    return out
