"""The checker behind ``oms.process.parse_process``: it collects every problem
of a process definition, each as ``file: key.path: message``, with a hint
for a misspelt key or choice."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from oms.states import Reason

MAX_DURATION_S = 366 * 86400.0
"""The longest duration a definition may give (a timeout, a back-off, an
expected time): the timers refuse a deadline further out as bad and fire
it after a second instead (``actors.timers``), which would fail a wait at
once."""

STEP_NAME = re.compile(r"(?!~)[^:#\[\]]{1,200}")
STEP_NAME_RULE = ("a step name is 1 to 200 characters, none of ':' '#' '[' ']', not starting "
                  "with '~': it is part of the step's command ids, which read those back as "
                  "an undo, a CRM note, a retry, an item or a long key's digest (its replies "
                  "would never reach it)")

OWN_REASONS = frozenset(r.value for r in Reason)
"""The ``state_reason`` values the engine gives itself (``fallout``,
``internal_error``, ...): a definition's hold reason must not be one."""


class Checker:
    """Collects problems as ``file: key.path: message``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def bad(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def keys(self, table: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.bad(f"{where}.{key}" if where else key, f"unknown key{tip}")

    def table(self, raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            self.bad(f"{where}.{key}" if where else key, "must be a table")
            return {}
        return value

    def number(self, raw: dict[str, Any], key: str, where: str, default: float,
               positive: bool = False) -> float:
        """A duration in seconds: 0 (``positive``: above 0) to ``MAX_DURATION_S``
        (366 days)."""
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (
                positive and value == 0):
            self.bad(f"{where}.{key}", "must be a number > 0" if positive else
                     "must be a number >= 0")
            return default
        if not math.isfinite(value) or value > MAX_DURATION_S:
            self.bad(f"{where}.{key}", f"must be at most {MAX_DURATION_S:.0f} seconds (366 "
                     "days): a timer further out would fire at once")
            return default
        return float(value)

    def choice(self, raw: dict[str, Any], key: str, where: str, options: tuple[str, ...]) -> str:
        value = raw.get(key, options[0])
        if value not in options:
            hint = difflib.get_close_matches(str(value), options, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.bad(f"{where}.{key}", f"must be one of {', '.join(options)}{tip}")
            return options[0]
        return str(value)
