"""The load generator: one DEALER to the intake, one SUB to the events.

Closed loop keeps ``window`` orders in flight (submitted, not yet finished)
for maximum throughput. Open loop submits on a fixed schedule at ``rate``
and measures each latency from the order's *intended* send time, so a stall
in the service is charged to every order it delayed (no coordinated
omission). Completion is seen on the ``order_summary`` event; the SUB socket
has no high-water mark, so the generator does not drop events itself.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from oms import codec
from oms.states import TERMINAL

ASK = "?"  # request_id prefix of the generator's own get_order requests


@dataclass
class Run:
    """What one load run saw. Times are ``time.monotonic()`` seconds."""

    started: float = 0.0
    ended: float = 0.0
    measured_from: float = 0.0  # end of warm-up
    submitted: int = 0
    accepted: int = 0
    finished: int = 0
    accept_lat: list[float] = field(default_factory=list)
    complete_lat: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (t, completion lat)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    measured_finished: int = 0
    measured_accepted: int = 0
    reconciled: int = 0  # finished orders whose summary event was missed (get_order)
    unfinished: dict[str, str] = field(default_factory=dict)  # given up: external_id -> state

    def rate(self, what: str = "finished") -> float:
        span = self.ended - self.measured_from
        count = self.measured_finished if what == "finished" else self.measured_accepted
        return count / span if span > 0 else 0.0


class Progress:
    def __init__(self, total: int, label: str, quiet: bool) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.shown = 0.0
        self.started = time.monotonic()

    def show(self, done: int, force: bool = False) -> None:
        """A bar redrawn in place on a terminal; elsewhere (a log file, CI) one
        plain line every 10 s and at the end, never carriage returns."""
        now = time.monotonic()
        tty = _is_tty(sys.stderr)
        every = 0.25 if tty else 10.0
        if self.quiet or (now - self.shown < every and not force):
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-9)
        if not tty:
            sys.stderr.write(f"  {self.label:<8} {done}/{self.total}  {rate:8.0f}/s\n")
            sys.stderr.flush()
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r  {self.label:<8} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{self.total}  {rate:8.0f}/s")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet and _is_tty(sys.stderr):
            sys.stderr.write("\n")


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LoadGen:
    def __init__(self, intake: str, events: str, source: str,
                 curve: dict[str, Any] | None = None) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, 0)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, source.encode())
        for sock in (self.dealer, self.sub):
            for name, value in (curve or {}).items():
                sock.setsockopt(getattr(zmq, name), value)
        monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.dealer.connect(intake)
        self.sub.connect(events)
        # A PUB drops what it sends before a subscription reaches it: wait for
        # the handshake (the subscription is the first thing sent after it)
        if not monitor.poll(5000):
            print(f"warning: no handshake with the events endpoint {events} in 5 s; "
                  "missed results will be read with get_order", file=sys.stderr)
        self.sub.disable_monitor()
        monitor.close(0)
        self.states: dict[str, str] = {}  # order_id -> state, from get_order
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def close(self) -> None:
        self.dealer.close()
        self.sub.close()

    def run(self, orders: Iterator[dict[str, Any]], total: int, *, window: int = 1024,
            rate: float | None = None, warmup: int = 0, complete: bool = True,
            quiet: bool = False,
            until_step: str | None = None, label: str = "orders",
            stall_s: float = 5.0, give_up_s: float = 60.0,
            check: Callable[[], None] | None = None) -> Run:
        """Submit ``total`` orders; wait for completion unless ``complete`` is
        False (intake only). ``until_step``: count an order finished when that
        step starts running (the waiting scenario).

        A run has no time limit but never hangs: after ``stall_s`` seconds
        without a finished order it asks ``get_order`` about the orders in
        flight, as a channel that must not miss a result does (the events
        socket drops for slow subscribers, and a subscription takes a moment
        to reach the service); after ``give_up_s`` it stops and lists what
        never finished in ``Run.unfinished``. ``check`` is called about once a second and may
        raise (the bench's check that its processes are still running).
        """
        run = Run()
        sent_at: dict[str, float] = {}  # external_id -> (intended) send time
        ext_of: dict[str, str] = {}  # order_id -> external_id
        early: dict[str, tuple[float, str]] = {}  # summaries before their accept
        in_flight = 0
        progress = Progress(total, label, quiet)
        run.started = run.measured_from = time.monotonic()
        target = total
        last_progress = checked = asked = run.started

        def finish(ext: str, now: float, outcome: str) -> None:
            nonlocal in_flight
            in_flight -= 1
            run.finished += 1
            latency = now - sent_at.pop(ext)
            run.outcomes[outcome] += 1
            if run.finished > warmup:
                run.complete_lat.append(latency)
                run.timeline.append((now - run.started, latency))
                run.measured_finished += 1
            if run.finished == warmup:
                run.measured_from = now

        while run.finished < target:
            now = time.monotonic()
            while run.submitted < total and (
                    (rate is None and in_flight < window)
                    or (rate is not None and run.started + run.submitted / rate <= now)):
                order = next(orders)
                ext = order["external_id"]
                sent_at[ext] = now if rate is None else run.started + run.submitted / rate
                self.dealer.send(codec.pack({"type": "submit_order", "order": order,
                                             "request_id": ext}))
                run.submitted += 1
                in_flight += 1
            wait = 100.0
            if rate is not None and run.submitted < total:
                # at least 1 ms: zmq rounds a shorter timeout down to 0 and the
                # generator would spin, taking a core from the service it measures
                # (latency is from the intended send time, so this costs no accuracy)
                wait = max(1.0, (run.started + run.submitted / rate - now) * 1000)
            finished_before = run.finished
            ready = dict(self.poller.poll(int(min(wait, 1000.0))))  # pyzmq truncates anyway
            now = time.monotonic()
            if self.dealer in ready:
                self._replies(run, sent_at, ext_of, early, now, complete, finish, warmup)
            if self.sub in ready:
                self._events(run, sent_at, ext_of, early, now, finish, until_step)
            in_flight = run.submitted - run.finished
            progress.show(run.finished)
            if run.finished != finished_before or not in_flight:
                last_progress = now
            if check is not None and now - checked >= 1.0:
                checked = now
                check()
            if until_step is None and complete and now - max(last_progress, asked) >= stall_s:
                asked = now
                self._ask(sent_at, ext_of)
            if now - last_progress >= give_up_s:
                break
        run.unfinished = dict.fromkeys(sent_at, "not accepted")
        for order_id, ext in ext_of.items():
            if ext in run.unfinished:
                run.unfinished[ext] = self.states.get(order_id, "no summary event")
        run.ended = time.monotonic()
        progress.show(run.finished, force=True)
        progress.close()
        return run

    def _replies(self, run: Run, sent_at: dict, ext_of: dict, early: dict, now: float,
                 complete: bool, finish: Any, warmup: int) -> None:
        while True:
            try:
                reply = codec.decode_map(self.dealer.recv(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            ext = str(reply.get("request_id"))
            if ext.startswith(ASK):
                self._answer(run, ext[len(ASK):], reply, sent_at, now, finish)
                continue
            if ext not in sent_at:
                continue
            if reply.get("type") != "accepted":
                run.errors[str(reply.get("code") or reply.get("type"))] += 1
                finish(ext, now, "not accepted")
                continue
            run.accepted += 1
            if run.accepted > warmup:
                run.accept_lat.append(now - sent_at[ext])
                run.measured_accepted += 1
            if not complete:
                finish(ext, now, "accepted")
                continue
            ext_of[reply["order_id"]] = ext
            if reply["order_id"] in early:
                t, outcome = early.pop(reply["order_id"])
                finish(ext, t, outcome)

    def _ask(self, sent_at: dict, ext_of: dict) -> None:
        """``get_order`` for every accepted order still in flight."""
        for order_id, ext in ext_of.items():
            if ext in sent_at:
                self.dealer.send(codec.pack({"type": "get_order", "order_id": order_id,
                                             "request_id": ASK + ext}))

    def _answer(self, run: Run, ext: str, reply: dict, sent_at: dict, now: float,
                finish: Any) -> None:
        view = reply.get("order") if reply.get("type") == "order" else None
        if not isinstance(view, dict) or ext not in sent_at:
            return
        state = str(view.get("state"))
        self.states[str(view.get("order_id"))] = state
        if state in TERMINAL:
            run.reconciled += 1
            finish(ext, now, state)

    def _events(self, run: Run, sent_at: dict, ext_of: dict, early: dict, now: float,
                finish: Any, until_step: str | None) -> None:
        while True:
            try:
                _topic, raw = self.sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if until_step is None and b"order_summary" not in raw:
                continue  # most events are progress: skip decoding them
            ev = codec.decode_map(raw)
            if until_step is not None:
                done = (ev.get("type") == "order_progress" and ev.get("step") == until_step
                        and ev.get("status") == "running")
                outcome = "waiting"
            else:
                done = ev.get("type") == "order_summary"
                outcome = ev.get("summary", {}).get("state", "?") if done else ""
            if not done:
                continue
            ext = ext_of.pop(ev["order_id"], None)
            if ext is None:
                early[ev["order_id"]] = (now, outcome)
            elif ext in sent_at:
                finish(ext, now, outcome)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "p99.9", "max"), 0.0)
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999),
            "max": ordered[-1]}
