"""Operator commands: ``oms orders``, ``oms order show|cancel|retry|skip|abort``,
``oms fallout list``. Every one takes ``--json`` for scripts, ``--intake``
(env ``OMS_INTAKE``) and ``--timeout`` (default 3 s, counted from the start of
the command, so the shell sees the failure within 3 s: a service that does
not answer is reported in one line, never waited on for long)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from actors.settings import load_config
from gateways.client import Client

DEFAULT_TIMEOUT = 3.0
OPERATOR_REQUEST = {"retry": "retry_step", "skip": "skip_step", "abort": "abort_order"}


def add_parsers(sub: Any) -> None:
    orders = sub.add_parser("orders", help="list orders, newest first, with filters; "
                            "counts per state")
    orders.add_argument("--state", help="only orders in this state, e.g. held, completed")
    orders.add_argument("--source", help="only orders of this source_system")
    orders.add_argument("--reason", help="state_reason, e.g. fallout, awaiting_stock")
    orders.add_argument("--older-than", type=float, metavar="SECONDS",
                        help="created at least this long ago")
    orders.add_argument("--limit", type=int, default=50,
                        help="show at most this many orders (1-1000; default 50)")
    orders.add_argument("--after", metavar="CURSOR",
                        help="continue with the orders older than this one (the cursor a "
                        "previous page printed)")
    common(orders)

    order = sub.add_parser("order", help="one order: show it, cancel it, or act on it as an "
                           "operator")
    acts = order.add_subparsers(dest="action", required=True)
    show = acts.add_parser("show", help="steps, attempts, results, history; what failed")
    _order_ref(show)
    common(show)
    cancel = acts.add_parser("cancel", help="cancel an order (before its point of no return)")
    _order_ref(cancel)
    cancel.add_argument("--reason", help="why, for the history")
    common(cancel)
    for action, helptext in (("retry", "run the failed step (or failed undo) again"),
                             ("skip", "mark the failed step done and go on"),
                             ("abort", "compensate completed steps, then failed")):
        act = acts.add_parser(action, help=helptext)
        act.add_argument("order_id")
        if action == "skip":
            act.add_argument("step", nargs="?", help="the failed step's name (default: the "
                             "failed step)")
        act.add_argument("--operator", default=_whoami(),
                         help="your name, for the history (default: your login name)")
        act.add_argument("--reason", help="why, for the history")
        common(act)

    fallout = sub.add_parser("fallout", help="orders held for an operator")
    fsub = fallout.add_subparsers(dest="action", required=True)
    common(fsub.add_parser("list", help="every order held for an operator: what failed and "
                           "what to do"))


def _order_ref(p: argparse.ArgumentParser) -> None:
    p.add_argument("order_id", nargs="?", help="the order id (or give --source-system and "
                   "--external-id)")
    p.add_argument("--source-system", help="with --external-id: find the order by the "
                   "channel's own number")
    p.add_argument("--external-id", help="the channel's order number")


def common(p: argparse.ArgumentParser) -> None:
    """The flags every command that talks to the intake takes."""
    p.add_argument("--intake", help="intake endpoint (env OMS_INTAKE; default "
                   "tcp://127.0.0.1:5555)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up when the service does not answer within this time "
                   f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user database entry (containers)
        return "operator"


def connect(args: argparse.Namespace) -> Client:
    """A client for the command's intake endpoint and timeout."""
    endpoint = load_config(None, intake=args.intake).intake
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    if not timeout > 0 or timeout > 3600:
        raise CommandError("--timeout must be a number of seconds above 0 (at most 3600)")
    client = Client(endpoint, timeout=time_left(timeout))
    client.timeout_text = f"{timeout:g} s of the command's start (--timeout)"
    return client


EXIT_MARGIN_S = 0.25  # to report the failure and leave the interpreter


def time_left(timeout: float, floor: float = 0.2) -> float:
    """What is left of ``timeout`` once this process's own start (interpreter,
    imports: 0.1-0.8 s on a busy machine) and its exit are paid, at least
    ``floor``: the ``--timeout`` a person gives is the wall time they wait."""
    return max(floor, timeout - process_age() - EXIT_MARGIN_S)


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def as_json(reply: dict[str, Any]) -> dict[str, Any]:
    """What ``--json`` prints of a reply (docs/operations.md): an ``order``
    reply's order view itself; any other reply as the contract gives it,
    without ``request_id`` (this client's own, for matching the reply)."""
    if reply.get("type") == "order" and isinstance(reply.get("order"), dict):
        return reply["order"]
    return {key: value for key, value in reply.items() if key != "request_id"}


class CommandError(Exception):
    """A command that cannot go on: one line for the person, exit code 2."""


