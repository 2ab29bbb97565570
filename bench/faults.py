"""The fault soak (``oms bench --scenario soak --faults``): load at a fixed
rate while the run breaks things, then a check that nothing was lost, left
unfinished or applied twice.

Faults, on a schedule from the start of the run:

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

import heapq
import itertools
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench.cli import summarize
from bench.harness import Harness, Proc, ProcessDied
from bench.load import ASK, LoadGen, Progress, Run
from oms import codec
from oms.client import Client
from oms.states import TERMINAL

RESUBMIT_S = 3.0  # no reply to a submit for this long: resubmit it (same external_id)
RECONCILE_S = 5.0  # acknowledged, no result event for this long: ask get_order
RETRYABLE = {"busy", "internal"}  # error replies a channel retries
GROUPS = {"main": ("warehouse", "billing", "shipping"), "provisioning": ("provisioning",),
          "crm": ("crm",)}
DROPS = ["--drop", "reserve_stock=0.02", "--drop", "capture_payment=0.02",
         "--drop", "create_shipment=0.02", "--drop", "activate_service=0.02",
         "--drop", "create_invoice=0.01"]
SIM_ARGS = ["--delivery-s", "0.2", "--restock-s", "0.5", "--scarce", "200", *DROPS]


class FaultHarness(Harness):
    """The bench harness with the simulators split in three processes and
    a service that may be down on purpose (killed and not yet restarted)."""

    def __init__(self, workdir: Path, serve_args: list[str]) -> None:
        # info: each order's state changes and each recovery's counts are in
        # the log a failed run keeps (about 1 KB per order)
        super().__init__(workdir, SIM_ARGS, [*serve_args, "--log-level", "info"])
        self.sims: dict[str, Proc] = {}
        self.down: set[int] = set()  # pids killed on purpose
        self.killed_cpu = {"service": 0.0, "simulators": 0.0}  # CPU s of killed processes
        self.lock = threading.Lock()

    def start_simulators(self) -> None:
        for group in GROUPS:
            self.start_group(group)
        self.sim = self.sims["main"]

    def start_group(self, group: str) -> None:
        args = ["simulate", "--service-events", self.eps.domain_events, "--log-level",
                "warning", *self.eps.system_args(), *self.sim_args]
        for name in GROUPS[group]:
            args += ["--only", name]
        self.sims[group] = Proc(args, self.workdir / f"simulate-{group}.log")

    def procs(self) -> list[Proc]:
        with self.lock:
            return [p for p in (*self.sims.values(), self.svc)
                    if p is not None and p.pid not in self.down]

    def kill(self, proc: Proc) -> None:
        """SIGKILL on purpose: ``check_alive`` does not count it as a death."""
        cpu = proc.cpu_s()
        with self.lock:
            self.down.add(proc.pid)
        proc.p.kill()
        self.killed_cpu["service" if proc is self.svc else "simulators"] += cpu
        proc.p.wait()
        proc._out.close()

    def sim_cpu_s(self) -> float:
        """CPU seconds of the simulators, those killed on purpose included."""
        return self.killed_cpu["simulators"] + sum(
            p.cpu_s() for p in self.sims.values() if p.pid not in self.down)

    def svc_cpu_s(self) -> float:
        """CPU seconds of every service process of the run."""
        assert self.svc is not None
        live = self.svc.cpu_s() if self.svc.pid not in self.down else 0.0
        return self.killed_cpu["service"] + live

    def stop(self) -> dict[str, Any]:
        out = {}
        if self.svc is not None and self.svc.pid not in self.down:
            out["service_exit"] = self.svc.stop()
        for group, proc in self.sims.items():
            if proc.pid not in self.down:
                out[f"simulator_{group}_exit"] = proc.stop()
        return out


@dataclass
class Fault:
    """One fault done: what, when (seconds into the run), for how long."""

    kind: str
    at: float
    seconds: float = 0.0


class Chaos(threading.Thread):
    """Carries out the fault schedule until ``stop()``; then leaves every
    process running (a fault in progress is ended at once)."""

    def __init__(self, harness: FaultHarness, kill_every: float, outage_every: float,
                 outage_s: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.h = harness
        self.outage_s = outage_s
        self.stopped = threading.Event()
        self.started = time.monotonic()
        self.faults: list[Fault] = []
        self.restart_s: list[float] = []
        self.error: str | None = None
        self.queue: list[tuple[float, int, str]] = []
        self.seq = 0
        if kill_every > 0:
            self.at(kill_every, "kill_service")
        if outage_every > 0:
            self.at(outage_every, "freeze_provisioning")
        self.every = {"kill_service": kill_every, "freeze_provisioning": outage_every,
                      "restart_crm": outage_every, "billing_unavailable": outage_every}
        self.next_domain = {"freeze_provisioning": "restart_crm",
                            "restart_crm": "billing_unavailable",
                            "billing_unavailable": "freeze_provisioning"}

    def at(self, delay: float, action: str) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (time.monotonic() + delay, self.seq, action))

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def run(self) -> None:
        try:
            while self.queue:
                due, _n, action = self.queue[0]
                if self.stopped.wait(max(0.0, due - time.monotonic())):
                    break
                heapq.heappop(self.queue)
                getattr(self, action)()
            self.end_faults()
        except Exception as exc:  # noqa: BLE001 - the run reports it; never dies silently
            self.error = f"the fault injector failed: {exc!r}"

    def now(self) -> float:
        return time.monotonic() - self.started

    def kill_service(self) -> None:
        assert self.h.svc is not None
        self.h.kill(self.h.svc)
        self.h.start_service()
        t0 = time.monotonic()
        self.h.wait_ready(timeout=300)
        self.restart_s.append(time.monotonic() - t0)
        self.faults.append(Fault("kill -9 service", self.now(), self.restart_s[-1]))
        self.at(self.every["kill_service"], "kill_service")

    def domain_fault(self, action: str) -> None:
        self.faults.append(Fault(action.replace("_", " "), self.now(), self.outage_s))
        self.at(self.outage_s, "end_" + action)
        self.at(self.every[action], self.next_domain[action])

    def freeze_provisioning(self) -> None:
        self.h.sims["provisioning"].p.send_signal(signal.SIGSTOP)
        self.domain_fault("freeze_provisioning")

    def end_freeze_provisioning(self) -> None:
        self.h.sims["provisioning"].p.send_signal(signal.SIGCONT)

    def restart_crm(self) -> None:
        self.h.kill(self.h.sims["crm"])
        self.domain_fault("restart_crm")

    def end_restart_crm(self) -> None:
        if self.h.sims["crm"].pid in self.h.down:
            self.h.start_group("crm")

    def billing_unavailable(self) -> None:
        control(self.h.eps.systems["billing"], {"create_invoice": [0.5, "unavailable"],
                                                "capture_payment": [0.5, "unavailable"]})
        self.domain_fault("billing_unavailable")

    def end_billing_unavailable(self) -> None:
        control(self.h.eps.systems["billing"], {"create_invoice": [0], "capture_payment": [0]})

    def end_faults(self) -> None:
        """The run's faults are over: every system answers again."""
        for _due, _n, action in self.queue:
            if action.startswith("end_"):
                getattr(self, action)()
        self.queue.clear()


def control(endpoint: str, fail: dict[str, list[Any]]) -> None:
    """The simulators' runtime failure control (gateways/simulator.py)."""
    ask_simulator(endpoint, {"type": "control", "fail": fail}, 5.0)


def sim_report(endpoint: str) -> dict[str, Any]:
    return ask_simulator(endpoint, {"type": "report", "all": True, "per_order": True}, 30.0)


def ask_simulator(endpoint: str, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(codec.pack(msg))
        if not sock.poll(timeout_s * 1000):
            raise ProcessDied(f"the simulator at {endpoint} did not answer its {msg['type']} "
                              f"within {timeout_s:g} s")
        return codec.decode_map(sock.recv())
    finally:
        sock.close()


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
