"""`oms submit`, `oms status` and `oms health`; how an order is shown."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from actors.settings import load_config
from oms.config import ConfigError


def add_parsers(sub: Any) -> None:
    """submit, status (before the operator commands)."""
    from app.opscli import common

    submit = sub.add_parser("submit", help="submit orders from a file or samples")
    submit.add_argument("file", nargs="?", help="JSON file: one order or a list of orders")
    submit.add_argument("--sample", type=int, help="submit N sample orders")
    submit.add_argument("--telecom", type=float, default=0.0,
                        help="share of telecom samples, 0 to 1 (default %(default)g)")
    common(submit)

    status = sub.add_parser("status", help="show one order (same as oms order show)")
    status.add_argument("order_id")
    common(status)


def add_health_parser(sub: Any) -> None:
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


def _client(args: argparse.Namespace) -> Any:
    from app.opscli import connect

    return connect(args)


def read_orders(file: str) -> list[Any]:
    """Orders from a JSON file (one order or a list); a clear error otherwise."""
    from app.opscli import CommandError

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
    from app.opscli import as_json
    from oms.sample import sample_orders

    check_count("--sample", args.sample, 1, 1_000_000)
    check_count("--telecom", args.telecom, 0, 1)
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
                print(json.dumps({"external_id": ext, "reply": as_json(reply)}))
            elif reply["type"] == "accepted":
                dup = " (duplicate)" if reply.get("duplicate") else ""
                print(f"{ext}: accepted as {reply['order_id']}{dup}")
            else:
                failures += 1
                print(f"{ext}: {reply['type']} {reply.get('errors') or reply.get('message')}")
    return 1 if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    from app.opscli import as_json

    with _client(args) as client:
        reply = client.get(args.order_id)
    if args.json:
        print(json.dumps(as_json(reply), indent=2))
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
    from app.opscli import fallout_of, render_fallout

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

    cfg = load_config(args.config, metrics_host=args.metrics_host,
                      metrics_port=args.metrics_port, intake=args.intake)
    from app.opscli import CommandError, time_left

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

    from gateways.client import Client

    try:
        with Client(endpoint, timeout=timeout) as client:
            client.request({"type": "get_order", "order_id": "-"})
        return True
    except (TimeoutError, zmq.ZMQError):
        return False


def check_count(flag: str, value: float | None, low: float, high: float) -> None:
    """A number flag finite and within [low, high]; a one-line error otherwise
    (``--sample -5`` submitted nothing and exited 0; ``--telecom nan`` was
    taken)."""
    import math

    if value is not None and not (math.isfinite(value) and low <= value <= high):
        def text(x: float) -> str:
            return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"

        raise ConfigError(f"{flag} {value!r:.40}: give a number from {text(low)} to "
                          f"{text(high)}")

