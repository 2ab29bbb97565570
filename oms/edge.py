"""Checks at the edge for what domain systems send: command replies and events.

The intake checks every order before it becomes state (``oms.validation``);
this module does the same for the other way in. A domain system's reply or
event is decoded once (``oms.codec``), then checked here, in one place:

- every number is a real number in its range: NaN, infinity, a bool where a
  number belongs, integers outside signed 64 bits, and named fields out of
  their range (``retry_after``) are refused;
- a free-form ``data`` map nests at most ``MAX_DEPTH`` levels, has string
  keys and holds only maps, lists, strings, numbers, booleans and nil;
- the fields the contract names have the contract's types.

A problem is returned as data (a ``Violation``: a bounded ``reason`` for
metrics and a message for a person), never raised. The gateway turns a
violation into a retryable ``invalid_reply`` error for the waiting command;
the domain-events endpoint answers it with an ``error`` reply. Pure: no
threads, no sockets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

from oms.errors import CIRCUIT_OPEN, DomainError
from oms.untrusted import MAX_DATA_BYTES

try:  # the success replies' checks in C (``decode_success``)
    import msgspec
except ImportError:  # pragma: no cover - msgspec is a dependency; the full checks decide
    msgspec = None  # type: ignore[assignment]

MAX_REPLY_BYTES = 1024 * 1024
"""Largest command reply frame read (1 MiB, as an intake request)."""
MAX_EVENT_BYTES = 64 * 1024
"""Largest domain event frame recorded (64 KiB); larger ones get ``too_large``."""
MAX_DEPTH = 8
"""Nesting of a ``data`` map, as for an order's ``attributes``."""
MAX_ID = 1000
"""Longest ``command_id``, ``event_id``, ``order_id``, event ``name``."""
MAX_CODE = 64
"""Longest error ``code`` (it becomes an order's ``state_reason``)."""
MAX_MESSAGE = 1000
"""Longest error ``message``."""
MAX_RETRY_AFTER_S = 3600.0
"""Largest ``retry_after`` a ``circuit_open`` reply may ask for."""
INT64 = (-(2**63), 2**63 - 1)
_new = tuple.__new__  # a NamedTuple without the Python frame of its generated __new__

# ``reason`` values (a bounded metric label)
REASONS = ("undecodable", "too_large", "type", "command_id", "ok", "data", "error", "number",
           "field")


class Violation(NamedTuple):
    """What is wrong with a message from a domain system.

    reason: one of ``REASONS`` (bounded: a metric label).
    message: for a person, with the field's path.
    """

    reason: str
    message: str


class Reply(NamedTuple):
    """A checked command reply (contract §3).

    command_id: the command it answers.
    ok: whether the domain system applied it.
    data: the result map (success), or the details of a failure ({} if none).
    error: why not, when not ok.
    """

    command_id: str
    ok: bool
    data: dict[str, Any]
    error: DomainError | None


