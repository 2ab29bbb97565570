"""Recovery at start: every unfinished order back under management, from
its last persisted snapshot (``Service.recover``; docs/architecture.md,
"Start and stop").

Two passes. The scan (chunked short reads, ``Store.scan_active``) only
counts and collects; then the sequencer's rebuild is queued before any
order is resumed or any jeopardy timer armed (the sequencer handles its
messages in order), so an order that finishes early always finds its queue
and its "turn done" reaches the next order of its customer.

It runs on the main thread while the loop serves, and can take seconds
(tens of thousands of unfinished orders). A stop asked for meanwhile
(SIGTERM: ``stop_requested`` answers True) is honoured between chunks:
``Interrupted`` is raised and the service stops as after any failed start
(every part in reverse order, the orders resumed so far drained); the
intake never opens. Nothing is lost: recovery only reads, and an order it
did not reach is still unfinished in the store for the next start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.domain_events import INVALID, stored_event
from oms.messages import Resume
from oms.model import Order
from oms.outstanding import command_out
from oms.states import TERMINAL
from storage.records import SCAN_CHUNK, CorruptRecord, event_key

if TYPE_CHECKING:
    from app.service import Service

logger = logging.getLogger(__name__)

RESUME_CHUNK = 64  # recovered orders resumed (and stored events replayed) per loop turn
TERMINAL_NAMES = {str(s) for s in TERMINAL}


class Interrupted(Exception):
    """A stop (SIGTERM, SIGINT) came while the service was starting."""


def recover(svc: Service, stop_requested: Callable[[], bool]) -> None:
    """Resume every unfinished order (see the module's docstring)."""
    started = time.monotonic()
    logger.info("recovery: reading the unfinished orders")
    scan = _scan(svc, stop_requested)
    if scan.seq_entries:  # queued before any order below can give a turn back
        svc.sequencer.preload(scan.seq_entries)
    for at, order_id, token in scan.jeopardy:
        svc.timers.schedule(at, order_id, token)
    resumed = 0
    for order in scan.resume:
        svc.router.start(order, Resume(), reason="recovery")
        resumed += 1
        if resumed % RESUME_CHUNK == 0:  # one chunk a loop turn: no turn takes them all
            svc.loop.run_sync(lambda: None)
            _check(stop_requested, f"{resumed} of {len(scan.resume)} orders resumed")
    systems = frozenset(svc.gateways)
    for replayed, (key, ev) in enumerate(svc.store.inbox(), 1):
        if replayed % RESUME_CHUNK == 0:  # each may load its order: a chunk a turn too
            svc.loop.run_sync(lambda: None)
            _check(stop_requested, f"{replayed} stored domain events replayed")
        event = stored_event(ev, systems)  # checked again, as at the edge
        if not isinstance(event, str) and key != event_key(ev["order_id"], event.system,
                                                            event.event_id):
            event = "its key is not its order's, system's and event id's"
        if isinstance(event, str):
            logger.error("recovery does not replay stored domain event %r: %s",
                         key[:200], event)
            svc.metrics.domain_events.labels(INVALID, "refused_at_recovery").inc()
            continue
        svc.router.deliver_event(key, ev["order_id"], event)
    elapsed = time.monotonic() - started
    svc.metrics.recovery_seconds.set(elapsed)
    svc.metrics.recovered_orders.set(resumed + scan.waiting)
    logger.info("recovery: %d orders resumed, %d waiting (passivated), %d unreadable, "
                "in %.3f s", resumed, scan.waiting, scan.corrupt, elapsed)
    _check(stop_requested, "recovery done, before the intake opens")


def _check(stop_requested: Callable[[], bool], where: str) -> None:
    if stop_requested():
        raise Interrupted(f"stop asked for during recovery ({where})")


@dataclass
class _RecoveryScan:
    """What the recovery scan found."""

    resume: list[Order] = field(default_factory=list)
    seq_entries: list[tuple[str, str, bool]] = field(default_factory=list)
    jeopardy: list[tuple[float, str, tuple[Any, ...]]] = field(default_factory=list)
    waiting: int = 0
    corrupt: int = 0


def _scan(svc: Service, stop_requested: Callable[[], bool]) -> _RecoveryScan:
    """Pass one: count every unfinished order and collect what to do with
    it; touches no actor, holds no read transaction between chunks."""
    scan = _RecoveryScan()
    for n, (key, order) in enumerate(svc.store.scan_active(), 1):
        if n % SCAN_CHUNK == 0:
            _check(stop_requested, f"{n} unfinished orders read")
        order_id = key.decode()
        if isinstance(order, CorruptRecord) or order.order_type not in svc.octx.engines:
            why = order if isinstance(order, CorruptRecord) else "unknown order type"
            logger.error("recovery skips order %s: %s", order_id, why,
                         extra={"order_id": order_id})
            svc.metrics.corrupt_records.inc()
            scan.corrupt += 1
            continue
        state = str(order.state)
        svc.router.counts.counted_raw(state, order_id, held_since(order), order.state_reason)
        if order.seq_key and state not in TERMINAL_NAMES:
            scan.seq_entries.append((order.seq_key, order_id, order.turn))
        if order.seq_key and not order.turn and state in ("acknowledged", "pending"):
            scan.waiting += 1  # the sequencer's rebuild gives it its turn or tells it to wait
        elif needs_resume(order):
            scan.resume.append(order)
        else:
            scan.waiting += 1
            for jkey, (at, fired) in (order.jeopardy or {}).items():
                if not fired:  # a passivated order's jeopardy deadline
                    scan.jeopardy.append((at, order_id, ("jeopardy", jkey, 0)))
    return scan


def held_since(order: Order) -> float | None:
    """When a stored held order became held: the first of its latest run of
    ``held`` history entries (operator actions while held are entries too)."""
    since = None
    for entry in reversed(order.history or []):
        if not isinstance(entry, dict) or entry.get("state") != "held":
            break
        ts = entry.get("ts")
        since = ts if isinstance(ts, int | float) else since
    return since


def needs_resume(order: Order) -> bool:
    """From the stored snapshot: does this order have anything to re-send or
    re-arm? (Orders that only wait for an event, stock or their turn stay
    passivated.) Each step is asked ``oms.outstanding.command_out``, as the
    engine asks it."""
    if order.state in ("acknowledged", "pending"):
        return True
    for step in order.steps.values():
        if command_out(step.status, step.wait, step.retry_at, step.comp) is not None:
            return True
    return any(command_out(n.status, None, n.retry_at, None) is not None
               for n in order.notes)
