"""Bench reports: a text table for people, JSON for machines, and a PNG of
latency over time and its distribution (when matplotlib is installed:
``pip install -e '.[bench]'``)."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Each scenario's targets (issue 15, on the 2-core machine with the service, the
# simulators and the load generator on it): (what, how to read the result, the
# bound). A target whose figure the run did not produce is "not measured",
# never "met"; the retail targets are read by mode (closed loop with
# --baseline, or open loop at 500 orders/s).
TARGETS: dict[str, list[tuple[str, Any, str, float]]] = {
    "retail": [
        ("closed loop: service CPU per order <= 2.5x the baseline's",
         lambda r: _closed(r) and _cpu_ratio(r), "<=", 2.5),
        ("closed loop: throughput >= 0.5x the baseline's",
         lambda r: _closed(r) and _ratio(r), ">=", 0.5),
        ("open loop at >= 500/s: completion p50 <= 30 ms",
         lambda r: _open500(r) and _get(r, "completion_latency_s", "p50"), "<=", 0.030),
        ("open loop at >= 500/s: completion p99 <= 150 ms",
         lambda r: _open500(r) and _get(r, "completion_latency_s", "p99"), "<=", 0.150),
    ],
    "intake": [
        (">= 7,590 orders/s durably acknowledged (2x 3,795)",
         lambda r: r.get("orders_per_s"), ">=", 7590),
    ],
    "waiting": [
        ("100,000 waiting orders", lambda r: r.get("waiting_orders"), ">=", 100_000),
        ("< 500 MB RSS", lambda r: r.get("rss_mb"), "<", 500),
        ("< 64 threads", lambda r: r.get("threads"), "<", 64),
        ("restart to accepting < 5 s", lambda r: r.get("restart_to_accepting_s"), "<", 5),
    ],
    "soak": [
        ("p99 completion <= 100 ms", lambda r: _get(r, "completion_latency_s", "p99"), "<=",
         0.1),
        ("at 2,500 orders/s offered", lambda r: r.get("offered_per_s"), ">=",
         2500),
    ],
}


def _get(r: dict[str, Any], *path: str) -> Any:
    value: Any = r
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _closed(r: dict[str, Any]) -> bool:
    return str(r.get("mode", "")).startswith("closed")


def _open500(r: dict[str, Any]) -> bool:
    return str(r.get("mode", "")).startswith("open") and (r.get("offered_per_s") or 0) >= 500


def _ratio(r: dict[str, Any]) -> float | None:
    base = _get(r, "baseline", "orders_per_s")
    return r.get("orders_per_s", 0) / base if base else None


def _cpu_per_order(run: dict[str, Any] | None) -> float | None:
    cpu, finished = _get(run or {}, "service", "cpu_s"), (run or {}).get("finished")
    return cpu / finished if cpu and finished else None


def _cpu_ratio(r: dict[str, Any]) -> float | None:
    mine, base = _cpu_per_order(r), _cpu_per_order(r.get("baseline"))
    return mine / base if mine and base else None


def target_verdicts(r: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(target, "met" | "NOT met" | "not measured", the figure) for the scenario."""
    out: list[tuple[str, str, float | None]] = []
    for what, read, op, bound in TARGETS.get(r.get("scenario", ""), []):
        try:
            value = read(r)
        except (TypeError, ZeroDivisionError):
            value = None
        if not isinstance(value, int | float) or isinstance(value, bool):
            if value is not False:  # False: the run was of another mode
                out.append((what, "not measured", None))
            continue
        out.append((what, "met" if _holds(value, op, bound) else "NOT met", value))
    return out


def _holds(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]


def failed_run(r: dict[str, Any]) -> bool:
    """A run that failed (its exit code is 1): an error, orders left
    unfinished (its own or its baseline's), or a fault soak's broken promise."""
    faults = r.get("faults") or {}
    return bool(r.get("error") or r.get("unfinished")
                or (r.get("baseline") or {}).get("unfinished")
                or faults.get("applied_twice") or faults.get("retail_once_ops_over_once")
                or faults.get("sequencing_overlaps"))


def _figure(what: str, value: float) -> str:
    """A target's figure as the target states it: 16.5 ms (recorded in
    seconds), 2.16, 15,799."""
    if what.endswith(" ms"):
        return f"{value * 1000:,.1f} ms"
    return f"{value:,.3g}" if value < 10 else f"{value:,.0f}"


def _target_lines(r: dict[str, Any]) -> list[str]:
    verdicts = target_verdicts(r)
    if not verdicts:
        return []
    lines = ["", "targets:"]
    for what, verdict, value in verdicts:
        figure = "" if value is None else f" (measured {_figure(what, value)})"
        lines.append(f"  {verdict:<13} {what}{figure}")
    return lines


