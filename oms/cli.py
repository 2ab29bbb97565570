"""The ``oms`` command: serve, simulate, submit, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import re
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
    serve.add_argument("--workers", type=int, help="no effect: every actor runs on the "
                       "event loop (accepted so existing command lines still work)")
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
    serve.add_argument("--shards", type=int, help="shard processes behind one front "
                       "(env OMS_SHARDS; default 1: one process, no front; docs/scaling.md)")
    serve.add_argument("--shard-base-port", type=int, help="shard K listens on 127.0.0.1, "
                       "ports BASE+4K to BASE+4K+3 (default 5600)")

    rayp = sub.add_parser("ray", help="shards on a Ray cluster: up, status, down "
                          "(pip install 'oms[ray]'; docs/scaling.md)")
    rayp.add_argument("action", choices=["up", "status", "down"])
    rayp.add_argument("--address", default="auto", help="Ray cluster (default %(default)s)")
    rayp.add_argument("--config", help="TOML file of the service's settings")
    rayp.add_argument("--data", help="data folder on storage every node reaches")
    rayp.add_argument("--shards", type=int, help="shard processes (default 2)")
    rayp.add_argument("--shard-base-port", type=int, help="shard K: ports BASE+4K..+3")
    _endpoint_flags(rayp)
    rayp.add_argument("--domain-events", help="domain events ROUTER endpoint (the front)")
    rayp.add_argument("--metrics-port", type=int, help="the front's Prometheus port, 0 = off")
    rayp.add_argument("--system", action="append", metavar="NAME=EP")
    rayp.add_argument("--processes", help="folder of process definitions (*.toml)")

    shp = sub.add_parser("shards", help="a sharded data folder: show where the virtual "
                         "shards are, or move them (service stopped; docs/scaling.md)")
    shsub = shp.add_subparsers(dest="action", required=True)
    shshow = shsub.add_parser("show", help="virtual shards per process")
    shshow.add_argument("--data", required=True)
    shmove = shsub.add_parser("move", help="rebalance onto --processes M (offline)")
    shmove.add_argument("--data", required=True)
    shmove.add_argument("--processes", type=int, required=True)

    sim = sub.add_parser("simulate", help="run the reference domain systems")
    sim.add_argument("--system", action="append", metavar="NAME=EP",
                     help="system endpoint to bind (repeatable; default: all five on "
                     "tcp://127.0.0.1:5561-5565)")
    sim.add_argument("--only", action="append", metavar="NAME[,NAME...]",
                     help="simulate only these systems: a comma list, or repeat the flag "
                     f"(default: all of {', '.join(DEFAULT_SYSTEMS)})")
    sim.add_argument("--service-events", default="tcp://127.0.0.1:5557",
                     help="the service's domain events endpoint, where events are pushed "
                     "(default %(default)s)")
    sim.add_argument("--latency-ms", type=float, default=0.0,
                     help="delay before each reply, in ms (default %(default)g)")
    sim.add_argument("--stock", type=int, default=1_000_000,
                     help="initial units per product (default %(default)d)")
    sim.add_argument("--stock-of", action="append", default=[], metavar="PRODUCT=N",
                     help="initial units of one product (repeatable; default: --stock)")
    sim.add_argument("--scarce", type=int, default=None,
                     help="initial units of the sample orders' scarce products (SKU-9xx) "
                     "(default: --stock)")
    sim.add_argument("--restock-s", type=float, default=1.0,
                     help="seconds until a back-order is restocked and stock_reserved sent "
                     "(default %(default)g)")
    sim.add_argument("--delivery-s", type=float, default=0.5,
                     help="seconds from create_shipment to shipment_delivered "
                     "(default %(default)g)")
    sim.add_argument("--fail", action="append", default=[], metavar="OP=RATE[:CODE]",
                     help="fail OP with probability RATE, 0 to 1 (repeatable; CODE default: "
                     "unavailable; default: no failures)")
    sim.add_argument("--drop", action="append", default=[], metavar="OP=RATE",
                     help="apply OP but drop the reply with probability RATE (repeatable; "
                     "default: none dropped)")
    sim.add_argument("--seed", type=int,
                     help="random seed for failures, drops and ids (default: random)")
    sim.add_argument("--curve-key", metavar="FILE",
                     help="the simulators' secret key file (default: no CURVE)")
    sim.add_argument("--curve-clients", metavar="DIR",
                     help="allowed public keys: CURVE on the simulators' sockets "
                     "(default: any client)")
    sim.add_argument("--service-key", metavar="FILE",
                     help="the service's public key, to push events over CURVE "
                     "(default: plain TCP)")

    keys = sub.add_parser("keys", help="CURVE key pairs")
    ksub = keys.add_subparsers(dest="action", required=True)
    gen = ksub.add_parser("generate", help="write NAME.key and NAME.key_secret (0600)")
    gen.add_argument("--out", required=True, help="folder to write into")
    gen.add_argument("names", nargs="+", help="one key pair per name (the identity)")
    sim.add_argument("--log-level", default="info", type=str.lower,
                     choices=["debug", "info", "warning", "error", "critical"],
                     help="debug, info, warning, error (default %(default)s)")

    from oms.opscli import add_parsers as add_ops
    from oms.opscli import common

    submit = sub.add_parser("submit", help="submit orders from a file or samples")
    submit.add_argument("file", nargs="?", help="JSON file: one order or a list of orders")
    submit.add_argument("--sample", type=int, help="submit N sample orders")
    submit.add_argument("--telecom", type=float, default=0.0,
                        help="share of telecom samples, 0 to 1 (default %(default)g)")
    common(submit)

    status = sub.add_parser("status", help="show one order (same as oms order show)")
    status.add_argument("order_id")
    common(status)

    add_ops(sub)

    from console.cli import add_parser as add_console

    add_console(sub)

    health = sub.add_parser("health", help="is the service alive and ready? (exit 0 if so)")
    health.add_argument("--config", help="TOML file of the service's settings")
    health.add_argument("--metrics-host", help="host of the metrics/health HTTP server "
                        "(env OMS_METRICS_HOST; default 127.0.0.1)")
    health.add_argument("--metrics-port", type=int, help="its port (env OMS_METRICS_PORT; "
                        "default 9464)")
    health.add_argument("--url", default=None, help="metrics base URL instead of host and "
                        "port, e.g. http://HOST:PORT")
    health.add_argument("--intake", help="also check that this intake endpoint answers "
                        "(env OMS_INTAKE; checked only when given)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                        help="for all checks together, counted from the command's start "
                        "(default %(default)g)")
    health.add_argument("--json", action="store_true", help="machine-readable output")

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
    demo.add_argument("--orders", type=int, default=200,
                      help="sample orders to run (default %(default)d)")
    demo.add_argument("--data", default=".oms-demo",
                      help="data folder, emptied first (default %(default)s)")
    demo.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to wait for every order to finish (default %(default)g)")
    return parser


CLIENT_COMMANDS = {"submit", "status", "orders", "order", "fallout"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"oms {args.command}" + (f" {args.action}" if getattr(args, "action", None) else "")
    if args.command not in CLIENT_COMMANDS:
        return _run(args, name)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Printable(out), Printable(err)  # text from channels and domains
    try:
        return _run(args, name)
    finally:
        sys.stdout, sys.stderr = out, err


class Printable:
    """A text stream that shows control characters as ``\\xNN``: order ids,
    product ids, reasons and error messages come from channels and domain
    systems, and an escape sequence in one must not drive the operator's
    terminal (``oms orders`` printed ``\\x1b[2J`` as it came)."""

    CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        return self.inner.write(self.CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, ...
        return getattr(self.inner, name)


def _run(args: argparse.Namespace, name: str) -> int:
    import zmq

    from oms.opscli import CommandError

    try:
        return int(COMMANDS[args.command](args) or 0)
    except (ConfigError, ProcessError, CommandError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        if args.command not in CLIENT_COMMANDS:
            raise
        print(f"{name}: {exc}: is the service running? (--intake or OMS_INTAKE; "
              "--timeout)", file=sys.stderr)
        return 3
    except zmq.ZMQError as exc:
        if args.command not in CLIENT_COMMANDS:
            raise
        print(f"{name}: cannot use the intake endpoint: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (oms orders | head -1): nothing more to say
        return 141
    except KeyboardInterrupt:
        return 130


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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
                      domain_server_key=args.domain_server_key, shards=args.shards,
                      shard_base_port=args.shard_base_port)
    logs.setup(cfg.log_level, cfg.log_format)
    stop, reload = SignalFlag(), SignalFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.shards != 1:  # docs/scaling.md
        from shards.supervisor import run_sharded

        return run_sharded(cfg, args.config, stop)
    if not cfg.vshards and (Path(cfg.data) / "shards.json").exists():
        raise ConfigError(f"{cfg.data} holds a sharded service (shards.json): run oms serve "
                          "--shards N on it (N as in the file)")
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


class SignalFlag:
    """Set from a signal handler: no lock (a threading.Event's lock, taken by
    the handler while the main thread held it in ``wait``, hung a shard on
    SIGTERM for good)."""

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def clear(self) -> None:
        self.value = False

    def is_set(self) -> bool:
        return self.value

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.value and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self.value


def cmd_ray(args: argparse.Namespace) -> int:
    try:
        from shards.ray_cluster import cmd_ray as run
    except ImportError as exc:
        raise ConfigError(f"Ray is not installed ({exc}): pip install 'oms[ray]'") from None
    systems = parse_systems(args.system, "--system") if args.system else None
    cfg = Config.load(args.config, data=args.data, intake=args.intake, events=args.events,
                      domain_events=args.domain_events, metrics_port=args.metrics_port,
                      systems=systems, processes=args.processes,
                      shards=args.shards or 2, shard_base_port=args.shard_base_port)
    return run(args, cfg)


def cmd_shards(args: argparse.Namespace) -> int:
    from oms.store import StoreLocked
    from shards import reshard

    try:
        out = (reshard.show(args.data) if args.action == "show"
               else reshard.move(args.data, args.processes))
    except StoreLocked as exc:
        raise ConfigError(f"{exc} (stop the service before moving virtual shards)") from None
    print(json.dumps(out, indent=1))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import zmq

    from gateways.sim_domain import SimConfig
    from gateways.simulator import run_simulator

    logs.setup(args.log_level, "json")
    systems = dict(DEFAULT_SYSTEMS)
    if args.system:
        systems.update(parse_systems(args.system, "--system"))
    if args.only:
        only = [n.strip() for spec in args.only for n in spec.split(",") if n.strip()]
        unknown = sorted(set(only) - set(systems))
        if unknown or not only:
            print(f"oms simulate: --only: unknown system {', '.join(unknown) or '(none)'}; "
                  f"valid: {', '.join(systems)}", file=sys.stderr)
            return 2
        systems = {k: v for k, v in systems.items() if k in only}
    fail = {}
    for spec in args.fail:
        op, _, rest = spec.partition("=")
        rate, _, code = rest.partition(":")
        fail[op] = (_rate(spec, "--fail", op, rate), code or "unavailable")
    drop = {op: _rate(s, "--drop", op, rate)
            for s, (op, _, rate) in ((s, s.partition("=")) for s in args.drop)}
    stock_of = {}
    for spec in args.stock_of:
        product, _, n = spec.partition("=")
        if not product or not n.isdigit():
            raise ConfigError(f"--stock-of {spec!r}: give PRODUCT=N, N a whole number")
        stock_of[product] = int(n)
    _check_sim_numbers(args, {"--fail": set(fail), "--drop": set(drop)})
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


def _check_sim_numbers(args: argparse.Namespace, ops: dict[str, set[str]]) -> None:
    """Every number flag finite and in range, every OP one the simulators
    know: a clear error at start (``--latency-ms nan`` or ``--restock-s inf``
    were taken and ended the simulator's timers later)."""
    import math

    from gateways.sim_domain import Domain

    for flag, value, high in (("--latency-ms", args.latency_ms, 60_000.0),
                              ("--restock-s", args.restock_s, 86_400.0),
                              ("--delivery-s", args.delivery_s, 86_400.0),
                              ("--stock", args.stock, 10**12),
                              ("--scarce", args.scarce, 10**12)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= high):
            raise ConfigError(f"{flag} {value!r:.40}: give a number from 0 to {high:g}")
    known = {name.split("_", 2)[2] for name in dir(Domain) if name.startswith("op_")
             and name.count("_") >= 2}
    for flag, names in ops.items():
        if unknown := sorted(names - known):
            raise ConfigError(f"{flag}: unknown operation {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")


def _rate(spec: str, flag: str, op: str, rate: str) -> float:
    """A probability from OP=RATE: 0 to 1, else a one-line error."""
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if not op or not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ConfigError(f"{flag} {spec!r}: give OP=RATE with RATE from 0 to 1")
    return value


def _client(args: argparse.Namespace) -> Any:
    from oms.opscli import connect

    return connect(args)


def read_orders(file: str) -> list[Any]:
    """Orders from a JSON file (one order or a list); a clear error otherwise."""
    from oms.opscli import CommandError

    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(
            f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{file} is not JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}") from None
    orders = loaded if isinstance(loaded, list) else [loaded]
    if not orders or not all(isinstance(o, dict) for o in orders):
        raise CommandError(f"{file} must hold one order (a JSON object) or a list of them")
    return orders


def cmd_submit(args: argparse.Namespace) -> int:
    from oms.sample import sample_orders

    _check_count("--sample", args.sample, 1, 1_000_000)
    _check_count("--telecom", args.telecom, 0, 1)
    if args.sample:
        orders = list(sample_orders(args.sample, telecom_ratio=args.telecom,
                                    prefix=f"CLI{threading.get_ident() % 10000:04d}-"))
    elif args.file:
        orders = read_orders(args.file)
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
    from oms.opscli import fallout_of, render_fallout

    fallout = fallout_of(o)
    if fallout:
        lines += ["", f"held ({fallout.get('reason') or o.get('state_reason')}):"
                  ] + render_fallout(fallout, o["order_id"])
    elif o.get("failure") and o.get("state") in ("failed", "partial"):
        err = o["failure"].get("error") or {}
        lines += ["", f"failed at step {o['failure'].get('step')}: {err.get('code')}: "
                      f"{err.get('message', '')}"]
    if o.get("summary"):
        lines += ["", f"summary: {json.dumps(o['summary'].get('results', {}))}"]
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    cfg = Config.load(args.config, metrics_host=args.metrics_host,
                      metrics_port=args.metrics_port, intake=args.intake)
    from oms.opscli import CommandError, time_left

    if not 0 < args.timeout <= 3600:
        raise CommandError("--timeout must be a number of seconds above 0 (at most 3600)")
    deadline = time.monotonic() + time_left(args.timeout)

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    base = (args.url or f"http://{cfg.metrics_host}:{cfg.metrics_port}").rstrip("/")
    result = {}
    for check in ("healthz", "readyz"):
        try:
            with urllib.request.urlopen(f"{base}/{check}", timeout=left()) as resp:  # noqa: S310 - the operator's own --url
                result[check] = resp.status == 200
        except urllib.error.HTTPError as exc:
            result[check] = exc.code == 200
        except (OSError, ValueError):
            result[check] = False
    intake = None
    if args.intake or "OMS_INTAKE" in __import__("os").environ:
        intake = _intake_answers(cfg.intake, left())
    healthy = result["healthz"] and result["readyz"] and intake is not False
    if args.json:
        out = {"url": base, "live": result["healthz"], "ready": result["readyz"]}
        if intake is not None:
            out.update(intake=cfg.intake, intake_answers=intake)
        print(json.dumps(out))
    else:
        live = "live" if result["healthz"] else "not answering"
        ready = "ready" if result["readyz"] else "not ready"
        extra = "" if intake is None else (
            f"; intake {cfg.intake} " + ("answers" if intake else "does not answer"))
        print(f"{base}: {live}, {ready}{extra}")
    return 0 if healthy else 1


def _intake_answers(endpoint: str, timeout: float) -> bool:
    import zmq

    from oms.client import Client

    try:
        with Client(endpoint, timeout=timeout) as client:
            client.request({"type": "get_order", "order_id": "-"})
        return True
    except (TimeoutError, zmq.ZMQError):
        return False


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
             f"  CRM notified of: {', '.join(sorted(proc.notify_states)) or '-'}"]
    if proc.expected_s:
        lines.append(f"  whole order expected within {proc.expected_s:g} s (else order_jeopardy)")
    lines.append("")
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
                f" until {step.hold.until_event}, without a time limit") if step.hold else ""
        lines.append(f"  [{step.name}] {what}{hold}")
        if step.wait_event:
            limit = (f"gives up after {step.wait_timeout_s:g} s" if step.wait_timeout_s
                     else "waits without a time limit")
            lines.append(f"      {after.strip()}; {limit}")
        else:
            lines.append(f"      {after.strip()}; timeout {step.timeout_s:g} s; "
                         f"retry x{step.retry.max_attempts}")
        if step.expected_s:
            lines[-1] += f"; expected within {step.expected_s:g} s"
    return "\n".join(lines)


