"""An order's snapshot record with its settled steps kept encoded.

An order actor writes a snapshot after every slice (7 or so a retail
order), and most of what it costs is reading the order's objects, cold in
the cache with a thousand orders in flight (``docs/performance.md``). A step
that is *settled* no longer changes while the order is in memory, so its
bytes are kept (``msgspec.Raw``, which the encoder copies verbatim) and the
next snapshots do not read it again. The record is the same bytes as
``oms.snapshot.encode`` writes: only where they come from differs.

A step (or CRM note) is settled when it is ``done`` or ``skipped`` with no
wait, no retry and no undo: nothing the engine does on a command result, a
timer, a domain event, a start or a sequencing turn changes such a step
again (each of those acts on a step that runs, waits or backs off). What
does change one, and so drops everything kept for the order:

- the phase changing (compensation undoes done steps): the kept parts are
  for the phase they were kept in, and none are kept while compensating;
- any other message (``Engine``: a cancel, an operator action, a resume,
  which also checks for orphans) and the failure rule
  (``hold_internal_error``): ``forget``;
- a load: a decoded order is a new object, with nothing kept.

Settled steps can still change through objects they share with the order,
which only a process definition can arrange: a template that puts an
item's map itself (``"$item"``) into a step's arguments (the item's state
changes), or a key collected both by a per-item step and another step
(the per-item ones append to the list the other collected). The engine of
such a definition keeps nothing (``keepable``).

``CHECK`` (``OMS_CHECK_SNAPSHOT`` in the service, on for the test suite):
every snapshot is also encoded the plain way, and different bytes raise
``KeptMismatch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from oms.model import Order, Step
from oms.process import ProcessDef
from oms.states import StepStatus
from oms.templates import template_refs

KEPT = "kept_encoded"
"""The key of an order's ``Kept`` in its ``__dict__`` (never encoded)."""

_encode = msgspec.msgpack.Encoder().encode
_SETTLED = (StepStatus.DONE, StepStatus.SKIPPED)
_Raw = msgspec.Raw


class KeptMismatch(AssertionError):
    """Check mode: a snapshot with kept parts differs from the plain one."""


CHECK: Callable[[str], None] | None = None
"""When set (check mode), each snapshot is compared with the plain encoding
and a difference is reported to it (``check_from``), then raised."""


def check_from(setting: str | None, report: Callable[[str], None] | None = None) -> None:
    """Check mode from ``OMS_CHECK_SNAPSHOT``: off when empty or ``0``; on
    for any other value (a file to append each difference to, for a test run
    of subprocess services, is the caller's ``report``)."""
    global CHECK  # noqa: PLW0603 - one process-wide switch, as the environment is
    CHECK = None if setting in (None, "", "0") else (report or (lambda _what: None))


def keepable(proc: ProcessDef) -> bool:
    """Whether an order of this definition may keep its settled steps
    encoded: no step's arguments hold an item's map itself, and no key is
    collected both by a per-item step and another one (module docstring)."""
    per_item: set[str] = set()
    whole: set[str] = set()
    for sdef in proc.steps:
        actions = [sdef.action] if sdef.per_item is None else list(sdef.per_item.values())
        for action in actions:
            if action is None:
                continue
            if ("item", None) in template_refs(action.args):
                return False
            (whole if sdef.per_item is None else per_item).update(action.collect)
    return per_item.isdisjoint(whole)


class Kept:
    """What an order keeps encoded: ``steps``, its steps map with each
    settled step's record (a ``msgspec.Raw``) in its place, the same keys in
    the same order, and ``notes`` likewise for its CRM notes; ``scan``:
    whether a step may have settled since they were last looked over
    (``settling``); ``source``, the steps map they are for."""

    __slots__ = ("notes", "scan", "source", "steps")

    def __init__(self, order: Order) -> None:
        self.source = order.steps
        self.steps: dict[Any, Step | _Raw] = dict(order.steps)
        self.notes: list[Step | _Raw] = []
        self.scan = True


def forget(order: Order) -> None:
    """Drop what the order keeps encoded (before anything may change a
    settled step: see the module docstring)."""
    order.__dict__.pop(KEPT, None)


def settling(order: Order) -> None:
    """A step or note of the order is now done or skipped: look for it at
    the next snapshot. (Only a cost saving: a step the look misses is
    encoded as it is, each time.)"""
    kept: Kept | None = order.__dict__.get(KEPT)
    if kept is not None:
        kept.scan = True


def encode(order: Order) -> bytes:
    """The order's snapshot record, the bytes ``oms.snapshot.encode`` gives,
    with its settled steps and notes encoded once and kept."""
    if order.target is not None:  # compensating, or compensated: nothing is kept
        forget(order)
        return _encode(order)
    kept: Kept | None = order.__dict__.get(KEPT)
    steps, notes = order.steps, order.notes
    if kept is None or kept.source is not steps or len(kept.notes) > len(notes):
        kept = order.__dict__[KEPT] = Kept(order)
    if len(kept.notes) != len(notes):
        kept.notes += notes[len(kept.notes):]
    if kept.scan:
        _settle(kept.steps)
        _settle(kept.notes)
        kept.scan = False
    order.steps, order.notes = kept.steps, kept.notes  # type: ignore[assignment]
    try:
        raw = _encode(order)
    finally:
        order.steps, order.notes = steps, notes
    if CHECK is not None:
        _check(order, raw)
    return raw


def _settle(parts: Any) -> None:
    """Put each settled step's record in its place in ``parts`` (a map or a
    list of steps and records)."""
    settled = [(key, part) for key, part in (parts.items() if type(parts) is dict
                                             else enumerate(parts))
               if type(part) is Step and part.status in _SETTLED and part.wait is None
               and part.retry_at is None and part.comp is None]
    for key, part in settled:
        parts[key] = _Raw(_encode(part))


def _check(order: Order, raw: bytes) -> None:
    if raw == _encode(order):
        return
    kept: Kept = order.__dict__[KEPT]
    stale = [key for key, part in kept.steps.items()
             if isinstance(part, _Raw) and bytes(part) != _encode(order.steps[key])]
    stale += [f"note {i}" for i, part in enumerate(kept.notes)
              if isinstance(part, _Raw) and bytes(part) != _encode(order.notes[i])]
    what = (f"order {order.order_id}: the snapshot with kept parts differs from the plain "
            f"one (stale: {', '.join(stale) or 'none found'})")
    assert CHECK is not None
    CHECK(what)
    raise KeptMismatch(what)
