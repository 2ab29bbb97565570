"""Process definitions: order types as data (TOML files), validated at load.

A definition declares steps (system, op, argument templates), dependencies
between steps (a graph: steps whose dependencies are done run in parallel),
per-item steps that fan out over the order's items by ``action``,
compensating ops, retry policy, timeouts, the point of no return, holds and
waits on domain events, the failure policy, the sequencing key and the states
that notify CRM. ``docs/processes.md`` is the reference for the format.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from oms.holds import Hold, parse_hold
from oms.process_check import STEP_NAME, STEP_NAME_RULE, Checker
from oms.states import OrderState


class ProcessError(ValueError):
    """One or more problems in process definition files."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """max_attempts: sends in all; backoff doubles from base_s up to cap_s;
    jitter: the fraction of each delay that is randomised (0 to 1)."""

    max_attempts: int = 5
    base_s: float = 0.2
    cap_s: float = 5.0
    jitter: float = 0.5

    def delay(self, attempt: int, spread: float) -> float:
        """Delay before attempt ``attempt + 1``; ``spread`` is in [0, 1)."""
        # a float power, n at most 1,000: an int one raised OverflowError in the
        # product past attempt 1,025; this one is at worst inf (min: the cap)
        raw = min(self.cap_s, self.base_s * 2.0 ** min(max(0, attempt - 1), 1000))
        return raw * (1 - self.jitter) + raw * self.jitter * spread


@dataclass(frozen=True, slots=True)
class Action:
    """What a step (or one item of a per-item step) sends."""

    system: str
    op: str
    args: dict[str, Any]
    compensate: tuple[str, dict[str, Any]] | None = None
    collect: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    after: tuple[str, ...]
    action: Action | None
    per_item: dict[str, Action] | None
    wait_event: str | None
    wait_system: str | None
    wait_timeout_s: float | None
    timeout_s: float
    retry: RetryPolicy
    hold: Hold | None
    expected_s: float | None


@dataclass(frozen=True, slots=True)
class ProcessDef:
    order_type: str
    description: str
    steps: tuple[StepDef, ...]
    failure_policy: str = "compensate"
    item_failure: str = "fail"
    point_of_no_return: str | None = None
    sequencing_key: str | None = None
    notify_system: str = "crm"
    notify_op: str = "notify"
    notify_states: frozenset[str] = frozenset()
    notify_retry: RetryPolicy = RetryPolicy()
    notify_timeout_s: float = 5.0
    expected_s: float | None = None
    source: str = ""

    def step(self, name: str) -> StepDef:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def systems(self) -> set[str]:
        """Every system it sends to or waits for an event from (configured: none else's comes)."""
        out = {self.notify_system} if self.notify_states else set()
        for s in self.steps:
            if s.action:
                out.add(s.action.system)
            for a in (s.per_item or {}).values():
                out.add(a.system)
            if s.wait_system:
                out.add(s.wait_system)
            if s.hold is not None and s.hold.system:
                out.add(s.hold.system)
        return out


_PROCESS_KEYS = {
    "order_type", "description", "failure_policy", "item_failure", "point_of_no_return",
    "sequencing_key", "notify", "expected_s",
}
_STEP_KEYS = {
    "after", "system", "op", "args", "compensate", "collect", "per_item", "wait_event",
    "timeout_s", "retry", "hold_when", "expected_s",
}
_ACTION_KEYS = {"system", "op", "args", "compensate", "collect"}
_RETRY_KEYS = {"max_attempts", "backoff_base_s", "backoff_cap_s", "jitter"}
_TOP_KEYS = {"process", "defaults", "steps"}
_ITEM_ACTIONS = ("add", "modify", "delete", "noChange")
_ORDER_REFS = {
    "id", "external_id", "source_system", "order_type", "customer", "customer_address",
    "delivery_address", "currency", "total_minor", "items", "stock_items", "attributes",
    "completed_items", "completed_total_minor",
}


def _retry(c: Checker, raw: dict[str, Any], where: str, base: RetryPolicy) -> RetryPolicy:
    c.keys(raw, _RETRY_KEYS, where)
    attempts = raw.get("max_attempts", base.max_attempts)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        c.bad(f"{where}.max_attempts", "must be an integer >= 1")
        attempts = base.max_attempts
    jitter = c.number(raw, "jitter", where, base.jitter)
    if jitter > 1:
        c.bad(f"{where}.jitter", "must be between 0 and 1")
    return RetryPolicy(
        attempts,
        c.number(raw, "backoff_base_s", where, base.base_s),
        c.number(raw, "backoff_cap_s", where, base.cap_s),
        min(jitter, 1.0),
    )


def _refs(value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("$"):
        return [value[1:]]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _check_refs(
    c: Checker, value: Any, where: str, scopes: set[str], step_names: set[str]
) -> None:
    for ref in _refs(value):
        root, _, rest = ref.partition(".")
        if root not in scopes:
            hint = difflib.get_close_matches(root, sorted(scopes), n=1)
            tip = f" (did you mean ${hint[0]}?)" if hint else ""
            c.bad(where, f"${ref}: ${root} is not available here{tip}")
        elif root == "order" and rest.split(".")[0] not in _ORDER_REFS:
            hint = difflib.get_close_matches(rest.split(".")[0], sorted(_ORDER_REFS), n=1)
            tip = f" (did you mean $order.{hint[0]}?)" if hint else ""
            c.bad(where, f"${ref}: unknown order field{tip}")
        elif root == "steps" and rest.split(".")[0] not in step_names:
            hint = difflib.get_close_matches(rest.split(".")[0], sorted(step_names), n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            c.bad(where, f"${ref}: unknown step{tip}")


def _action(
    c: Checker, raw: dict[str, Any], where: str, scopes: set[str], names: set[str]
) -> Action | None:
    system, op = raw.get("system"), raw.get("op")
    if not isinstance(system, str) or not system:
        c.bad(f"{where}.system", "required: the domain system's name")
    if not isinstance(op, str) or not op:
        c.bad(f"{where}.op", "required: the operation to send")
    args = c.table(raw, "args", where)
    _check_refs(c, args, f"{where}.args", scopes, names)
    comp = None
    if "compensate" in raw:
        craw = c.table(raw, "compensate", where)
        c.keys(craw, {"op", "args"}, f"{where}.compensate")
        cargs = c.table(craw, "args", f"{where}.compensate")
        _check_refs(c, cargs, f"{where}.compensate.args", scopes | {"result", "args"}, names)
        if not isinstance(craw.get("op"), str) or not craw["op"]:
            c.bad(f"{where}.compensate.op", "required: the operation that undoes it")
        else:
            comp = (craw["op"], cargs)
    collect_raw = raw.get("collect", [])
    if isinstance(collect_raw, list):
        collect = {str(k): str(k) for k in collect_raw}
    elif isinstance(collect_raw, dict):
        collect = {str(k): str(v) for k, v in collect_raw.items()}
    else:
        c.bad(f"{where}.collect", "must be a list of result fields or a table")
        collect = {}
    if not isinstance(system, str) or not isinstance(op, str):
        return None
    return Action(system, op, args, comp, collect)


def _step(
    c: Checker, name: str, raw: dict[str, Any], defaults: dict[str, Any], names: set[str]
) -> StepDef:
    where = f"steps.{name}"
    c.keys(raw, _STEP_KEYS, where)
    after = raw.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        c.bad(f"{where}.after", "must be a list of step names")
        after = []
    for dep in after:
        if dep not in names:
            hint = difflib.get_close_matches(dep, sorted(names), n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            c.bad(f"{where}.after", f"unknown step {dep!r}{tip}")
    retry = _retry(c, c.table(raw, "retry", where), f"{where}.retry", defaults["retry"])
    timeout = c.number(raw, "timeout_s", where, defaults["timeout_s"], positive=True)
    expected = c.number(raw, "expected_s", where, 0.0) if "expected_s" in raw else None
    action = per_item = wait_event = wait_system = hold = wait_timeout = None
    scopes = {"order", "steps"}
    kinds = [k for k in ("op", "per_item", "wait_event") if k in raw]
    if len(kinds) != 1:
        c.bad(where, "needs exactly one of: op (a command), per_item, wait_event")
    if "op" in raw:
        action = _action(c, raw, where, scopes, names)
    elif "per_item" in raw:
        per_item = {}
        table = c.table(raw, "per_item", where)
        c.keys(table, set(_ITEM_ACTIONS), f"{where}.per_item")
        for act, araw in table.items():
            if isinstance(araw, dict):
                c.keys(araw, _ACTION_KEYS, f"{where}.per_item.{act}")
                a = _action(c, araw, f"{where}.per_item.{act}", scopes | {"item"}, names)
                if a is not None:
                    per_item[act] = a
    elif "wait_event" in raw:
        wraw = c.table(raw, "wait_event", where)
        c.keys(wraw, {"name", "system", "timeout_s"}, f"{where}.wait_event")
        wait_event, wait_system = wraw.get("name"), wraw.get("system")
        if "timeout_s" in wraw:
            wait_timeout = c.number(wraw, "timeout_s", f"{where}.wait_event", 0.0) or None
        if not isinstance(wait_event, str) or not wait_event:
            c.bad(f"{where}.wait_event.name", "required: the domain event's name")
        if not isinstance(wait_system, str) or not wait_system:
            c.bad(f"{where}.wait_event.system",
                  "required: the domain system the event must come from")
    if "hold_when" in raw:
        hold = parse_hold(c, c.table(raw, "hold_when", where), f"{where}.hold_when")
    return StepDef(
        name, tuple(after), action, per_item, wait_event, wait_system, wait_timeout, timeout,
        retry, hold,
        expected or None,
    )


def _check_graph(c: Checker, steps: list[StepDef]) -> None:
    known = {s.name for s in steps}
    deps = {s.name: set(s.after) & known for s in steps}  # unknown names: reported already
    done: set[str] = set()
    while True:
        ready = [n for n, d in deps.items() if n not in done and d <= done]
        if not ready:
            break
        done.update(ready)
    if len(done) != len(deps):
        cycle = sorted(set(deps) - done)
        c.bad("steps", f"dependency cycle among: {', '.join(cycle)}")


def parse_process(text: str, source: str) -> ProcessDef:
    """Parse and validate one definition; raises ``ProcessError``."""
    c = Checker(source)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProcessError([f"{source}: not valid TOML: {exc}"]) from None
    c.keys(raw, _TOP_KEYS, "")
    proc = c.table(raw, "process", "")
    c.keys(proc, _PROCESS_KEYS, "process")
    order_type = proc.get("order_type")
    if not isinstance(order_type, str) or not order_type:
        c.bad("process.order_type", "required")
        order_type = Path(source).stem
    draw = c.table(raw, "defaults", "")
    c.keys(draw, {"timeout_s", "retry"}, "defaults")
    defaults: dict[str, Any] = {
        "timeout_s": c.number(draw, "timeout_s", "defaults", 5.0, positive=True),
        "retry": _retry(c, c.table(draw, "retry", "defaults"), "defaults.retry", RetryPolicy()),
    }
    sraw = c.table(raw, "steps", "")
    if not sraw:
        c.bad("steps", "a process needs at least one step")
    names = set(sraw)
    steps = []
    for name, body in sraw.items():
        if not STEP_NAME.fullmatch(name):
            c.bad(f"steps.{name}", STEP_NAME_RULE)
        if isinstance(body, dict):
            steps.append(_step(c, name, body, defaults, names))
        else:
            c.bad(f"steps.{name}", "must be a table")
    _check_graph(c, steps)
    ponr = proc.get("point_of_no_return")
    if ponr is not None and ponr not in names:
        hint = difflib.get_close_matches(str(ponr), sorted(names), n=1)
        tip = f" (did you mean {hint[0]!r}?)" if hint else ""
        c.bad("process.point_of_no_return", f"unknown step {ponr!r}{tip}")
    notify = c.table(proc, "notify", "process")
    c.keys(notify, {"system", "op", "states", "retry", "timeout_s"}, "process.notify")
    states = notify.get("states", [])
    valid_states = {str(s) for s in OrderState}
    for st in states:
        if st not in valid_states:
            hint = difflib.get_close_matches(str(st), sorted(valid_states), n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            c.bad("process.notify.states", f"unknown state {st!r}{tip}")
    seq = proc.get("sequencing_key")
    if seq is not None and seq not in ("customer.id", "source_system") and not (
        isinstance(seq, str) and seq.startswith("attributes.")
    ):
        c.bad("process.sequencing_key", "must be customer.id, source_system or attributes.NAME")
    result = ProcessDef(
        order_type=order_type,
        description=str(proc.get("description", "")),
        steps=tuple(steps),
        failure_policy=c.choice(proc, "failure_policy", "process", ("compensate", "hold")),
        item_failure=c.choice(proc, "item_failure", "process", ("fail", "partial")),
        point_of_no_return=ponr,
        sequencing_key=seq,
        notify_system=str(notify.get("system", "crm")),
        notify_op=str(notify.get("op", "notify")),
        notify_states=frozenset(str(s) for s in states),
        notify_retry=_retry(
            c, c.table(notify, "retry", "process.notify"), "process.notify.retry",
            defaults["retry"],
        ),
        notify_timeout_s=c.number(notify, "timeout_s", "process.notify", defaults["timeout_s"],
                                  positive=True),
        expected_s=(c.number(proc, "expected_s", "process", 0.0) or None)
        if "expected_s" in proc else None,
        source=source,
    )
    if c.problems:
        raise ProcessError(c.problems)
    return result


def builtin_processes() -> dict[str, ProcessDef]:
    """The shipped defaults: ``retail`` and ``telecom``."""
    out = {}
    for entry in sorted(resources.files("oms.processes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            proc = parse_process(entry.read_text(encoding="utf-8"), f"oms/processes/{entry.name}")
            out[proc.order_type] = proc
    return out
