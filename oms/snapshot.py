"""The snapshot record: the bytes the store holds for an order, and every
way to read them back.

Version 2, written since session 4: the ``Order`` itself, which msgspec
encodes as one msgpack array, ``[2, order_id, source_system, ...]``, fields
in the order of ``oms.model.Order`` (``steps`` a map from step key to the
step, each step an array in the order of ``oms.model.Step``; enums as their
strings), and decodes straight back into the classes. No intermediate map
or list is built either way.

Version 1, read only (written by earlier releases, still in their data
folders): a map ``{"v": 1, "id": ..., "src": ..., "state": ..., "uts": ...,
"steps": [step arrays], ...}``, with the same step arrays as version 2.

Readers outside this module never look into a record: ``decode`` gives the
order, ``head`` the few fields the store's indexes and the listing filter
read, without building the rest, ``record_state`` the state alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_type_hints

import msgspec

from oms import codec
from oms.model import RECORD_VERSION, Order, RecordVersionError, Step
from oms.states import OrderState, Phase, StepStatus, Target, Undo

V1 = 1

_decode = msgspec.msgpack.Decoder(Order).decode

encode: Callable[[Order], bytes] = msgspec.msgpack.Encoder().encode
"""``encode(order)``: the order's snapshot record (version 2). The encoder's
own method, called with no Python function around it."""

_encode_into = msgspec.msgpack.Encoder().encode_into
KEPT_BUFFER = 64 * 1024
"""``encode_in``: a buffer grown past this (an order of many items) is let go."""


def encode_in(order: Order, buf: bytearray) -> bytes:
    """``encode(order)``'s bytes, written into ``buf`` (the caller's own, reused:
    the order actors' save, 7 an order) and copied out. msgspec's ``encode``
    grows a new buffer from 32 bytes for each 1.6 KB record: about 0.2 µs
    more a save (``docs/performance.md``, session 9). Returns the record;
    ``buf`` keeps its capacity, up to ``KEPT_BUFFER`` (past it, it is emptied)."""
    _encode_into(order, buf)
    out = bytes(buf)
    if len(out) > KEPT_BUFFER:
        del buf[:]
        buf.extend(bytes(4096))
    return out


def decode(raw: bytes) -> Order:
    """The order a record of any known version holds.

    Raises ``RecordVersionError`` for a version this release does not know,
    and another ``ValueError`` (or msgpack's error) for bytes that are not a
    record (``storage.records.decode_order`` reports either with the key)."""
    try:
        return _decode(raw)  # version 2, type-checked on the way in
    except msgspec.DecodeError:  # also ValidationError: an older or an odd record
        pass
    try:
        old = _decode_v1(raw)  # version 1, type-checked too: half the cost of the below
    except msgspec.DecodeError:
        pass
    else:
        if old.v == V1:
            fields = list(msgspec.structs.astuple(old)[1:])  # Order's fields, in its order
            fields[STEPS] = {s.key: s for s in fields[STEPS]}
            return Order(*fields)
    rec = codec.unpack(raw)
    if isinstance(rec, dict) and rec.get("v") == V1:
        return _from_v1(rec)
    if isinstance(rec, list) and rec and rec[0] == RECORD_VERSION:
        return _from_v2_unchecked(rec)
    version = rec.get("v") if isinstance(rec, dict) else rec[:1] if isinstance(rec, list) else rec
    raise RecordVersionError(f"unknown snapshot format version {version!r}")


def _step(rec: list[Any]) -> Step:
    """A step array (both versions): positional, so a shorter array from an
    older release takes the defaults of the fields it did not have."""
    try:
        return msgspec.convert(rec, Step)  # checked, in C: 0.3 us, a seventh of the below
    except msgspec.ValidationError:
        pass
    got = dict(zip(Step.__struct_fields__, rec, strict=False))
    comp = got.get("comp")
    return Step(**got | {"status": StepStatus(got.get("status", StepStatus.PENDING)),
                         "comp": None if comp is None else Undo(comp)})


V1_KEYS = {
    "order_id": "id", "source_system": "src", "external_id": "ext", "order_type": "type",
    "customer": "cust", "customer_address": "caddr", "delivery_address": "daddr",
    "currency": "cur", "items": "items", "attributes": "attrs", "created_ts": "cts",
    "state": "state", "state_reason": "reason", "updated_ts": "uts", "steps": "steps",
    "history": "hist", "results": "res", "summary": "sum", "phase": "phase",
    "target": "target", "failure": "fail", "cancel": "cancel", "seq_key": "seq",
    "turn": "turn", "early_events": "early", "notes": "notes", "done_counter": "dc",
    "version": "ver", "jeopardy": "jep",
}
"""Version 1: each ``Order`` field's key in the map, besides ``"v": 1``
(every key is there but ``jep``, which the first version 1 records lack),
in the order of ``Order``'s fields (``tests/test_record_v2.py`` checks)."""
STEPS = tuple(V1_KEYS).index("steps")


def _v1_struct() -> type[msgspec.Struct]:
    """The version 1 map as a struct, so msgspec decodes it type-checked, in
    C, as it does version 2 (its steps a list, not a map)."""
    hints = get_type_hints(Order)
    fields: list[Any] = [("v", int)]
    fields += [(name, list[Step] if name == "steps" else hints[name])
               for name in V1_KEYS if name != "jeopardy"]
    fields.append(("jeopardy", dict[str, Any], {}))
    return msgspec.defstruct("OrderV1", fields, rename=V1_KEYS)


_decode_v1: Callable[[bytes], Any] = msgspec.msgpack.Decoder(_v1_struct()).decode


def _from_v1(rec: dict[str, Any]) -> Order:
    """A version 1 map that the typed decoder refused, as ``Order.from_record``
    of earlier releases read it (enums are now enums: phase, target and undo
    were plain strings)."""
    steps = [_step(s) for s in rec["steps"]]
    target = rec["target"]
    return Order(
        order_id=rec["id"], source_system=rec["src"], external_id=rec["ext"],
        order_type=rec["type"], customer=rec["cust"], customer_address=rec["caddr"],
        delivery_address=rec["daddr"], currency=rec["cur"], items=rec["items"],
        attributes=rec["attrs"], created_ts=rec["cts"], state=OrderState(rec["state"]),
        state_reason=rec["reason"], updated_ts=rec["uts"],
        steps={s.key: s for s in steps}, history=rec["hist"], results=rec["res"],
        summary=rec["sum"], phase=Phase(rec["phase"]),
        target=None if target is None else Target(target),
        failure=rec["fail"], cancel=rec["cancel"], seq_key=rec["seq"], turn=rec["turn"],
        early_events=rec["early"], notes=[_step(n) for n in rec["notes"]],
        done_counter=rec["dc"], version=rec["ver"], jeopardy=rec.get("jep", {}),
    )


def _from_v2_unchecked(rec: list[Any]) -> Order:
    """A version 2 array that the typed decoder refused: a value the order
    held in memory that its annotations do not allow (a map key that is not
    a string, say). Read as version 1 was, unchecked but for the enums, so
    such an order still loads rather than being lost."""
    got = dict(zip(Order.__struct_fields__, rec[1:], strict=False))
    steps = [_step(s) for s in (got.get("steps") or {}).values()]
    target = got.get("target")
    return Order(**got | {
        "state": OrderState(got.get("state", OrderState.ACKNOWLEDGED)),
        "steps": {s.key: s for s in steps},
        "notes": [_step(n) for n in got.get("notes") or []],
        "phase": Phase(got.get("phase", Phase.RUN)),
        "target": None if target is None else Target(target),
    })


# -- the head of a record: what the indexes and the listing filter read -------

class _HeadV2(msgspec.Struct, array_like=True, tag=RECORD_VERSION):
    """The first fields of a version 2 record; the decoder skips the big
    ones (``msgspec.Raw``: no objects built) and everything after
    ``updated_ts``. Positions as in ``oms.model.Order``."""

    order_id: str
    source_system: str
    external_id: str
    order_type: str
    customer: dict[str, Any]
    customer_address: msgspec.Raw
    delivery_address: msgspec.Raw
    currency: msgspec.Raw
    items: msgspec.Raw
    attributes: msgspec.Raw
    created_ts: float
    state: str
    state_reason: str | None
    updated_ts: float


class _HeadV1(msgspec.Struct):
    """The same fields of a version 1 map (the decoder skips the other keys)."""

    v: int
    order_id: Any = msgspec.field(name="id", default=None)
    source_system: Any = msgspec.field(name="src", default=None)
    external_id: Any = msgspec.field(name="ext", default=None)
    order_type: Any = msgspec.field(name="type", default=None)
    customer: Any = msgspec.field(name="cust", default=None)
    created_ts: Any = msgspec.field(name="cts", default=None)
    state: Any = None
    state_reason: Any = msgspec.field(name="reason", default=None)
    updated_ts: Any = msgspec.field(name="uts", default=None)


Head = _HeadV2 | _HeadV1 | Order
"""What ``head`` gives: each has ``order_id``, ``source_system``,
``external_id``, ``order_type``, ``customer``, ``created_ts``, ``state``,
``state_reason`` and ``updated_ts`` (a version 1 head unchecked: any type)."""

_decode_head = msgspec.msgpack.Decoder(_HeadV2).decode
_decode_head_v1 = msgspec.msgpack.Decoder(_HeadV1).decode


def head(raw: bytes) -> Head:
    """The head of a record of any known version (the whole order when only
    the full decoder reads it). Raises as ``decode`` does."""
    try:
        return _decode_head(raw)
    except msgspec.DecodeError:
        pass
    try:
        rec = _decode_head_v1(raw)
    except msgspec.DecodeError:
        return decode(raw)
    return rec if rec.v == V1 else decode(raw)


def record_state(raw: bytes) -> str:
    """The ``state`` of a record, without building the rest of it (the
    retention index needs only that, once an order finishes)."""
    return str(head(raw).state)
