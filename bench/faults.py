"""The fault soak (``oms bench --scenario soak --faults``): load at a fixed
rate while the run breaks things, then a check that nothing was lost, left
unfinished or applied twice.

Faults, on a schedule from the start of the run (``bench.chaos``):

- every ``--kill-every`` seconds the service is killed with SIGKILL and
  started again on the same data folder (restart-to-ready is timed);
- every ``--outage-every`` seconds one domain-system fault, in turn:
  the provisioning simulator is frozen (SIGSTOP: no replies, sockets open)
  for ``--outage-s``; the CRM simulator is killed and started again after
  ``--outage-s``; billing answers half its commands ``unavailable`` for
  ``--outage-s`` (the simulators' runtime ``control`` message);
- all run long, 2 % of the replies of the main commands are dropped (the
  command is applied, its reply is not sent: the service must resend under
  the same ``command_id``).

The simulators run as three processes (warehouse + billing + shipping,
provisioning, crm) so one system can be down while the others answer.

The load generator behaves as a channel must: an order with no reply after
``RESUBMIT_S`` is resubmitted with the same ``external_id`` (the service
answers ``duplicate`` if it had stored it), and an acknowledged order whose
result event was missed (events are lost while the service is down) is read
with ``get_order``. When the run's ``--duration`` is over the faults stop, and
the run waits for every acknowledged order to end terminal (bounded by
``--give-up`` seconds without progress). Then it asks each simulator which
operations it applied twice for the same order and arguments.

The CRM simulator forgets what it applied when it is restarted (a real
system would not): its "applied twice" covers the time since its last
restart. Warehouse, billing, shipping and provisioning are never restarted,
so theirs covers the whole run.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from bench.chaos import GROUPS, Chaos, FaultHarness, sim_report
from bench.cli import summarize
from bench.harness import ProcessDied
from bench.load import ASK, LoadGen, Progress, Run
from gateways.client import Client
from oms import codec
from oms.states import TERMINAL

RESUBMIT_S = 3.0  # no reply to a submit for this long: resubmit it (same external_id)
RECONCILE_S = 5.0  # acknowledged, no result event for this long: ask get_order
RETRYABLE = {"busy", "internal"}  # error replies a channel retries


@dataclass
class Pending:
    order: dict[str, Any]
    intended: float
    last_sent: float


@dataclass
class Open:
    ext: str
    intended: float
    acked: float
    asked: float = 0.0


@dataclass
class Ledger:
    """What the fault soak's load generator knows about every order."""

    pending: dict[str, Pending] = field(default_factory=dict)  # ext -> not acknowledged
    open: dict[str, Open] = field(default_factory=dict)  # order_id -> acked, not terminal
    final: dict[str, str] = field(default_factory=dict)  # order_id -> terminal state
    early: dict[str, str] = field(default_factory=dict)  # order_id -> state before its ack
    acked: dict[str, str] = field(default_factory=dict)  # ext -> order_id
    order_type: dict[str, str] = field(default_factory=dict)  # order_id -> type
    customer: dict[str, str] = field(default_factory=dict)  # telecom order_id -> customer
    states: dict[str, str] = field(default_factory=dict)  # order_id -> last get_order state
    resubmits: int = 0
    duplicates: int = 0
    asked: int = 0