def _ms(value: float) -> str:
    return f"{value * 1000:9.1f}"


def render(r: dict[str, Any]) -> str:
    lines = [f"oms bench — scenario {r['scenario']} ({r.get('mode', '')})",
             f"machine: {r['machine']['cpus']} cpus, {r['machine']['mem_gb']} GB, "
             f"Python {r['machine']['python']}, " + ", ".join(
                 f"{k} {v}" for k, v in r["machine"]["versions"].items()), ""]
    what = "accepted" if r["scenario"] == "intake" else "finished"
    lines.append(f"orders:       {r.get('orders', 0)} submitted, {r.get('accepted', 0)} "
                 f"accepted, {r.get('finished', 0)} {what if what != 'accepted' else 'acked'}"
                 f" in {r.get('seconds', 0):.1f} s")
    lines.append(f"throughput:   {r.get('orders_per_s', 0):,.0f} orders/s {what} "
                 "(after warm-up)")
    if "baseline" in r:
        base = r["baseline"]["orders_per_s"]
        ratio = r.get("orders_per_s", 0) / base if base else 0
        lines.append(f"baseline:     {base:,.0f} orders/s (same workload and I/O, no actors)"
                     f" -> service = {ratio:.2f}x baseline")
    lines += ["", f"latency (ms)  {'p50':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'max':>9}"]
    for key, label in (("accept_latency_s", "accept"), ("completion_latency_s", "complete")):
        p = r.get(key)
        if p and p.get("max"):
            lines.append(f"{label:<13}" + " ".join(_ms(p[q]) for q in
                                                    ("p50", "p90", "p99", "p99.9", "max")))
    svc = r.get("service")
    if svc:
        lines += ["", f"service:      {svc['cpu_s']:.1f} CPU s, peak RSS "
                      f"{svc['peak_rss_mb']:.0f} MB, {svc['threads']} threads"]
        turns = svc.get("loop_turn_s")
        if turns:
            lines.append(f"loop turn:    p50 <= {turns['p50'] * 1000:g} ms, p99 <= "
                         f"{turns['p99'] * 1000:g} ms, p99.9 <= {turns['p99.9'] * 1000:g} ms "
                         f"({turns['turns']:,.0f} turns; histogram bucket bounds)")
    lines += _cpu_lines(r)
    if r["scenario"] == "waiting" and "waiting_orders" in r:  # a failed run has none
        lines += ["", f"waiting:      {r['waiting_orders']} orders waiting for delivery: "
                      f"RSS {r['rss_mb']:.0f} MB (idle {r['idle_rss_mb']:.0f} MB, "
                      f"{r['kb_per_waiting_order']:.2f} KB per order), {r['threads']} threads",
                  f"restart:      {r['restart_to_accepting_s']:.2f} s from start to accepting "
                  f"orders with {r['waiting_orders']} in flight"]
    if r["scenario"] == "engine":
        lines += ["", f"engine:       {r['us_per_message']:.1f} us per message (one step "
                      f"result, start or event), {r['us_per_order_engine']:.0f} us per retail "
                      f"order ({r['messages'] / r['orders']:.0f} messages)"]
        if "us_per_order_engine_spread" in r:
            spread = r["us_per_order_engine_spread"]
            lines.append(f"              per order over {r['rounds']} rounds: min "
                         f"{spread['min']:.1f} / median {spread['median']:.1f} / max "
                         f"{spread['max']:.1f} us")
        lines.append(f"snapshot:     {r['us_per_snapshot_encode']:.1f} us to encode one")
    if r.get("outcomes"):
        lines.append("outcomes:     " + ", ".join(f"{k} {v}" for k, v in
                                                   sorted(r["outcomes"].items())))
    if r.get("errors"):
        lines.append("errors:       " + ", ".join(f"{k} {v}" for k, v in r["errors"].items()))
    lines += _fault_lines(r.get("faults"))
    lines += _trouble_lines(r)
    if not r.get("faults"):  # a fault soak has its own verdict (the chaos branch)
        lines += _target_lines(r)
    return "\n".join(lines)


