"""The ``oms`` command: serve, simulate, submit, status, demo."""

from __future__ import annotations

import sys

from actors import signals

if sys.argv[1:2] == ["serve"]:  # before anything else: a SIGHUP now must not end it
    signals.guard()

import argparse  # after the guard: these imports take a good part of a second
import re
from typing import Any

from app import orders_cli, processes_cli, serve_cli, simulate_cli
from oms.config import ConfigError
from oms.process import ProcessError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cli.add_parsers(sub)
    simulate_cli.add_parsers(sub)
    orders_cli.add_parsers(sub)

    from app.opscli import add_parsers as add_ops

    add_ops(sub)

    from console.cli import add_parser as add_console

    add_console(sub)
    orders_cli.add_health_parser(sub)
    processes_cli.add_parser(sub)

    from app.archive_cli import add_parser as add_archive

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
PRINTS_ORDERS = CLIENT_COMMANDS | {"archive"}  # text from channels reaches the terminal


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"oms {args.command}" + (f" {args.action}" if getattr(args, "action", None) else "")
    if args.command not in PRINTS_ORDERS:
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

    from app.opscli import CommandError

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


def cmd_archive(args: argparse.Namespace) -> int:
    from app.archive_cli import cmd_archive as run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.cli import run_bench

    return run_bench(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    orders_cli.check_count("--orders", args.orders, 1, 100_000)
    orders_cli.check_count("--timeout", args.timeout, 0.1, 86_400)
    return run_demo(args.orders, args.data, args.timeout)


def _console(args: argparse.Namespace) -> int:
    from console.cli import cmd_console

    return cmd_console(args)


def _ops(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from app import opscli

        return int(getattr(opscli, f"cmd_{name}")(args))

    return run


COMMANDS = {"serve": serve_cli.cmd_serve, "ray": serve_cli.cmd_ray, "shards": serve_cli.cmd_shards,
            "simulate": simulate_cli.cmd_simulate, "submit": orders_cli.cmd_submit,
            "archive": cmd_archive, "status": orders_cli.cmd_status, "keys": simulate_cli.cmd_keys,
            "processes": processes_cli.cmd_processes, "demo": cmd_demo,
            "health": orders_cli.cmd_health,
            "bench": cmd_bench, "orders": _ops("orders"), "order": _ops("order"),
            "fallout": _ops("fallout")}

COMMANDS["console"] = _console

if __name__ == "__main__":
    sys.exit(main())