class FaultLoad(LoadGen):
    """Open-loop load that survives a service restart, as a channel would."""

    def soak(self, orders: Iterator[dict[str, Any]], rate: float, duration: float, *,
             give_up_s: float, check: Callable[[], None], quiet: bool,
             faults_over: Callable[[], None]) -> tuple[Run, Ledger]:
        run, led = Run(), Ledger()
        progress = Progress(int(rate * duration), "soak", quiet)
        run.started = run.measured_from = last_progress = time.monotonic()
        scanned = checked = run.started
        submitting = True
        while submitting or led.pending or led.open:
            now = time.monotonic()
            if submitting and now - run.started >= duration:
                submitting = False
                faults_over()
                last_progress = time.monotonic()
            while submitting and run.started + run.submitted / rate <= now:
                order = next(orders)
                intended = run.started + run.submitted / rate
                led.pending[order["external_id"]] = Pending(order, intended, now)
                self._submit(order)
                run.submitted += 1
            if now - scanned >= 0.5:
                scanned = now
                self._resend(led, now)
            ready = dict(self.poller.poll(10 if submitting else 100))
            now = time.monotonic()
            before = len(led.final) + len(led.acked)
            if self.dealer in ready:
                self._soak_replies(run, led, now)
            if self.sub in ready:
                self._soak_summaries(run, led, now)
            if len(led.final) + len(led.acked) != before:
                last_progress = now
            progress.show(len(led.final))
            if now - checked >= 1.0:
                checked = now
                check()
            if not submitting and now - last_progress >= give_up_s:
                break
        run.ended = time.monotonic()
        progress.show(len(led.final), force=True)
        progress.close()
        run.unfinished = dict.fromkeys(led.pending, "not acknowledged")
        for oid, o in led.open.items():
            run.unfinished[o.ext] = f"{led.order_type.get(oid, '?')} " \
                                    f"{led.states.get(oid, 'no answer')}"
        return run, led

    def _submit(self, order: dict[str, Any]) -> None:
        self.dealer.send(codec.pack({"type": "submit_order", "order": order,
                                     "request_id": order["external_id"]}))

    def _resend(self, led: Ledger, now: float) -> None:
        """Resubmit unanswered orders; ask about acknowledged ones whose result
        did not arrive (a bounded number per pass: a long outage leaves many)."""
        for p in led.pending.values():
            if now - p.last_sent >= RESUBMIT_S:
                p.last_sent = now
                led.resubmits += 1
                self._submit(p.order)
        budget = 2000
        for oid, o in led.open.items():
            if budget and now - max(o.acked, o.asked) >= RECONCILE_S:
                o.asked, budget = now, budget - 1
                led.asked += 1
                self.dealer.send(codec.pack({"type": "get_order", "order_id": oid,
                                             "request_id": ASK + oid}))

    def _soak_replies(self, run: Run, led: Ledger, now: float) -> None:
        while True:
            try:
                reply = codec.decode_map(self.dealer.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            rid = str(reply.get("request_id"))
            if rid.startswith(ASK):
                view = reply.get("order") if reply.get("type") == "order" else None
                if isinstance(view, dict):
                    led.states[rid[len(ASK):]] = str(view.get("state"))
                    if view.get("state") in TERMINAL:
                        run.reconciled += rid[len(ASK):] in led.open
                        self._done(run, led, rid[len(ASK):], str(view["state"]), now)
                continue
            p = led.pending.get(rid)
            if p is None:
                if reply.get("duplicate"):
                    led.duplicates += 1  # the answer to a resubmission, after the first
                continue
            if reply.get("type") == "accepted":
                del led.pending[rid]
                oid = str(reply["order_id"])
                run.accepted += 1
                run.accept_lat.append(now - p.intended)
                led.duplicates += bool(reply.get("duplicate"))
                led.acked[rid] = oid
                led.order_type[oid] = str(p.order.get("order_type"))
                if led.order_type[oid] == "telecom":
                    led.customer[oid] = str(p.order["customer"]["id"])
                led.open[oid] = Open(rid, p.intended, now)
                if oid in led.early:
                    self._done(run, led, oid, led.early.pop(oid), now)
            elif reply.get("code") in RETRYABLE:
                run.errors[str(reply.get("code"))] += 1  # resubmitted by _resend
            else:
                del led.pending[rid]
                run.errors[str(reply.get("code") or reply.get("type"))] += 1
                run.outcomes["not accepted"] += 1

    def _soak_summaries(self, run: Run, led: Ledger, now: float) -> None:
        while True:
            try:
                _topic, raw = self.sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if b"order_summary" not in raw:
                continue
            ev = codec.decode_map(raw)
            if ev.get("type") != "order_summary":
                continue
            oid, state = str(ev.get("order_id")), str(ev.get("summary", {}).get("state"))
            if oid in led.open:
                self._done(run, led, oid, state, now)
            elif oid not in led.final:
                led.early[oid] = state

    def _done(self, run: Run, led: Ledger, oid: str, state: str, now: float) -> None:
        o = led.open.pop(oid, None)
        if o is None:
            return
        led.final[oid] = state
        run.finished += 1
        run.measured_finished += 1
        run.outcomes[state] += 1
        run.complete_lat.append(now - o.intended)
        run.timeline.append((now - run.started, now - o.intended))


def sequencing_overlaps(views: dict[str, dict[str, Any]],
                        customer_of: dict[str, str]) -> list[str]:
    """Per customer, in acceptance (order id) order, each telecom order that
    ran must start (``inProgress`` in its history) no earlier than the one
    before it ended (its terminal state): one at a time, in order. Orders
    cancelled while they waited never ran and are skipped."""
    runs: dict[str, list[tuple[str, float, float]]] = {}
    for oid in sorted(views):
        view = views[oid]
        if view.get("order_type") != "telecom":
            continue
        history = view.get("history") or []
        starts = [h["ts"] for h in history if h["state"] == "inProgress"]
        ends = [h["ts"] for h in history if h["state"] in TERMINAL]
        if starts and ends:
            runs.setdefault(customer_of[oid], []).append((oid, min(starts), max(ends)))
    bad = []
    for customer, seq in runs.items():
        for (prev, _s, end), (nxt, start, _e) in itertools.pairwise(seq):
            if start < end:
                bad.append(f"{customer}: {nxt} started {end - start:.3f} s before {prev} "
                           "ended")
    return bad


def check_sequencing(intake: str, led: Ledger) -> dict[str, Any]:
    """Read every finished telecom order's history; no two orders of one
    customer may have run at the same time."""
    ids = [oid for oid in led.customer if oid in led.final]
    with Client(intake, timeout=30) as client:
        views = {req["order_id"]: reply.get("order") or {} for req, reply in client.pipeline(
            {"type": "get_order", "order_id": oid} for oid in ids)}
    bad = sequencing_overlaps(views, led.customer)
    return {"telecom_checked": len(views), "customers": len(set(led.customer.values())),
            "sequencing_overlaps": len(bad), "sequencing_examples": bad[:10]}


def stuck_customers(led: Ledger) -> dict[str, str]:
    """Customer -> the oldest of their stuck telecom orders (where to look)."""
    out: dict[str, str] = {}
    for oid in sorted(led.open):
        if oid in led.customer:
            out.setdefault(led.customer[oid], oid)
    return out


def check_effects(harness: FaultHarness, led: Ledger) -> dict[str, Any]:
    """Ask every simulator what it applied twice (same order, op and
    arguments), and count retail orders with a once-only op applied twice."""
    twice: list[dict[str, Any]] = []
    once_ops = ("reserve_stock", "create_invoice", "capture_payment", "create_shipment")
    over_once = []
    for group in GROUPS:
        report = sim_report(harness.eps.systems[GROUPS[group][0]])
        twice += [dict(t, system_group=group) for t in report["applied_twice"]]
        for oid, entry in report.get("per_order", {}).items():
            if led.order_type.get(oid) == "retail" and any(
                    entry["ops"].get(op, 0) > 1 for op in once_ops):
                over_once.append(oid)
    return {"applied_twice": len(twice), "applied_twice_examples": twice[:10],
            "retail_once_ops_over_once": len(over_once),
            "retail_once_ops_examples": over_once[:10]}


def run_fault_soak(harness: FaultHarness, args: Any, orders: Iterator[dict[str, Any]]
                   ) -> dict[str, Any]:
    rate = args.rate or 100.0
    chaos = Chaos(harness, args.kill_every, args.outage_every, args.outage_s)
    gen = FaultLoad(harness.eps.intake, harness.eps.events, "bench")
    cpu0, sim0, own0 = harness.svc_cpu_s(), harness.sim_cpu_s(), time.process_time()

    def check() -> None:
        if chaos.error:
            raise ProcessDied(chaos.error)
        harness.check_alive()

    chaos.start()
    try:
        run, led = gen.soak(orders, rate, args.duration, give_up_s=args.give_up, check=check,
                            quiet=args.quiet, faults_over=chaos.stop)
    finally:
        chaos.stop()
        gen.close()
    if chaos.error:
        raise ProcessDied(chaos.error)
    harness.wait_ready()
    out = summarize(run, "soak")
    out["mode"] = f"open loop at {rate:g}/s for {args.duration:g} s, with faults"
    out["orders"] = run.submitted
    restarts = sorted(chaos.restart_s)
    kinds = Counter(f.kind for f in chaos.faults)
    out["faults"] = {
        "acknowledged": len(led.acked), "not_acknowledged": len(led.pending),
        "terminal": dict(Counter(led.final.values())), "stuck": len(led.open),
        "stuck_by_state": dict(Counter(f"{led.order_type.get(o, '?')} "
                                       f"{led.states.get(o, 'no answer')}" for o in led.open)),
        "stuck_examples": sorted(led.open)[:20],
        "stuck_customers": stuck_customers(led),
        "resubmits": led.resubmits, "duplicates": led.duplicates,
        "get_order_asks": led.asked, "done": dict(kinds), "kills": kinds["kill -9 service"],
        "restart_to_ready_s": {"min": restarts[0], "median": statistics.median(restarts),
                               "max": restarts[-1]} if restarts else {},
        "log": [vars(f) for f in chaos.faults],
        "every": {"kill_s": args.kill_every, "outage_s": args.outage_every,
                  "outage_length_s": args.outage_s},
    }
    out["faults"].update(check_effects(harness, led))
    out["faults"].update(check_sequencing(harness.eps.intake, led))
    assert harness.svc is not None
    out["service"] = {"cpu_s": harness.svc_cpu_s() - cpu0,
                      "peak_rss_mb": harness.svc.peak_rss_mb(), "threads": harness.svc.threads()}
    out["others_cpu_s"] = {"load_generator": time.process_time() - own0,
                           "simulators": harness.sim_cpu_s() - sim0}
    return out