def cmd_archive(args: argparse.Namespace) -> int:
    from oms.archive import cmd_archive as run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import run_bench

    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from oms.demo import run_demo

    _check_count("--orders", args.orders, 1, 100_000)
    _check_count("--timeout", args.timeout, 0.1, 86_400)
    return run_demo(args.orders, args.data, args.timeout)


def _check_count(flag: str, value: float | None, low: float, high: float) -> None:
    """A number flag finite and within [low, high]; a one-line error otherwise
    (``--sample -5`` submitted nothing and exited 0; ``--telecom nan`` was
    taken)."""
    import math

    if value is not None and not (math.isfinite(value) and low <= value <= high):
        def text(x: float) -> str:
            return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"

        raise ConfigError(f"{flag} {value!r:.40}: give a number from {text(low)} to "
                          f"{text(high)}")


def _console(args: argparse.Namespace) -> int:
    from console.cli import cmd_console

    return cmd_console(args)


def _ops(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from oms import opscli

        return int(getattr(opscli, f"cmd_{name}")(args))

    return run


COMMANDS = {"serve": cmd_serve, "ray": cmd_ray, "shards": cmd_shards, "simulate": cmd_simulate,
            "submit": cmd_submit, "archive": cmd_archive,
            "status": cmd_status, "keys": cmd_keys, "processes": cmd_processes, "demo": cmd_demo,
            "health": cmd_health,
            "bench": cmd_bench, "orders": _ops("orders"), "order": _ops("order"),
            "fallout": _ops("fallout")}
COMMANDS["console"] = _console

if __name__ == "__main__":
    sys.exit(main())
