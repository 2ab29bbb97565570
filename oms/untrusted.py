"""Data from domain systems, checked before it becomes order state.

Gateways and the domain-events endpoint check messages at the edge; the
engine checks again what it keeps (a reply's ``data`` becomes a step result,
an event's ``data`` a step result or an early event, ``retry_after`` a
timer): no NaN, no infinity, maps only where maps are expected, and bounded
sizes, so one hostile message cannot poison the timer heap or bloat every
later snapshot of its order.
"""

from __future__ import annotations

import math
from typing import Any

from oms import codec

MAX_DATA_BYTES = 16 * 1024
"""Largest reply or event ``data`` kept with an order (msgpack bytes)."""
MAX_DEPTH = 16
MAX_RETRY_AFTER_S = 60.0
MIN_RETRY_AFTER_S = 0.05


def _scan(value: Any, depth: int = 0) -> tuple[str | None, int]:
    """A problem (non-finite number, too deep) and an upper bound of the
    encoded size, in one walk: most data is small, and then is not encoded
    just to be measured."""
    if depth > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} levels", 0
    if isinstance(value, str):
        return None, 5 + 4 * len(value)
    if isinstance(value, float):
        return (None if math.isfinite(value) else f"holds a non-finite number ({value})"), 9
    if isinstance(value, dict):
        size = 5
        for key, sub in value.items():
            if type(sub) is str and depth < MAX_DEPTH:  # most values: no call (as above)
                n = 5 + 4 * len(sub)
            else:
                problem, n = _scan(sub, depth + 1)
                if problem:
                    return problem, 0
            size += n + (5 + 4 * len(key) if isinstance(key, str) else 9)
        return None, size
    if isinstance(value, list | tuple):
        size = 5
        for sub in value:
            problem, n = _scan(sub, depth + 1)
            if problem:
                return problem, 0
            size += n
        return None, size
    if isinstance(value, bytes):
        return None, 5 + len(value)
    return None, 9


def data_problem(data: Any) -> str | None:
    """What makes ``data`` unfit to keep, or None: not a map, NaN or
    infinity anywhere, too deep, or over ``MAX_DATA_BYTES`` encoded."""
    if not isinstance(data, dict):
        return f"data must be a map, got {type(data).__name__}"
    if not data:  # an empty map (as many replies'): fit, no walk
        return None
    bound = 5  # most replies' data: a few strings; their bound without a call (as _scan)
    for key, sub in data.items():
        if type(sub) is not str or type(key) is not str:
            break
        bound += 10 + 4 * (len(key) + len(sub))
    else:
        if bound <= MAX_DATA_BYTES:
            return None
    problem, bound = _scan(data)
    if problem:
        return f"data {problem}"
    if bound <= MAX_DATA_BYTES:
        return None
    try:
        size = len(codec.pack(data))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"data cannot be encoded: {exc}"
    if size > MAX_DATA_BYTES:
        return f"data is {size} bytes, over the {MAX_DATA_BYTES}-byte limit"
    return None


def size_of(data: Any) -> int:
    """Encoded size of data already checked by ``data_problem``."""
    return len(codec.pack(data))


def retry_after(value: Any, default: float = 1.0) -> float:
    """A breaker's ``retry_after`` as a wait in seconds: a finite number
    clamped to [0.05, 60]; anything else (NaN, inf, negative, a string, a
    bool, an int too big for a float) gives ``default``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        wait = float(value)
    except OverflowError:
        return default
    if not math.isfinite(wait) or wait < 0:
        return default
    return min(max(wait, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
