"""`oms processes`: check process definitions, show an order type's steps."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    procs = sub.add_parser("processes", help="check or show process definitions")
    psub = procs.add_subparsers(dest="action", required=True)
    check = psub.add_parser("check", help="validate definitions without starting")
    check.add_argument("dir", nargs="?", help="folder of *.toml (default: built-ins only)")
    show = psub.add_parser("show", help="print an order type's step graph")
    show.add_argument("order_type")
    show.add_argument("--processes", help="folder of *.toml to load as well")


def cmd_processes(args: argparse.Namespace) -> int:
    from actors.settings import load_processes

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


def naming(match: str | None) -> str:
    """How a hold's event must name the held step (``oms.holds``)."""
    return f" with the same {match} (or none)" if match else ""


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
                f" until {step.hold.until_event}{naming(step.hold.match)}, without a time "
                "limit") if step.hold else ""
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

