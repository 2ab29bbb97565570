"""A definition's ``hold_when`` and which held step a domain event releases.

A step whose reply has ``field == equals`` holds the order until the event
``until_event`` comes from ``system``. Several steps may hold for the same
event at once (a per-item step: one hold per item), and an event may come
before the reply of the step it is meant for. The rule (``docs/processes.md``,
``hold_when``; contract §3):

- With ``match`` (the reply's field that identifies what is held, retail:
  ``reservation_id``), an event *names* a held step when its ``data`` has
  that step's reply's value under ``match``, and *names nobody* when it has
  no value there. It may release a step it names or, naming nobody, any; an
  event naming another value (another item's, one whose reply has not come
  yet, an unknown one) releases none: it is kept early and taken by the step
  whose reply carries that value when that reply comes. A value names a
  step only if it is the same value of the same wire type (``same``: true
  is not 1, 1.0 is not 1), and an event whose ``data`` is too large to
  keep still names the step it named (``dropped_data``).
- Without ``match`` (as before it existed): the event releases the held
  step whose reply it names by any shared key and value no other waiting
  step has (``named_by``), else the first waiting one; an early event goes
  to the first step that waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oms import untrusted
from oms.model import Step
from oms.process_check import OWN_REASONS, Checker

HOLD_KEYS = {"field", "equals", "reason", "until_event", "system", "match"}


@dataclass(frozen=True, slots=True)
class Hold:
    """Hold the order when a step's result has ``field == equals``, until
    the domain event ``until_event`` arrives from ``system`` (default: the
    system the step's command went to); ``match``: the result's field whose
    value an event must carry (or leave out) to release this step."""

    field: str
    equals: Any
    reason: str
    until_event: str
    system: str | None = None
    match: str | None = None


def parse_hold(c: Checker, hraw: dict[str, Any], where: str) -> Hold | None:
    """The ``hold_when`` table of a step (``where``: ``steps.NAME.hold_when``)."""
    c.keys(hraw, HOLD_KEYS, where)
    missing = [k for k in ("field", "equals", "reason", "until_event") if k not in hraw]
    system = hraw.get("system")
    if system is not None and (not isinstance(system, str) or not system):
        c.bad(f"{where}.system", "must be a domain system's name")
    for key in ("field", "until_event", "reason", "match"):
        value = hraw.get(key)
        if key in hraw and not (isinstance(value, str) and value):
            c.bad(f"{where}.{key}", "must be a non-empty string")
    match = hraw.get("match")
    if match is not None and match == hraw.get("field"):  # its event says "available"
        c.bad(f"{where}.match", "must be another field than `field`: the event names the "
              "held step by a value its reply had (an id), not by the value that held it")
    reason = hraw.get("reason")  # (a list or table: unhashable, not a set member)
    if isinstance(reason, str) and reason in OWN_REASONS:  # it would pose as one
        c.bad(f"{where}.reason", "is one of the service's own state_reason "
              f"values ({', '.join(sorted(OWN_REASONS))}): pick another name")
    if missing:
        c.bad(where, f"missing {', '.join(missing)}")
        return None
    return Hold(hraw["field"], hraw["equals"], hraw["reason"], hraw["until_event"],
                system if isinstance(system, str) else None,
                match if isinstance(match, str) else None)


def may_release(step: Step, data: dict[str, Any], match: str | None) -> bool:
    """Whether an event's ``data`` may release ``step`` (held under a hold
    with ``match``): it names the step or nobody (always, without ``match``)."""
    if match is None:
        return True
    value = data.get(match)
    return value is None or same(value, (step.result or {}).get(match))


def same(a: Any, b: Any) -> bool:
    """Whether two decoded values are the same msgpack value: equal and of
    the same type all the way down (Python's ``==`` takes true for 1 and
    1.0 for 1, which the wire tells apart). An array is a list or a tuple."""
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(
            same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


def dropped_data(data: Any, problem: str, matches: set[str]) -> dict[str, Any]:
    """What is kept of an event's ``data`` that may not be kept whole
    (``problem``: over 16 KiB, too deep...): ``{dropped: problem}``, with
    its value under each of ``matches`` (the ``match`` of the holds that
    may wait for it) that may be kept alone, so the event still names the
    step it named rather than none (which would release any)."""
    kept: dict[str, Any] = {"dropped": problem}
    if isinstance(data, dict):
        for field in sorted(matches - {"dropped"}):
            value = data.get(field)
            if value is not None and untrusted.data_problem({field: value}) is None:
                kept[field] = value
    return kept


def names(data: dict[str, Any], match: str | None) -> bool:
    """Whether an event's ``data`` names a step under ``match`` (a value there)."""
    return match is not None and data.get(match) is not None


def named_by(waiting: list[Step], data: dict[str, Any]) -> Step:
    """Of several steps waiting for one event (a per-item step's holds), the
    one the event's ``data`` names: a value it shares under the same key with
    that step's reply and with no other waiting step's (a back-ordered
    reply's ``reservation_id``); else, none or several named, the first."""
    named = None
    for step in waiting:
        result = step.result or {}
        for key, value in result.items():
            if key in data and same(data[key], value) and not any(
                    other is not step and same((other.result or {}).get(key), value)
                    for other in waiting):
                break
        else:
            continue
        if named is not None:
            return waiting[0]
        named = step
    return waiting[0] if named is None else named


def released(waiting: list[tuple[Step, str | None]], data: dict[str, Any]) -> Step | None:
    """The step an event releases of those waiting for it (each with its
    hold's ``match``), or None: it names another, keep it early."""
    fit = [step for step, match in waiting if may_release(step, data, match)]
    if len(fit) <= 1:
        return fit[0] if fit else None
    return named_by(fit, data)


def early_taken(step: Step, match: str | None,
                early: list[tuple[int, dict[str, Any]]]) -> int | None:
    """Which early event a step takes as its hold begins, of ``early``
    (index, ``data``: those of the event and sender it waits for, oldest
    first): the first that names it, else the first that names nobody;
    without ``match``, the first."""
    nobody = None
    for i, data in early:
        if not may_release(step, data, match):
            continue
        if match is None or names(data, match):
            return i
        if nobody is None:
            nobody = i
    return nobody