def check_number(value: Any, field: str, low: float, high: float) -> str | None:
    """None if ``value`` is an int or float (not a bool) within [low, high],
    finite; else what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{field} must be a number, got {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{field} must be a finite number, got {value}"
    if not low <= value <= high:
        return f"{field} must be between {low:g} and {high:g}, got {value!r:.40}"
    return None


def check_data(value: Any, field: str = "data", depth: int = 1) -> str | None:
    """None if ``value`` is a map fit to keep as state; else the first problem."""
    if not isinstance(value, dict):
        return f"{field} must be a map, got {type(value).__name__}"
    if depth > MAX_DEPTH:
        return f"{field} is nested deeper than {MAX_DEPTH} levels"
    for key, item in value.items():
        if not isinstance(key, str):  # msgpack allows any key; state and JSON views do not
            return f"{field} has a key that is not a string ({type(key).__name__})"
        if item is None or type(item) is str:  # fine (as in _check_value), and most values
            continue  # are: no field name is formatted for them
        problem = _check_value(item, f"{field}.{key:.100}", depth)
        if problem:
            return problem
    return None


def _check_value(
        value: Any, field: str, depth: int) -> str | None:
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int | float):
        return check_number(value, field, *INT64)
    if isinstance(value, dict):
        return check_data(value, field, depth + 1)
    if isinstance(value, list):
        if depth + 1 > MAX_DEPTH:
            return f"{field} is nested deeper than {MAX_DEPTH} levels"
        for i, item in enumerate(value):
            problem = _check_value(item, f"{field}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    return f"{field} must not be {type(value).__name__}"


def _string(value: Any, field: str, longest: int, *, empty: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__}"
    if (not value and not empty) or len(value) > longest:
        return f"{field} must be a {'' if empty else 'non-empty '}string of at most " \
               f"{longest} characters"
    return None


FIT_FRAME_BYTES = MAX_DATA_BYTES // 2
"""A reply frame up to this size whose ``data`` passed ``check_data`` holds
data the engine may keep as it is (``fit_to_keep``)."""


def fit_to_keep(frame_bytes: int) -> bool:
    """Whether the ``data`` of a reply of ``frame_bytes`` that ``parse_reply``
    accepted is fit to keep with an order as it is: what
    ``oms.untrusted.data_problem`` asks, ``check_data`` asks more strictly (a
    map, string keys, finite numbers only, 8 levels deep, not 16), except its
    encoded size (at most ``MAX_DATA_BYTES``). Decoded and encoded again, no
    value grows by more than 9/5 (a float32 becomes a float64; every other
    value keeps its size or shrinks to its smallest form), so data from a
    frame of at most ``FIT_FRAME_BYTES`` is within it. The gateway says so
    on the ``CommandResult`` (``data_fit``), and the engine checks nothing
    twice (``tests/test_edges.py`` holds the two checks together)."""
    return frame_bytes <= FIT_FRAME_BYTES


def reply_command_id(msg: dict[str, Any]) -> str | None:
    """The reply's ``command_id`` if it is usable to find the waiting command."""
    value = msg.get("command_id")
    return value if _string(value, "command_id", MAX_ID) is None else None


def parse_reply(msg: dict[str, Any]) -> Reply | Violation:
    """A decoded reply map, checked: the ``Reply``, or what is wrong with it."""
    if msg.get("type") != "result":
        return Violation("type", f"type must be 'result', got {msg.get('type')!r:.60}")
    command_id = msg.get("command_id")
    if (type(command_id) is not str or not 0 < len(command_id) <= MAX_ID) and (
            problem := _string(command_id, "command_id", MAX_ID)) is not None:
        return Violation("command_id", problem)  # (the common valid id: no call)
    ok = msg.get("ok")
    if not isinstance(ok, bool):
        return Violation("ok", f"ok must be true or false, got {ok!r:.60}")
    data = msg.get("data", None if ok else {})
    error = None if ok else parse_error(msg.get("error"))
    if isinstance(error, Violation):
        return error
    if error is not None and error.code == CIRCUIT_OPEN and isinstance(data, dict) and (
            "retry_after" in data):
        problem = check_number(data["retry_after"], "data.retry_after", 0.0,
                               MAX_RETRY_AFTER_S)
        if problem is not None:
            return Violation("number", problem)
    if (type(data) is not dict or data) and (problem := check_data(data)) is not None:
        return Violation("data", problem)  # (an empty map, as many replies': no call)
    return _new(Reply, (command_id, ok, data, error))  # Reply(...) without its frame


def _data_type() -> Any:
    """The ``data`` maps ``check_data`` accepts, as a type msgspec checks
    while it decodes: string keys; nil, bool, str, ints within ``INT64``,
    floats within it too (so finite: NaN fails both bounds), and lists and
    string-keyed maps of those, ``MAX_DEPTH`` levels with the map itself.
    Built at run time (a type checker sees ``Any``)."""
    low, high = INT64
    # the largest float <= 2**63 - 1 (check_number compares a float with the int
    # bound exactly; msgspec's float bound is a float: 2**63 itself, rounded)
    top = math.ldexp(1.0, 63) - 1024.0
    scalar: Any = (None | bool | Annotated[int, msgspec.Meta(ge=low, le=high)]
                   | Annotated[float, msgspec.Meta(ge=float(low), le=top)] | str)
    value = scalar
    for _ in range(MAX_DEPTH - 1):
        value = scalar | list.__class_getitem__(value) | dict.__class_getitem__((str, value))
    return dict.__class_getitem__((str, value))


