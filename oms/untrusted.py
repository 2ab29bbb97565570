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


def _finite(value: Any, depth: int = 0) -> str | None:
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds a non-finite number ({value})"
    if isinstance(value, dict):
        for sub in value.values():
            if problem := _finite(sub, depth + 1):
                return problem
    elif isinstance(value, list | tuple):
        for sub in value:
            if problem := _finite(sub, depth + 1):
                return problem
    return None


def data_problem(data: Any) -> str | None:
    """What makes ``data`` unfit to keep, or None: not a map, NaN or
    infinity anywhere, too deep, or over ``MAX_DATA_BYTES`` encoded."""
    if not isinstance(data, dict):
        return f"data must be a map, got {type(data).__name__}"
    if problem := _finite(data):
        return f"data {problem}"
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
