"""The checker behind ``oms.process.parse_process``: it collects every problem
of a process definition, each as ``file: key.path: message``, with a hint
for a misspelt key or choice."""

from __future__ import annotations

import difflib
from typing import Any


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

    def number(self, raw: dict[str, Any], key: str, where: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            self.bad(f"{where}.{key}", "must be a number >= 0")
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