def _not_decoded(frame: bytes) -> Any:  # pragma: no cover - without msgspec
    raise ValueError("no msgspec: the full checks decide")


def _one_step(name: str, fields: list[tuple[str, Any] | tuple[str, Any, Any]]
              ) -> Callable[[bytes], Any]:
    """A decoder of a frame into a struct of exactly ``fields``, checked as
    it is read (an unknown key refuses the frame); without msgspec, one that
    refuses every frame."""
    if msgspec is None:  # pragma: no cover - msgspec is a dependency
        return _not_decoded
    return msgspec.msgpack.Decoder(msgspec.defstruct(
        name, fields, forbid_unknown_fields=True, gc=False)).decode


_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)] if msgspec else str
_DATA = _data_type() if msgspec else Any

decode_success = _one_step("SuccessReply", [
    ("type", Literal["result"]), ("command_id", _ID), ("ok", bool), ("data", _DATA)])
"""Read a reply frame that is a plain success, checked in C: an object with
``command_id`` and ``data``, and ``ok``, which the caller must see is True.
Only a map of exactly ``type`` ``"result"``, a ``command_id`` that
``parse_reply`` takes, a bool ``ok`` and a ``data`` map that ``check_data``
takes, each key once or the last as msgpack reads it (no other key, no bin,
no ext); anything else raises (any ``Exception``): then ``decode_map`` and
``parse_reply`` decide, and name the problem. What it reads is what they
read from the same frame (``tests/test_edge_fast.py`` compares the two on
generated and hostile frames). The caller checks the frame's size
(``MAX_REPLY_BYTES``) as for any reply."""

decode_event = _one_step("PlainEvent", [
    ("type", Literal["event"]), ("event_id", _ID), ("system", _ID), ("order_id", _ID),
    ("name", _ID), ("data", _DATA, {})])
"""Read an event frame, checked in C as ``parse_event`` checks the decoded
map: an object with the ``Event``'s fields. Only a map of exactly those keys
(``data`` may be left out: an empty map), no other; anything else raises,
and ``decode_map`` and ``parse_event`` decide (``tests/test_edge_fast.py``).
The caller checks the frame's size (``MAX_EVENT_BYTES``)."""


def parse_error(raw: Any) -> DomainError | Violation:
    """The ``error`` map of a failed reply: ``{code, message, retryable}``."""
    if not isinstance(raw, dict):
        return Violation("error", f"error must be a map, got {type(raw).__name__}")
    problem = (_string(raw.get("code"), "error.code", MAX_CODE)
               or _string(raw.get("message", ""), "error.message", MAX_MESSAGE, empty=True))
    if problem is None and not isinstance(raw.get("retryable"), bool):
        problem = f"error.retryable must be true or false, got {raw.get('retryable')!r:.40}"
    if problem is not None:
        return Violation("error", problem)
    return DomainError(raw["code"], raw.get("message", ""), raw["retryable"])


class Event(NamedTuple):
    """A checked domain event (contract §3), before its sender is authorised."""

    event_id: str
    system: str
    order_id: str
    name: str
    data: dict[str, Any]


def parse_event(msg: dict[str, Any]) -> Event | Violation:
    """A decoded event map, checked: the ``Event``, or what is wrong with it."""
    if msg.get("type") != "event":
        return Violation("type", f"unknown message type {msg.get('type')!r:.100}; "
                         "expected 'event'")
    for key in ("event_id", "system", "order_id", "name"):
        if (problem := _string(msg.get(key), key, MAX_ID)) is not None:
            return Violation("field", problem)
    data = msg.get("data", {})
    if (problem := check_data(data)) is not None:
        return Violation("data", problem)
    return Event(msg["event_id"], msg["system"], msg["order_id"], msg["name"], data)
