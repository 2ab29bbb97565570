"""Operator commands: ``oms orders``, ``oms order show|retry|skip|abort``,
``oms fallout list``. Every one takes ``--json`` for scripts."""

from __future__ import annotations

import argparse
import getpass
import json
import time
from typing import Any

from oms.client import Client
from oms.config import Config


def add_parsers(sub: Any) -> None:
    orders = sub.add_parser("orders", help="list orders with filters; counts per state")
    orders.add_argument("--state")
    orders.add_argument("--source", help="source_system")
    orders.add_argument("--reason", help="state_reason, e.g. fallout, awaiting_stock")
    orders.add_argument("--older-than", type=float, metavar="SECONDS",
                        help="created at least this long ago")
    orders.add_argument("--limit", type=int, default=50)
    _common(orders)

    order = sub.add_parser("order", help="one order: show it, or act on it as an operator")
    acts = order.add_subparsers(dest="action", required=True)
    show = acts.add_parser("show", help="steps, attempts, results, history")
    show.add_argument("order_id")
    _common(show)
    for action, helptext in (("retry", "run the failed step again"),
                             ("skip", "mark the failed step done and go on"),
                             ("abort", "compensate completed steps, then failed")):
        act = acts.add_parser(action, help=helptext)
        act.add_argument("order_id")
        if action == "skip":
            act.add_argument("step", help="the failed step's name")
        act.add_argument("--operator", default=_whoami(), help="your name, for the history")
        act.add_argument("--reason", help="why, for the history")
        _common(act)

    fallout = sub.add_parser("fallout", help="orders held for an operator")
    fsub = fallout.add_subparsers(dest="action", required=True)
    _common(fsub.add_parser("list", help="every order held as fallout, with its failure"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intake", help="intake endpoint (env OMS_INTAKE)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "operator"


def _client(args: argparse.Namespace) -> Client:
    return Client(Config.load(None, intake=args.intake).intake)


def _all(client: Client, req: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while len(out) < limit:
        page = client.request(dict(req, limit=min(1000, limit - len(out)),
                                   **({"after": cursor} if cursor else {})))
        if page.get("type") != "orders":
            raise SystemExit(f"{page.get('code')}: {page.get('message')}")
        out += page["orders"]
        cursor = page["next"]
        if cursor is None:
            break
    return out


def cmd_orders(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"type": "list_orders"}
    for key, value in (("state", args.state), ("source_system", args.source),
                       ("state_reason", args.reason), ("min_age_s", args.older_than)):
        if value is not None:
            req[key] = value
    with _client(args) as client:
        orders = _all(client, req, args.limit)
        counts = client.request({"type": "order_counts"})
    if args.json:
        print(json.dumps({"orders": orders, "unfinished": counts.get("counts", {})}))
        return 0
    now = time.time()
    print(f"{'order':<15} {'source/external id':<30} {'type':<8} {'state':<22} {'age':>8}")
    for o in orders:
        state = o["state"] + (f" ({o['state_reason']})" if o.get("state_reason") else "")
        ext = f"{o['source_system']}/{o['external_id']}"
        print(f"{o['order_id']:<15} {ext[:30]:<30} {o['order_type']:<8} {state[:22]:<22} "
              f"{_age(now - o['created_ts']):>8}")
    unfinished = counts.get("counts", {})
    summary = ", ".join(f"{k} {v}" for k, v in sorted(unfinished.items())) or "none"
    print(f"\n{len(orders)} listed. Unfinished orders by state: {summary}")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_order(args: argparse.Namespace) -> int:
    from oms.cli import render_order

    with _client(args) as client:
        if args.action == "show":
            reply = client.get(args.order_id)
        else:
            rtype = {"retry": "retry_step", "skip": "skip_step", "abort": "abort_order"}
            req = {"type": rtype[args.action], "order_id": args.order_id,
                   "operator": args.operator, "reason": args.reason}
            if args.action == "skip":
                req["step"] = args.step
            reply = client.request(req)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif reply["type"] == "order":
        print(render_order(reply["order"]))
    elif reply["type"] == "operator_accepted":
        print(f"{args.action} accepted: order {reply['order_id']} is now {reply['state']}")
    elif reply["type"] == "operator_rejected":
        print(f"{args.action} refused: {reply['reason']}")
    else:
        print(f"{reply.get('code')}: {reply.get('message')}")
    return 0 if reply["type"] in ("order", "operator_accepted") else 1


def cmd_fallout(args: argparse.Namespace) -> int:
    with _client(args) as client:
        held = _all(client, {"type": "list_orders", "state": "held",
                             "state_reason": "fallout"}, 100_000)
        details = [client.get(o["order_id"]).get("order", o) for o in held]
    if args.json:
        print(json.dumps([{"order_id": d["order_id"], "external_id": d["external_id"],
                           "failure": d.get("failure")} for d in details]))
        return 0
    if not details:
        print("no orders held as fallout")
    for d in details:
        failure = d.get("failure") or {}
        error = failure.get("error") or {}
        print(f"{d['order_id']}  {d['source_system']}/{d['external_id']}  step "
              f"{failure.get('step')}: {error.get('code')} {error.get('message', '')}")
    if details:
        print("\nact with: oms order retry ID | oms order skip ID STEP | oms order abort ID")
    return 0
