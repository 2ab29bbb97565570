"""`oms simulate` (the reference domain systems) and `oms keys` (CURVE key pairs)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from actors import logs
from actors.runtime import tune_gc
from oms.config import DEFAULT_SYSTEMS, ConfigError, parse_systems


def add_parsers(sub: Any) -> None:
    """simulate, keys."""
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


def cmd_keys(args: argparse.Namespace) -> int:
    from actors.security import OPERATOR, generate, is_operator_name

    for name in args.names:  # a near miss would silently be a channel, not an operator
        if name.lower().startswith(OPERATOR) and not is_operator_name(name):
            print(f"note: {name!r} is not an operator identity (those are exactly "
                  f"'{OPERATOR}' or '{OPERATOR}-<who>'); with this key a client is the "
                  f"channel {name!r} and may act on that source_system's orders only",
                  file=sys.stderr)
    for path in generate(args.out, args.names):
        print(path)
    return 0