def _fault_lines(f: dict[str, Any] | None) -> list[str]:
    """The fault soak's verdict (bench/faults.py): faults done, and whether
    every acknowledged order ended terminal with nothing applied twice."""
    if not f:
        return []
    restart = f.get("restart_to_ready_s") or {}
    done = ", ".join(f"{k} {v}" for k, v in sorted(f["done"].items())) or "none"
    lines = ["", f"faults:       {done}"]
    if restart:
        lines.append(f"restart:      after kill -9, start to ready: min {restart['min']:.2f} s, "
                     f"median {restart['median']:.2f} s, max {restart['max']:.2f} s")
    terminal = ", ".join(f"{k} {v}" for k, v in sorted(f["terminal"].items()))
    lines += [f"acknowledged: {f['acknowledged']} ({f['resubmits']} resubmissions, "
              f"{f['duplicates']} answered duplicate, {f['get_order_asks']} get_order asks "
              f"for missed results); {f['not_acknowledged']} never acknowledged",
              f"terminal:     {sum(f['terminal'].values())} ({terminal})"]
    stuck = ", ".join(f"{k} {v}" for k, v in sorted(f["stuck_by_state"].items()))
    lines.append(f"STUCK:        {f['stuck']} acknowledged orders not terminal ({stuck}); "
                 f"e.g. {' '.join(f['stuck_examples'][:5])}; telecom orders of "
                 f"{len(f.get('stuck_customers', {}))} customers" if f["stuck"] else
                 "stuck:        0")
    twice = f["applied_twice"] + f["retail_once_ops_over_once"]
    lines.append(f"APPLIED TWICE: {f['applied_twice']} operations with the same arguments, "
                 f"{f['retail_once_ops_over_once']} retail orders with a once-only op "
                 f"repeated; e.g. {f['applied_twice_examples'][:3]}" if twice else
                 "applied twice: 0 (simulator reports; crm's since its last restart)")
    overlaps = f.get("sequencing_overlaps", 0)
    lines.append(f"SEQUENCING:   {overlaps} telecom orders started before the previous order "
                 f"of their customer ended; e.g. {f['sequencing_examples'][:3]}" if overlaps
                 else f"sequencing:   held ({f.get('telecom_checked', 0)} telecom orders of "
                 f"{f.get('customers', 0)} customers, one at a time per customer)")
    ok = not (f["stuck"] or twice or f["not_acknowledged"] or overlaps)
    lines.append("verdict:      " + ("every acknowledged order terminal, nothing applied "
                                     "twice: met" if ok else "NOT MET"))
    return lines


def _trouble_lines(r: dict[str, Any]) -> list[str]:
    """What went wrong in a run (and the baseline's): said first, not buried."""
    lines = []
    for label, run in (("", r), ("baseline: ", r.get("baseline") or {})):
        if run.get("reconciled"):
            lines.append(f"{label}reconciled:   {run['reconciled']} orders finished without "
                         "their summary event reaching the generator (read with get_order)")
        unfinished = run.get("unfinished") or {}
        if unfinished:
            states = Counter(unfinished.values())
            lines.append(f"{label}UNFINISHED:   {len(unfinished)} orders never finished: "
                         + ", ".join(f"{k} {v}" for k, v in states.most_common()))
    if r.get("error"):
        lines.append(f"FAILED:       {r['error']}")
    if r.get("logs"):
        lines.append(f"logs:         {r['logs']} (the service's and simulators' logs of this run)")
    return lines


def _cpu_lines(r: dict[str, Any]) -> list[str]:
    """CPU per finished order of each process: where the machine's cores went."""
    out = []
    for label, run in (("service", r), ("baseline", r.get("baseline"))):
        if not run or not run.get("finished"):
            continue
        cpu = {"service" if label == "service" else "baseline loop":
               (run.get("service") or {}).get("cpu_s", 0.0), **run.get("others_cpu_s", {})}
        per = ", ".join(f"{k} {v * 1e6 / run['finished']:,.0f}" for k, v in cpu.items() if v)
        if not per:
            continue
        span = run.get("seconds") or 0
        cores = sum(cpu.values()) / span if span else 0
        out.append(f"cpu/order:    {label} run: {per} us ({cores:.2f} cores busy)")
    return out


def write_reports(result: dict[str, Any], out: Path, suffix: str = "") -> str:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / f"{result['scenario']}-{stamp}{suffix}"
    text = render(result)
    base.with_suffix(".txt").write_text(text + "\n")
    slim = {k: v for k, v in result.items() if k != "timeline"}
    base.with_suffix(".json").write_text(json.dumps(slim, indent=2, default=str))
    png = _plot(result, base.with_suffix(".png"))
    return text + f"\n\nreports: {base}.txt, {base}.json" + (f", {png}" if png else
                                                            " (no PNG: pip install "
                                                            "-e '.[bench]' for one)")


# -- several runs (``oms bench --repeat N``) -----------------------------------