def order_ref(args: argparse.Namespace) -> dict[str, Any]:
    """``order_id``, or ``source_system`` + ``external_id``, from the flags."""
    if args.order_id and not (args.source_system or args.external_id):
        return {"order_id": args.order_id}
    if not args.order_id and args.source_system and args.external_id:
        return {"source_system": args.source_system, "external_id": args.external_id}
    raise CommandError("give an ORDER_ID, or both --source-system and --external-id")


# -- oms orders ----------------------------------------------------------------


def list_page(client: Client, req: dict[str, Any], limit: int,
              after: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` orders, newest first, older than ``after``; and the cursor
    of the next page (None when no more exist).

    The service answers newest first (protocol 1.1). A service of protocol 1.0
    answers oldest first: then the whole list is read and ordered here.
    """
    out: list[dict[str, Any]] = []
    cursor = after
    while len(out) < limit:
        page = _request_list(client, dict(req, limit=min(1000, limit - len(out)),
                                          **({"after": cursor} if cursor else {})))
        ids = [o["order_id"] for o in page["orders"]]
        created = [o.get("created_ts") or 0.0 for o in page["orders"]]
        sharded = str(page.get("next") or cursor or "").startswith("S1.")
        if not sharded and ((len(ids) >= 2 and created[0] < created[-1]) or (
                cursor and ids and ids[0] > cursor)):
            # oldest first, or newer than the cursor: a 1.0 service (a sharded
            # service's ids do not compare by acceptance, docs/scaling.md)
            return _newest_first_locally(client, req, limit, after)
        out += page["orders"]
        cursor = page.get("next")
        if cursor is None:
            return out, None
    return out, cursor


def _newest_first_locally(client: Client, req: dict[str, Any], limit: int,
                          after: str | None) -> tuple[list[dict[str, Any]], str | None]:
    everything: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = _request_list(client, dict(req, limit=1000,
                                          **({"after": cursor} if cursor else {})))
        everything += page["orders"]
        cursor = page.get("next")
        if cursor is None:
            break
    everything.sort(key=lambda o: o["order_id"], reverse=True)
    if after:
        everything = [o for o in everything if o["order_id"] < after]
    shown = everything[:limit]
    more = len(everything) > limit
    return shown, (shown[-1]["order_id"] if more and shown else None)


def _request_list(client: Client, req: dict[str, Any]) -> dict[str, Any]:
    page = client.request(req)
    if page.get("type") != "orders":
        raise CommandError(f"{page.get('code')}: {page.get('message')}")
    return page


def cmd_orders(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise CommandError("--limit must be 1 to 1000")
    req: dict[str, Any] = {"type": "list_orders"}
    for key, value in (("state", args.state), ("source_system", args.source),
                       ("state_reason", args.reason), ("min_age_s", args.older_than)):
        if value is not None:
            req[key] = value
    with connect(args) as client:
        orders, more = list_page(client, req, args.limit, args.after)
        counts = client.request({"type": "order_counts"})
    unfinished = counts.get("counts", {}) if counts.get("type") == "order_counts" else {}
    if args.json:
        print(json.dumps({"orders": orders, "next": more, "unfinished": unfinished}))
        return 0
    now = time.time()
    print(f"{'order':<15} {'source/external id':<30} {'type':<8} {'state':<22} {'age':>8}")
    for o in orders:
        state = o["state"] + (f" ({o['state_reason']})" if o.get("state_reason") else "")
        ext = f"{o['source_system']}/{o['external_id']}"
        print(f"{o['order_id']:<15} {ext[:30]:<30} {o['order_type']:<8} {state[:22]:<22} "
              f"{_age(now - o['created_ts']):>8}")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(unfinished.items())) or "none"
    print(f"\n{len(orders)} listed, newest first. Unfinished orders by state: {summary}")
    if more:
        print(f"more orders exist: oms orders --after {more}"
              + ("" if args.limit == 50 else f" --limit {args.limit}"))
    else:
        print("no more orders")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- oms order -------------------------------------------------------------------


def cmd_order(args: argparse.Namespace) -> int:
    from app.orders_cli import render_order

    if args.action in ("show", "cancel"):
        ref = order_ref(args)
    with connect(args) as client:
        if args.action == "show":
            reply = client.request({"type": "get_order", **ref})
        elif args.action == "cancel":
            req = {"type": "cancel_order", **ref}
            if args.reason:
                req["reason"] = args.reason
            reply = client.request(req)
        else:
            req = {"type": OPERATOR_REQUEST[args.action], "order_id": args.order_id,
                   "operator": args.operator}
            if args.reason:
                req["reason"] = args.reason
            if args.action == "skip" and args.step:
                req["step"] = args.step
            reply = client.request(req)
    ok = reply["type"] in ("order", "operator_accepted", "cancel_accepted")
    if args.json:
        print(json.dumps(as_json(reply), indent=2))
    elif reply["type"] == "order":
        print(render_order(reply["order"]))
    elif reply["type"] == "operator_accepted":
        print(f"{args.action} accepted: order {reply['order_id']} is now {reply['state']}")
    elif reply["type"] == "operator_rejected":
        print(f"{args.action} refused: {reply['reason']}")
    elif reply["type"] == "cancel_accepted":
        print(f"cancel accepted: order {reply['order_id']} is now {reply['state']} "
              "(completed steps are undone; watch it with oms order show)")
    elif reply["type"] == "cancel_rejected":
        print(f"cancel refused: order {reply['order_id']}: {reply['reason']}")
    else:
        print(f"{reply.get('code')}: {reply.get('message')}")
    return 0 if ok else 1


# -- fallout ---------------------------------------------------------------------


def fallout_of(view: dict[str, Any]) -> dict[str, Any] | None:
    """The order's ``fallout`` block (protocol 1.1), or one derived from the view
    of a service that does not send it yet. None when the order is not held
    for an operator."""
    if view.get("state") != "held":
        return None
    if isinstance(view.get("fallout"), dict):
        return view["fallout"]
    reason = view.get("state_reason")
    if reason not in ("fallout", "internal_error"):
        return None
    failure = view.get("failure") or {}
    step = failure.get("step")
    compensation = bool(failure.get("compensation"))
    error = failure.get("error")
    oid = view.get("order_id", "ID")
    if reason == "internal_error":
        actions = ["retry", "skip", "abort"]
        hint = (f"the service failed while handling this order (see its log for {oid}): "
                f"oms order retry {oid} once fixed, or oms order abort {oid} to undo it")
    elif compensation:
        actions = ["retry", "skip"]
        hint = (f"undoing step {step} failed, so the order is partly undone: fix the cause and "
                f"oms order retry {oid} to run the undo again, or undo it by hand in "
                f"{_system_of(view, step)} and oms order skip {oid}")
    else:
        actions = ["retry", "skip", "abort"]
        hint = (f"fix the cause, then oms order retry {oid}; or oms order skip {oid} if "
                f"{step} was done by hand; or oms order abort {oid} to undo the order")
    return {"step": step, "item": None, "compensation": compensation,
            "error": error, "reason": reason, "actions": actions, "hint": hint}


def _system_of(view: dict[str, Any], step: str | None) -> str:
    for s in view.get("steps", []):
        if s.get("name") == step:
            return str(s.get("system"))
    return "the domain system"


COMMANDS = {"retry": "oms order retry {id}", "skip": "oms order skip {id}{step}",
            "abort": "oms order abort {id}", "cancel": "oms order cancel {id}"}


def render_fallout(f: dict[str, Any], order_id: str = "ID") -> list[str]:
    """Lines saying what failed and what the operator can do next."""
    error = f.get("error") or {}
    what = "undo (compensation) of step" if f.get("compensation") else "step"
    item = f" (item {f['item']})" if f.get("item") else ""
    err = (f"{error.get('code')}: {error.get('message', '')}".rstrip(": ")
           if error else "no error recorded")
    actions = [a for a in f.get("actions") or [] if a in COMMANDS]
    step = f" {f['step']}" if f.get("step") and not f.get("compensation") else ""
    run = " | ".join(COMMANDS[a].format(id=order_id, step=step) for a in actions)
    return [f"  failed:  {what} {f.get('step') or '-'}{item}",
            f"  error:   {err}",
            f"  can do:  {', '.join(actions) or 'nothing'}" + (f"  ({run})" if run else ""),
            f"  next:    {f.get('hint') or '-'}"]


def cmd_fallout(args: argparse.Namespace) -> int:
    with connect(args) as client:
        held: list[dict[str, Any]] = []
        for reason in ("fallout", "internal_error"):
            cursor = None
            while True:
                page = _request_list(client, {"type": "list_orders", "state": "held",
                                              "state_reason": reason, "limit": 1000,
                                              **({"after": cursor} if cursor else {})})
                held += page["orders"]
                cursor = page.get("next")
                if cursor is None:
                    break
        details = [client.get(o["order_id"]).get("order", o) for o in held]
    rows = [(d, fallout_of(d) or {}) for d in details]
    if args.json:
        print(json.dumps([{"order_id": d["order_id"], "source_system": d["source_system"],
                           "external_id": d["external_id"], "fallout": f,
                           "failure": d.get("failure")} for d, f in rows]))
        return 0
    if not rows:
        print("no orders held for an operator")
    for d, f in rows:
        print(f"{d['order_id']}  {d['source_system']}/{d['external_id']}  {d['order_type']}  "
              f"held ({d.get('state_reason')})")
        print("\n".join(render_fallout(f, d["order_id"])))
        print()
    if rows:
        print(f"{len(rows)} held. Details: oms order show ID")
    return 0
