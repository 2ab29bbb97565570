"""A domain gateway: one long-lived actor per domain system (contract §3).

It owns the DEALER socket connected to the system's ROUTER, sends
``command`` maps, matches ``result`` replies to the waiting order by
``command_id``, and turns a missing reply within the step's timeout into a
retryable ``timeout`` failure. Retries and backoff are the order's business
(they are persisted with it); the gateway only carries commands. A reply for
a command no longer awaited (late after a timeout, or a duplicate) is
counted and ignored. Every reply is checked at the edge (``oms.edge``)
before anything in it reaches an order: one that breaks the contract fails
its command with the retryable ``invalid_reply``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import msgspec
import zmq

from actors.loop import LoopActor, bursts
from actors.metrics import Metrics, observe_all
from actors.ports import Deliver
from actors.sockets import NOBLOCK, open_socket, recv_frame, send_frame
from gateways.breaker import CLOSED, OPEN, Breaker
from gateways.deadlines import Deadlines
from gateways.gateway_log import GatewayLog
from oms import codec, edge
from oms.codec import encode_into
from oms.edge import FIT_FRAME_BYTES, MAX_REPLY_BYTES, decode_success
from oms.errors import CIRCUIT_OPEN, INVALID_REPLY, TIMEOUT, UNAVAILABLE, DomainError
from oms.messages import CommandResult, Send

logger = logging.getLogger(__name__)


class SendCommand(NamedTuple):
    order_id: str
    command: Send


_new = tuple.__new__  # _new(SendCommand, (...)): without __new__'s Python frame


class GatewayGauges(NamedTuple):
    """What the metrics thread reads of a gateway (``Gateway.gauges``)."""

    pending: int  # commands awaiting a reply
    breaker: str  # the breaker's state (gateways.breaker: closed, half_open, open)


class _Pending(NamedTuple):
    order_id: str
    deadline: float
    sent: float
    op: str


class _Command(msgspec.Struct, tag_field="type", tag="command", gc=False):
    command_id: str  # a command (contract §3): the same bytes as its map, at less cost
    order_id: str
    op: str
    args: Any


class Gateway(LoopActor):
    direct = SendCommand  # 5 an order, without pykka's envelope handling (LoopActor.on_batch)
    __slots__ = ("_budget", "_deadlines", "_latencies", "_latency", "_out", "_requests",
                 "_results", "_sent", "_turn", "_unsettled", "breaker", "ctx", "curve",
                 "deliver", "endpoint", "gauges", "hwm", "log", "metrics", "pending", "sock",
                 "system")

    def __init__(self, ctx: zmq.Context, system: str, endpoint: str, deliver: Deliver,
                 metrics: Metrics, hwm: int = 100_000, breaker: Breaker | None = None,
                 curve: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.curve = curve or {}
        self.breaker = breaker or Breaker()
        self.thread_name = f"gw-{system}"
        self.ctx, self.system, self.endpoint = ctx, system, endpoint
        self.deliver, self.metrics, self.hwm = deliver, metrics, hwm
        self.pending: dict[str, _Pending] = {}
        for counter in (metrics.gateway_requests, metrics.gateway_timeouts,
                        metrics.gateway_retries, metrics.gateway_late,
                        metrics.gateway_send_failures):
            counter.labels(system)  # known label sets start at 0, visible to alerts
        self._deadlines = Deadlines(self.pending)  # when each command sent times out
        self._turn, self._budget = -1, 0  # the loop turn of the last expiry, what it has left
        # command ids sent and not yet settled (no reply, or a retryable error): a
        # later send of one is a retry or resend (oms_gateway_retries_total)
        self._unsettled: OrderedDict[str, None] = OrderedDict()
        self.log = GatewayLog(logger, system)  # bounded per kind and op, counts kept
        self.sock: zmq.Socket | None = None
        self._out = bytearray(256)  # each command encoded here, then sent (a copying send)
        # replaced (never changed) on the loop after every slice, read and tick
        # (``on_tick``): the one field other threads read (the metrics collector)
        self.gauges = GatewayGauges(0, self.breaker.state)
        self._requests = metrics.gateway_requests.labels(system)
        self._sent = 0  # commands sent since the last tick: counted there, in one inc
        self._latency: dict[tuple[str, str], Any] = {}  # (op, outcome) -> its child
        self._latencies: dict[tuple[str, str], list[float]] = {}  # of this read's replies
        self._results: list[tuple[str, CommandResult]] = []  # ... delivered after it

    def on_start(self) -> None:
        # LINGER 0: commands are idempotent and re-sent after a restart
        # MAXMSGSIZE: a reply beyond it drops the connection (ZeroMQ); up to it, a
        # reply over edge.MAX_REPLY_BYTES is an invalid_reply for its command
        self.sock = open_socket(self.ctx, zmq.DEALER, connect=self.endpoint, SNDHWM=self.hwm,
                                RCVHWM=self.hwm, LINGER=0,
                                MAXMSGSIZE=4 * edge.MAX_REPLY_BYTES, **self.curve)

    def on_stop(self) -> None:
        self.log.flush(ending=True)  # the counts of lines held back: not lost
        if self._sent:
            self._requests.inc(self._sent)
            self._sent = 0
        if self.sock is not None:
            self.sock.close()

    def sockets(self) -> list[zmq.Socket]:
        return [self.sock] if self.sock is not None else []

    def send(self, order_id: str, command: Send) -> None:
        """Thread-safe: carry a command to the domain system. In the store writer's
        burst, sent at once while it holds the gateway (``in_place``); else told."""
        if (getattr(bursts, "pending", None) is self.held_by and not self.mail) or self.in_place():
            try:
                self._send(order_id, command)
            except Exception:  # noqa: BLE001 - the failure rule, as a told message
                self._loop.survived(self.component, sys.exc_info())
            return
        self.tell(_new(SendCommand, (order_id, command)))  # SendCommand(order_id, command)

    def on_receive(self, message: Any) -> None:
        if isinstance(message, SendCommand):
            self.on_direct(message)

    def on_direct(self, message: SendCommand) -> None:
        """A told ``SendCommand`` (``LoopActor.on_batch`` calls this for each)."""
        self._send(message.order_id, message.command)

    def _send(self, order_id: str, cmd: Send) -> None:
        """Send one command (6 an order), on this gateway's loop."""
        sock = self.sock
        if sock is None:
            return
        now = time.monotonic()
        breaker = self.breaker
        _, command_id, op, args, timeout_s, raw = cmd
        if breaker.state != CLOSED and not breaker.allow(now):  # (closed: allowed)
            error = DomainError(CIRCUIT_OPEN, f"{self.system} circuit breaker is open", True)
            data = {"retry_after": breaker.retry_after(now)}
            self.deliver(order_id, CommandResult(command_id, False, data, error))
            return
        try:  # the step's kept bytes (``Send.raw``), if the engine passed them: a copy
            encode_into(_Command(command_id, order_id, op, raw or args), out := self._out)
        except Exception:  # noqa: BLE001 - pack_into decides: the same bytes, or msgpack's error
            codec.pack_into({"type": "command", "command_id": command_id, "order_id": order_id,
                             "op": op, "args": args}, out)
        try:
            send_frame(sock, out, NOBLOCK)
        except zmq.Again:
            self.metrics.gateway_send_failures.labels(self.system).inc()
            self._outcome(False, now)
            error = DomainError(UNAVAILABLE, f"{self.system} send queue is full", True)
            self.deliver(order_id, CommandResult(command_id, False, None, error))
            return
        self._sent += 1
        unsettled, pending = self._unsettled, self.pending
        if command_id in unsettled:  # a retry or resend: to the newest end
            self.metrics.gateway_retries.labels(self.system).inc()
            unsettled.move_to_end(command_id)
        else:
            if command_id in pending:  # (its id forgotten by now: still a retry)
                self.metrics.gateway_retries.labels(self.system).inc()
            unsettled[command_id] = None  # a new key goes to the newest end
            if len(unsettled) > UNSETTLED_KEPT:
                unsettled.popitem(last=False)
        deadline = now + timeout_s
        pending[command_id] = _new(_Pending, (order_id, deadline, now, op))
        self._deadlines.add(timeout_s, deadline, command_id)

    def on_readable(self, sock: zmq.Socket) -> None:
        """Read up to ``read_budget`` replies; then observe their latencies
        and hand each result to its order, in the order read (``_settle``)."""
        try:
            for _ in range(self.read_budget):
                try:
                    frame = recv_frame(sock, NOBLOCK)
                except zmq.Again:
                    return
                self._on_reply(frame)
        finally:
            self._settle()

    def _on_reply(self, frame: bytes) -> None:
        """Check a reply at the edge (``oms.edge``), then hand it to its order.

        A plain success (most replies) is read and checked in one step, in C
        (``edge.decode_success``); any other reply is decoded and checked in
        full (``_checked``). A reply that breaks the contract never becomes
        state (``_invalid``).
        """
        fast = None
        if len(frame) <= MAX_REPLY_BYTES:  # (a larger one is refused in full: _checked)
            try:
                fast = decode_success(frame)
            except Exception:  # noqa: BLE001 - not a plain success: the full checks decide
                fast = None
        if fast is not None and fast.ok is True:
            command_id, data, error = fast.command_id, fast.data, None
        else:
            parsed = self._checked(frame)
            if parsed is None:
                return
            command_id, data, error = parsed.command_id, parsed.data, parsed.error
        waiting = self.pending.pop(command_id, None)
        if waiting is None:
            self.metrics.gateway_late.labels(self.system).inc()
            logger.debug("late or duplicate reply ignored", extra={
                "command_id": command_id, "system": self.system})
            return
        now = time.monotonic()
        if error is None:  # (a success: the common case, settled inline)
            self._unsettled.pop(command_id, None)  # answered for good: no retry follows
            breaker = self.breaker
            if breaker.failures or breaker.state != CLOSED:  # (else no change: skipped)
                self._outcome(True, now)
            key = (waiting.op, "ok")  # as _finish
            latencies = self._latencies.get(key)
            if latencies is None:
                latencies = self._latencies[key] = []
            latencies.append(now - waiting.sent)
            fit = len(frame) <= FIT_FRAME_BYTES  # edge.fit_to_keep, without its frame
            self._results.append((waiting.order_id, _new(CommandResult, (
                command_id, True, data, None, fit))))
            return
        if not error.retryable:
            self._unsettled.pop(command_id, None)  # answered for good: no retry follows
        self._outcome(not error.retryable, now)
        outcome = _bounded(error.code)  # logged (bounded: gateways.gateway_log), then settled
        self.log.refused(waiting.op, outcome, error, waiting.order_id, command_id)
        self._finish(waiting, outcome, CommandResult(command_id, False, data, error), now)

    def _checked(self, frame: bytes) -> edge.Reply | None:
        """A reply that is not a plain success, decoded and checked in full
        (``oms.edge.parse_reply``): the ``Reply``, or None if it breaks the
        contract. Such a reply (undecodable, too large, wrong types, a number
        out of range) is logged, counted in
        ``oms_gateway_invalid_replies_total``, and the waiting command gets a
        retryable ``invalid_reply`` error. Without a usable ``command_id`` no
        command can be named; it then ends as a timeout."""
        msg: dict[str, Any] = {}
        try:  # bounded by the frame, itself at most MAXMSGSIZE
            msg = codec.decode_map(frame)
            parsed: edge.Reply | edge.Violation = edge.parse_reply(msg)
        except codec.DecodeError as exc:
            parsed = edge.Violation("undecodable", str(exc))
        if len(frame) > MAX_REPLY_BYTES:
            parsed = edge.Violation(
                "too_large", f"reply of {len(frame)} bytes; at most {MAX_REPLY_BYTES}")
        if isinstance(parsed, edge.Violation):
            self._invalid(parsed, edge.reply_command_id(msg) if msg else None)
            return None
        return parsed

    def _invalid(self, violation: edge.Violation, command_id: str | None) -> None:
        """A reply that breaks the contract: logged, counted, a retryable error."""
        self.metrics.gateway_invalid_replies.labels(self.system, violation.reason).inc()
        waiting = self.pending.pop(command_id, None) if command_id else None
        self.log.broke_contract(violation.reason, violation.message,
                                waiting.order_id if waiting else None, command_id)
        if waiting is None:
            return
        now = time.monotonic()
        self._outcome(False, now)
        error = DomainError(INVALID_REPLY, f"{self.system} broke the contract: "
                            f"{violation.message}", True)
        self._finish(waiting, INVALID_REPLY,
                     CommandResult(command_id or "", False, None, error), now)

    def _finish(self, waiting: _Pending, outcome: str, result: CommandResult,
                now: float) -> None:
        """A reply matched: its latency and result wait for ``_settle``."""
        key = (waiting.op, outcome)
        latencies = self._latencies.get(key)
        if latencies is None:
            latencies = self._latencies[key] = []
        latencies.append(now - waiting.sent)
        self._results.append((waiting.order_id, result))

    def _settle(self) -> None:
        """After a read: the replies' step latencies into ``oms_step_seconds``,
        each label set's at once (``observe_all``), then each result to its
        order. A delivery that fails is survived (logged, counted), the
        others still go."""
        observed, self._latencies = self._latencies, {}
        for key, values in observed.items():
            child = self._latency.get(key)
            if child is None:
                child = self._latency[key] = self.metrics.step_latency.labels(self.system, *key)
            observe_all(child, values)
        results, self._results = self._results, []
        for order_id, result in results:
            try:
                self.deliver(order_id, result)
            except Exception:  # noqa: BLE001 - the failure rule, as a failing read
                self._loop.survived(self.component, sys.exc_info())

    def _outcome(self, ok: bool, now: float) -> None:
        changed = self.breaker.record(ok, now)
        if changed is not None:
            log = logger.warning if changed == OPEN else logger.info
            log("circuit breaker of %s is now %s", self.system, changed,
                extra={"system": self.system})

    def poll_timeout(self) -> float | None:
        """Milliseconds until the earliest deadline; 0 while due ones wait (past a
        turn's budget), or past ``EXPIRE_PER_TURN`` stale ones: the next turn goes on.
        Or sooner, the log's next summary (``LogThrottle.due``), if one is held."""
        earliest = self._deadlines.earliest(EXPIRE_PER_TURN)
        due = self.log.due
        if due is not None and (earliest is None or due < earliest):
            earliest = due
        return None if earliest is None else max(0.0, (earliest - time.monotonic()) * 1000)

    def on_tick(self) -> None:
        """Time out overdue commands; runs after each slice and read too
        (``LoopActor._activity``), so the gauges and the requests count are
        brought up to date here, and the log's summaries of ended windows leave."""
        if self._sent:
            self._requests.inc(self._sent)
            self._sent = 0
        try:
            self._expire(time.monotonic(), self._loop.turns)
        finally:
            self.gauges = GatewayGauges(len(self.pending), self.breaker.state)
            if self.log.due is not None:
                self.log.flush()

    def _expire(self, now: float, turn: int) -> None:
        """Time out the commands due by ``now``, earliest first, at most
        ``EXPIRE_PER_TURN`` deadlines (answered ones too) in loop turn
        ``turn``: each delivery runs its order's engine, so a system that
        stopped answering tens of thousands of commands has them time out
        over several turns, never in one. The rest go on in the next turn
        (``poll_timeout`` is 0 then). A delivery that fails (survived by the
        loop) loses only its own timeout: the others are still queued."""
        if turn != self._turn:
            self._turn, self._budget = turn, EXPIRE_PER_TURN
        pop_due = self._deadlines.pop_due
        while self._budget > 0 and (due := pop_due(now)) is not None:
            self._budget -= 1
            self._time_out(*due, now)

    def _time_out(self, deadline: float, command_id: str, now: float) -> None:
        """A command's deadline came: a retryable ``timeout``, unless it was
        answered or re-sent since."""
        waiting = self.pending.get(command_id)
        if waiting is None or waiting.deadline != deadline:
            return
        del self.pending[command_id]
        self.metrics.gateway_timeouts.labels(self.system).inc()
        self._outcome(False, now)
        self.log.timed_out(waiting.op, waiting.order_id, command_id)
        self.metrics.step_latency.labels(self.system, waiting.op, TIMEOUT).observe(
            now - waiting.sent)
        error = DomainError(TIMEOUT, f"no reply from {self.system} within the step timeout",
                            True)
        self.deliver(waiting.order_id, CommandResult(command_id, False, None, error))


# deadlines a gateway takes a loop turn at most: as many as its reader takes replies
# (``read_budget``). Measured when each timeout logged a warning (some 60 us of CPU here,
# most of it the warning, its order's engine not counted): 256 were some 15 ms (512 were
# 36 ms, 20,000 at once 1.2 s). Now at most ``gateway_log.BURST`` a second per op are
# logged, the rest only counted (``GatewayLog``): a turn costs less (not measured again)
EXPIRE_PER_TURN = 256
UNSETTLED_KEPT = 100_000  # command ids remembered for counting retries (bounded memory)

_KNOWN_OUTCOMES = {"ok", "timeout", "unavailable", "circuit_open", "out_of_stock",
                   "payment_declined", "invalid_address", "unknown_service", "invalid_reply"}


def _bounded(code: str) -> str:
    """Keep the outcome label set bounded whatever codes a system invents."""
    return code if code in _KNOWN_OUTCOMES else "other"
