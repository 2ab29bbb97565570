"""``oms console`` (serve the web console) and ``oms console passwd`` (add a user)."""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
from typing import Any

DEFAULT_PORT = 8470


def add_parser(sub: Any) -> None:
    con = sub.add_parser("console", help="web console for operators (oms[console] extra)")
    con.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only)")
    con.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    con.add_argument("--intake", help="the service's intake endpoint (env OMS_INTAKE)")
    con.add_argument("--events", help="the service's events endpoint (env OMS_EVENTS)")
    con.add_argument("--users", metavar="FILE",
                     help="credentials file (oms console passwd); without it the console "
                          "is read-only")
    con.add_argument("--read-only", action="store_true",
                     help="no actions and no logins, whatever --users says")
    con.add_argument("--private", action="store_true",
                     help="every page needs a login, not only actions")
    con.add_argument("--curve-key", metavar="FILE",
                     help="the console's own operator secret key (named 'operator' or "
                          "'operator-<name>'), when the service runs with CURVE")
    con.add_argument("--service-key", metavar="FILE", help="the service's public key")
    con.add_argument("--timeout", type=float, default=3.0,
                     help="seconds to wait for the service's answer")
    con.add_argument("--threads", type=int, default=48,
                     help="web server threads (a live page holds one; at most 32 live pages)")
    con.add_argument("--log-level", default="info")
    acts = con.add_subparsers(dest="action")
    pw = acts.add_parser("passwd", help="add or replace a user in a credentials file")
    pw.add_argument("file")
    pw.add_argument("name")
    pw.add_argument("--role", choices=["operator", "viewer"], default="operator")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input (for scripts)")


def cmd_console(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "passwd":
        return _passwd(args)
    try:
        from waitress.server import create_server

        from console.app import Settings, create_app
    except ImportError as exc:
        print(f"oms console: {exc.name} is missing: pip install 'oms[console]'", file=sys.stderr)
        return 2
    from actors.security import SecurityError, client_options
    from actors.settings import load_config
    from console.auth import CredentialsError, load_users
    from console.backend import Backend, EventFeed

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535 or args.threads < 8 or not 0 < args.timeout <= 60:
        print("oms console: --port 0..65535, --threads >= 8, --timeout 0..60 s",
              file=sys.stderr)
        return 2
    cfg = load_config(None, intake=args.intake, events=args.events)
    curve = None
    try:
        if args.curve_key or args.service_key:
            if not (args.curve_key and args.service_key):
                raise SecurityError("--curve-key and --service-key go together")
            curve = client_options(args.curve_key, args.service_key)
        users = load_users(args.users) if args.users else {}
    except (SecurityError, CredentialsError) as exc:
        print(f"oms console: {exc}", file=sys.stderr)
        return 2
    settings = Settings(intake=cfg.intake, events=cfg.events, users_file=args.users,
                        read_only=args.read_only, private=args.private,
                        service_timeout=args.timeout, max_streams=min(32, args.threads - 4))
    if args.private and not settings.can_login:
        print("oms console: --private needs --users (and no --read-only)", file=sys.stderr)
        return 2
    backend = Backend(cfg.intake, curve=curve, timeout=args.timeout)
    feed = EventFeed(cfg.events, curve=curve)
    app = create_app(settings, backend, feed)
    try:
        server = create_server(app, host=args.host, port=args.port,
                                        threads=args.threads, ident="oms-console")
    except OSError as exc:
        print(f"oms console: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    feed.start()
    port = server.effective_port  # type: ignore[union-attr]  # one host: never a MultiSocketServer
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"oms console: serving plain HTTP on {args.host}: beyond this machine, put a "
              "TLS proxy in front of it", file=sys.stderr)
    mode = ("read-only" if not settings.can_login else
            f"{sum(u.may_act for u in users.values())} operators may act")
    print(f"oms console: http://{args.host}:{port}/  ({mode}; service intake {cfg.intake}, "
          f"events {cfg.events})", flush=True)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        feed.stop()
        backend.close()
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from console.auth import CredentialsError, set_user

    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("oms console passwd: the passwords differ", file=sys.stderr)
            return 2
    try:
        set_user(args.file, args.name, args.role, password, waiting=lambda holder: print(
            f"oms console passwd: waiting for {holder} ...", file=sys.stderr, flush=True))
    except (CredentialsError, OSError) as exc:
        print(f"oms console passwd: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name} ({args.role}) written to {args.file}")
    return 0
