"""The ``oms`` command: serve, simulate, submit, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from oms import logs
from oms.config import DEFAULT_SYSTEMS, Config, ConfigError, parse_systems
from oms.process import ProcessError
from oms.runtime import tune_gc

logger = logging.getLogger("oms")


def _endpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intake", help="intake endpoint (env OMS_INTAKE)")
    p.add_argument("--events", help="channel events PUB endpoint (env OMS_EVENTS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the order management service")
    serve.add_argument("--config", help="TOML file with any of the settings below")
    serve.add_argument("--data", help="data folder (env OMS_DATA; default ./oms-data)")
    _endpoint_flags(serve)
    serve.add_argument("--domain-events", help="domain events ROUTER endpoint")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off")
    serve.add_argument("--system", action="append", metavar="NAME=EP",
                       help="domain system endpoint (repeatable)")
    serve.add_argument("--processes", help="folder of process definitions (*.toml)")
    serve.add_argument("--workers", type=int, help="order actor worker threads")
    serve.add_argument("--max-in-flight", type=int, help="admission limit")
    serve.add_argument("--retention-s", type=float, help="finished orders older than this "
                       "leave the live store for the archive (0 = keep; default 30 days)")
    serve.add_argument("--dedup-window-s", type=float, help="an archived order's external id "
                       "is still a duplicate this long after it finished (default 90 days)")
    serve.add_argument("--curve-server-key", metavar="FILE",
                       help="the service's secret key file: turns CURVE on for channels")
    serve.add_argument("--curve-clients", metavar="DIR",
                       help="folder of allowed public keys; file name = identity")
    serve.add_argument("--domain-server-key", metavar="FILE",
                       help="domain systems' public key: CURVE toward them as well")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument("--log-format", choices=["json", "text"])

    sim = sub.add_parser("simulate", help="run the reference domain systems")
    sim.add_argument("--system", action="append", metavar="NAME=EP",
                     help="system endpoint to bind (repeatable; default: all five)")
    sim.add_argument("--only", action="append", help="simulate only these systems")
    sim.add_argument("--service-events", default="tcp://127.0.0.1:5557",
                     help="the service's domain events endpoint")
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.add_argument("--stock", type=int, default=1_000_000, help="initial units per product")
    sim.add_argument("--stock-of", action="append", default=[], metavar="PRODUCT=N",
                     help="initial units of one product (repeatable)")
    sim.add_argument("--scarce", type=int, default=None,
                     help="initial units of the sample orders' scarce products (SKU-9xx)")
    sim.add_argument("--restock-s", type=float, default=1.0)
    sim.add_argument("--delivery-s", type=float, default=0.5)
    sim.add_argument("--fail", action="append", default=[], metavar="OP=RATE[:CODE]",
                     help="fail OP with probability RATE (code default: unavailable)")
    sim.add_argument("--drop", action="append", default=[], metavar="OP=RATE",
                     help="apply OP but drop the reply with probability RATE")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--curve-key", metavar="FILE", help="the simulators' secret key file")
    sim.add_argument("--curve-clients", metavar="DIR",
                     help="allowed public keys: CURVE on the simulators' sockets")
    sim.add_argument("--service-key", metavar="FILE",
                     help="the service's public key, to push events over CURVE")

    keys = sub.add_parser("keys", help="CURVE key pairs")
    ksub = keys.add_subparsers(dest="action", required=True)
    gen = ksub.add_parser("generate", help="write NAME.key and NAME.key_secret (0600)")
    gen.add_argument("--out", required=True, help="folder to write into")
    gen.add_argument("names", nargs="+", help="one key pair per name (the identity)")
    sim.add_argument("--log-level", default="info")

    submit = sub.add_parser("submit", help="submit orders from a file or samples")
    _endpoint_flags(submit)
    submit.add_argument("file", nargs="?", help="JSON file: one order or a list of orders")
    submit.add_argument("--sample", type=int, help="submit N sample orders")
    submit.add_argument("--telecom", type=float, default=0.0, help="share of telecom samples")
    submit.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="show one order")
    _endpoint_flags(status)
    status.add_argument("order_id")
    status.add_argument("--json", action="store_true")

    from oms.opscli import add_parsers as add_ops

    add_ops(sub)

    health = sub.add_parser("health", help="is the service alive and ready? (exit 0 if so)")
    health.add_argument("--url", default=None,
                        help="metrics base URL (default http://127.0.0.1:<metrics_port>)")
    health.add_argument("--json", action="store_true")

    procs = sub.add_parser("processes", help="check or show process definitions")
    psub = procs.add_subparsers(dest="action", required=True)
    check = psub.add_parser("check", help="validate definitions without starting")
    check.add_argument("dir", nargs="?", help="folder of *.toml (default: built-ins only)")
    show = psub.add_parser("show", help="print an order type's step graph")
    show.add_argument("order_type")
    show.add_argument("--processes", help="folder of *.toml to load as well")

    from oms.archive import add_parser as add_archive

    add_archive(sub)

    from bench.cli import add_parser as add_bench

    add_bench(sub)

    demo = sub.add_parser("demo", help="simulators + service + sample orders, end to end")
    demo.add_argument("--orders", type=int, default=200)
    demo.add_argument("--data", default=".oms-demo")
    demo.add_argument("--timeout", type=float, default=120.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except (ConfigError, ProcessError) as exc:
        print(f"oms {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.security import SecurityError
    from actors.service import Service
    from oms.store import StoreLocked

    systems = parse_systems(args.system, "--system") if args.system else None
    cfg = Config.load(args.config, data=args.data, intake=args.intake, events=args.events,
                      domain_events=args.domain_events, metrics_port=args.metrics_port,
                      systems=systems, processes=args.processes, workers=args.workers,
                      max_in_flight=args.max_in_flight, log_level=args.log_level,
                      retention_s=args.retention_s, dedup_window_s=args.dedup_window_s,
                      log_format=args.log_format, curve_server_key=args.curve_server_key,
                      curve_clients=args.curve_clients,
                      domain_server_key=args.domain_server_key)
    logs.setup(cfg.log_level, cfg.log_format)
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    service = Service(cfg)
    try:
        service.start()
    except (StoreLocked, SecurityError) as exc:
        print(f"oms serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"oms serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith("zmq"):
            print(f"oms serve: cannot open an endpoint: {exc}", file=sys.stderr)
            return 2
        raise
    tune_gc()
    try:
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                try:
                    service.reload_keys()
                except SecurityError as exc:
                    logger.error("keys not reloaded: %s", exc)
        logger.info("signal received: draining and stopping")
    finally:
        service.stop()
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import zmq

    from gateways.simulator import SimConfig, run_simulator

    logs.setup(args.log_level, "json")
    systems = dict(DEFAULT_SYSTEMS)
    if args.system:
        systems.update(parse_systems(args.system, "--system"))
    if args.only:
        systems = {k: v for k, v in systems.items() if k in args.only}
    fail = {}
    for spec in args.fail:
        op, _, rest = spec.partition("=")
        rate, _, code = rest.partition(":")
        fail[op] = (float(rate), code or "unavailable")
    drop = {op: float(rate) for op, _, rate in (s.partition("=") for s in args.drop)}
    stock_of = {p: int(n) for p, _, n in (s.partition("=") for s in args.stock_of)}
    if args.scarce is not None:
        from oms.sample import SCARCE

        stock_of.update(dict.fromkeys(SCARCE, args.scarce))
    curve: dict[str, Any] = {}
    if args.curve_key:
        from actors.security import load_clients, read_keypair, read_public

        public, secret = read_keypair(args.curve_key)
        curve = {"server": bool(args.curve_clients), "public": public, "secret": secret,
                 "clients": args.curve_clients and list(load_clients(args.curve_clients)),
                 "clients_dir": args.curve_clients,
                 "service_key": args.service_key and read_public(args.service_key)}
    elif args.service_key or args.curve_clients:
        raise SystemExit("oms simulate: --service-key and --curve-clients need --curve-key")
    cfg = SimConfig(systems=systems, service_events=args.service_events, curve=curve,
                    latency_ms=args.latency_ms, stock=args.stock, stock_of=stock_of,
                    restock_s=args.restock_s,
                    delivery_s=args.delivery_s, fail=fail, drop=drop, seed=args.seed)
    tune_gc()
    try:
        run_simulator(cfg)
    except zmq.ZMQError as exc:
        print(f"oms simulate: cannot open an endpoint: {exc}", file=sys.stderr)
        return 2
    return 0


def _client(args: argparse.Namespace) -> Any:
    from oms.client import Client

    cfg = Config.load(None, intake=args.intake)
    return Client(cfg.intake)


def cmd_submit(args: argparse.Namespace) -> int:
    from oms.sample import sample_orders

    if args.sample:
        orders = list(sample_orders(args.sample, telecom_ratio=args.telecom,
                                    prefix=f"CLI{threading.get_ident() % 10000:04d}-"))
    elif args.file:
        loaded = json.loads(Path(args.file).read_text(encoding="utf-8"))
        orders = loaded if isinstance(loaded, list) else [loaded]
    else:
        print("oms submit: give a FILE or --sample N", file=sys.stderr)
        return 2
    failures = 0
    with _client(args) as client:
        reqs = ({"type": "submit_order", "order": o} for o in orders)
        for req, reply in client.pipeline(reqs):
            ext = req["order"].get("external_id")
            if args.json:
                print(json.dumps({"external_id": ext, "reply": reply}))
            elif reply["type"] == "accepted":
                dup = " (duplicate)" if reply.get("duplicate") else ""
                print(f"{ext}: accepted as {reply['order_id']}{dup}")
            else:
                failures += 1
                print(f"{ext}: {reply['type']} {reply.get('errors') or reply.get('message')}")
    return 1 if failures else 0


def cmd_keys(args: argparse.Namespace) -> int:
    from actors.security import generate

    for path in generate(args.out, args.names):
        print(path)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.get(args.order_id)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0 if reply["type"] == "order" else 1
    if reply["type"] != "order":
        print(f"{reply.get('code')}: {reply.get('message')}", file=sys.stderr)
        return 1
    print(render_order(reply["order"]))
    return 0


def _history_line(h: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["ts"]))
    if h.get("action"):
        why = f": {h['reason']}" if h.get("reason") else ""
        return f"  {when}  operator {h['operator']} asked to {h['action']}{why}"
    return f"  {when}  {h['state']}" + (f" ({h['reason']})" if h.get("reason") else "")


def render_order(o: dict[str, Any]) -> str:
    reason = f" ({o['state_reason']})" if o.get("state_reason") else ""
    lines = [f"order {o['order_id']}  {o['source_system']}/{o['external_id']}  "
             f"{o['order_type']}  {o['state']}{reason}", "", "steps:"]
    lines += [f"  {s['name']:<28} {s['system']:<13} {s['op']:<22} {s['status']:<12} "
              f"x{s['attempts']}  {json.dumps(s.get('result') or s.get('error') or {})}"
              for s in o.get("steps", [])]
    lines += ["", "items:"] + [f"  {i['id']:<12} {i['action']:<9} {i['product_id']:<14} "
                               f"qty {i['quantity']:<4} {i['state']}" for i in o.get("items", [])]
    lines += ["", "history:"] + [_history_line(h) for h in o.get("history", [])]
    if o.get("summary"):
        lines += ["", f"summary: {json.dumps(o['summary'].get('results', {}))}"]
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    base = args.url or f"http://127.0.0.1:{Config.load(None).metrics_port}"
    result = {}
    for check in ("healthz", "readyz"):
        try:
            with urllib.request.urlopen(f"{base}/{check}", timeout=3) as resp:
                result[check] = resp.status == 200
        except urllib.error.HTTPError as exc:
            result[check] = exc.code == 200
        except OSError:
            result[check] = False
    if args.json:
        print(json.dumps({"url": base, "live": result["healthz"], "ready": result["readyz"]}))
    else:
        live = "live" if result["healthz"] else "not answering"
        ready = "ready" if result["readyz"] else "not ready"
        print(f"{base}: {live}, {ready}")
    return 0 if result["healthz"] and result["readyz"] else 1


def cmd_processes(args: argparse.Namespace) -> int:
    from oms.process import load_processes

    if args.action == "check":
        procs = load_processes(args.dir)
        for name, proc in sorted(procs.items()):
            print(f"ok  {name:<12} {len(proc.steps)} steps  ({proc.source})")
        return 0
    procs = load_processes(args.processes)
    if args.order_type not in procs:
        print(f"unknown order type {args.order_type!r}; known: {', '.join(sorted(procs))}",
              file=sys.stderr)
        return 2
    print(render_process(procs[args.order_type]))
    return 0


def render_process(proc: Any) -> str:
    lines = [f"{proc.order_type}: {proc.description}",
             f"  failure policy: {proc.failure_policy}; item failure: {proc.item_failure}; "
             f"point of no return: {proc.point_of_no_return or '-'}; "
             f"sequencing: {proc.sequencing_key or '-'}",
             f"  CRM notified of: {', '.join(sorted(proc.notify_states)) or '-'}", ""]
    for step in proc.steps:
        after = f"  after {', '.join(step.after)}" if step.after else "  (start)"
        if step.wait_event:
            what = f"wait for event {step.wait_event}"
        elif step.per_item:
            what = "per item: " + "; ".join(
                f"{act} -> {a.system}.{a.op}" for act, a in step.per_item.items())
        else:
            a = step.action
            comp = f", undo {a.compensate[0]}" if a.compensate else ""
            what = f"{a.system}.{a.op}{comp}"
        hold = (f"; hold '{step.hold.reason}' while {step.hold.field} == {step.hold.equals!r}"
                f" until {step.hold.until_event}") if step.hold else ""
        lines.append(f"  [{step.name}] {what}{hold}")
        lines.append(f"      {after.strip()}; timeout {step.timeout_s:g} s; "
                     f"retry x{step.retry.max_attempts}")
    return "\n".join(lines)


def cmd_archive(args: argparse.Namespace) -> int:
    from oms.archive import cmd_archive as run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import run_bench

    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from oms.demo import run_demo

    return run_demo(args.orders, args.data, args.timeout)


def _ops(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from oms import opscli

        return int(getattr(opscli, f"cmd_{name}")(args))

    return run


COMMANDS = {"serve": cmd_serve, "simulate": cmd_simulate, "submit": cmd_submit,
            "archive": cmd_archive,
            "status": cmd_status, "keys": cmd_keys, "processes": cmd_processes, "demo": cmd_demo, "health": cmd_health,
            "bench": cmd_bench, "orders": _ops("orders"), "order": _ops("order"),
            "fallout": _ops("fallout")}

if __name__ == "__main__":
    sys.exit(main())