FIGURES: list[tuple[str, Callable[[dict[str, Any]], Any], float]] = [
    # (what, how to read it off one run, the factor it is shown with)
    ("orders/s", lambda r: r.get("orders_per_s"), 1),
    ("service CPU per order (us)", _cpu_per_order, 1e6),
    ("baseline loop CPU per order (us)", lambda r: _cpu_per_order(r.get("baseline")), 1e6),
    ("service CPU / baseline's", _cpu_ratio, 1),
    ("throughput / baseline's", _ratio, 1),
    ("completion p50 (ms)", lambda r: _get(r, "completion_latency_s", "p50"), 1e3),
    ("completion p99 (ms)", lambda r: _get(r, "completion_latency_s", "p99"), 1e3),
]


def _spread(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"runs": values, "min": ordered[0], "median": statistics.median(ordered),
            "max": ordered[-1]}


def summarize_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one scenario: each figure's and each target's values,
    min / median / max; a target's verdict is its median's. A failed run
    (``failed_run``) is left out of every figure and verdict, and counted;
    a run that did not produce a figure (a baseline not asked for) is left
    out of that one: each figure's ``runs`` says how many gave it."""
    good = [r for r in results if not failed_run(r)]
    figures: dict[str, Any] = {}
    for what, read, factor in FIGURES:
        values = []
        for r in good:
            try:
                value = read(r)
            except (TypeError, ZeroDivisionError):
                value = None
            if isinstance(value, int | float) and not isinstance(value, bool) and value:
                values.append(value * factor)
        if values:
            figures[what] = _spread(values)
    targets: list[dict[str, Any]] = []
    for what, _, op, bound in TARGETS.get(results[0].get("scenario", ""), []):
        values = [value for r in good for w, _, value in target_verdicts(r)
                  if w == what and value is not None]
        if not values:
            if any(w == what for r in results for w, _, _ in target_verdicts(r)):
                targets.append({"target": what, "verdict": "not measured"})
            continue
        spread = _spread(values)
        met = sum(_holds(v, op, bound) for v in values)
        targets.append({"target": what, "runs_met": met, **spread,
                        "verdict": "met" if _holds(spread["median"], op, bound) else "NOT met"})
    return {"scenario": results[0].get("scenario"), "mode": results[0].get("mode", ""),
            "runs": len(results), "failed_runs": len(results) - len(good),
            "machine": results[0].get("machine"), "figures": figures, "targets": targets}


def render_summary(s: dict[str, Any]) -> str:
    lines = [f"oms bench — scenario {s['scenario']} ({s['mode']}): {s['runs']} runs, "
             f"min / median / max", ""]
    for what, f in s["figures"].items():
        fmt = "{:,.2f}" if f["max"] < 10 else "{:,.0f}"
        lines.append(f"  {what:<34} {fmt.format(f['min'])} / {fmt.format(f['median'])} / "
                     f"{fmt.format(f['max'])}" + (f"  ({len(f['runs'])} runs)"
                                                   if len(f["runs"]) != s["runs"] else ""))
    if s["failed_runs"]:
        lines += ["", f"FAILED:       {s['failed_runs']} of {s['runs']} runs, left out of every "
                      "figure and verdict (see their reports)"]
    if s["targets"]:
        lines += ["", "targets (by the median):"]
        for t in s["targets"]:
            figure = "" if "median" not in t else (
                f" (median {_figure(t['target'], t['median'])}; "
                f"met in {t['runs_met']} of {len(t['runs'])} runs)")
            lines.append(f"  {t['verdict']:<13} {t['target']}{figure}")
    return "\n".join(lines)


def write_summary(results: list[dict[str, Any]], out: Path) -> str:
    """The summary of ``oms bench --repeat N``, as text and JSON."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_runs(results)
    base = out / f"{summary['scenario']}-{time.strftime('%Y%m%d-%H%M%S')}-summary"
    text = render_summary(summary)
    base.with_suffix(".txt").write_text(text + "\n")
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    return text + f"\n\nsummary: {base}.txt, {base}.json"


def _plot(result: dict[str, Any], path: Path) -> Path | None:
    timeline = result.get("timeline") or []
    if not timeline:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    ts = [t for t, _ in timeline]
    lat = [v * 1000 for _, v in timeline]
    left.plot(ts, lat, ".", markersize=2, alpha=0.5)
    left.set_xlabel("seconds into the run")
    left.set_ylabel("completion latency (ms)")
    left.set_title("latency over time")
    ordered = sorted(lat)
    n = len(ordered)
    qs = [i / n for i in range(n)]
    right.plot([1 / (1 - q) for q in qs], ordered)
    right.set_xscale("log")
    right.set_xticks([1, 2, 10, 100, 1000, 10000])
    right.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    right.set_ylabel("completion latency (ms)")
    right.set_title("latency by percentile")
    fig.suptitle(f"oms bench {result['scenario']}: {result.get('orders_per_s', 0):,.0f} "
                 f"orders/s ({result.get('mode', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
