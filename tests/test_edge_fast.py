"""A plain success reply's one-step read (``edge.decode_success``) against
the full path (``codec.decode_map`` then ``edge.parse_reply``), and a plain
domain event's (``edge.decode_event``) against ``decode_map`` then
``edge.parse_event``.

The gateway takes a reply through ``decode_success`` first and, when that
refuses it (or ``ok`` is not true), through the full path, which names the
problem. So the one-step read must never accept what the full path refuses,
and what it accepts must be what the full path makes of the same bytes: the
same ``command_id`` and the same ``data``, value for value, type for type,
key for key in the same order. Here both read many generated frames: plain
successes and poisoned ones (wrong types, ints and floats at and beyond the
64-bit bounds, NaN and infinity, nesting around 8 levels, unknown fields,
bin and ext values, keys that are not strings, strings that are not UTF-8,
repeated keys, truncated and corrupted frames).
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import msgpack
import pytest

from oms import codec, edge


class Raw(bytes):
    """Bytes put into a frame as they are (not UTF-8, odd headers)."""


class Pairs(list):  # type: ignore[type-arg]
    """A map as its (key, value) pairs, in order: keys may repeat."""


def encode(value: Any, rng: random.Random) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, Pairs | dict):
        pairs = list(value.items()) if isinstance(value, dict) else list(value)
        n = len(pairs)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(encode(k, rng) + encode(v, rng) for k, v in pairs)
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(encode(v, rng) for v in value)
    if isinstance(value, float) and rng.random() < 0.3:
        try:  # a float32 (read back as a float), when it holds the value
            single = msgpack.packb(value, use_single_float=True)
            if msgpack.unpackb(single) == value or math.isnan(value):
                return single
        except (OverflowError, ValueError):
            pass
    return msgpack.packb(value, use_bin_type=True)


NOT_UTF8 = [Raw(b"\xa2\xff\xfe"), Raw(b"\xa3\xed\xa0\x80"), Raw(b"\xa2\xc0\x80"),
            Raw(b"\xa4\xf4\x90\x80\x80")]
INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**63) + 1]
FLOATS = [0.0, -0.0, 1.5, 2.5e-300, math.nan, math.inf, -math.inf, 2.0**63,
          9223372036854774784.0, -(2.0**63), -(2.0**63) - 2048.0, 1e19, -1e19, 1e308]
STRINGS = ["", "x", "\x00", "é" * 3, "\U0001f600", "k" * 200]
ODD = [b"", b"bin", msgpack.ExtType(1, b"x"), Raw(b"\xd6\xff\x00\x00\x00\x00"),  # a timestamp
       msgpack.ExtType(5, b""), *NOT_UTF8]


def scalar(rng: random.Random, poison: float) -> Any:
    if rng.random() < poison:
        return rng.choice([*ODD, *FLOATS, *INTS])
    return rng.choice([None, True, False, rng.choice(INTS[:6]), rng.choice(FLOATS[:4]),
                       rng.choice(STRINGS), rng.randint(-1000, 1000)])


def junk(rng: random.Random, depth: int, poison: float) -> Any:
    """A value ``depth`` container levels deep at most."""
    roll = rng.random()
    if depth <= 0 or roll < 0.45:
        return scalar(rng, poison)
    if roll < 0.7:
        return [junk(rng, depth - 1, poison) for _ in range(rng.randint(0, 4))]
    return data_map(rng, depth, poison)


def data_map(rng: random.Random, depth: int, poison: float) -> Any:
    pairs = Pairs()
    for _ in range(rng.randint(0, 5)):
        key: Any = rng.choice(STRINGS)
        if rng.random() < poison / 2:
            key = rng.choice([b"k", 1, -1, None, True, 1.5, *NOT_UTF8])
        pairs.append((key, junk(rng, depth - 1, poison)))
    if pairs and rng.random() < poison:  # a key twice
        pairs.append((pairs[0][0], junk(rng, depth - 1, poison)))
    return pairs


def deep(depth: int, rng: random.Random) -> Any:
    """A data map nested exactly ``depth`` levels (itself the first)."""
    value: Any = rng.choice(["leaf", 1, 2.5, None, True])
    for _ in range(depth - 1):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return {"d": value}


COMMAND_IDS: list[Any] = ["O1:reserve_stock", "x", "x" * 1000, "x" * 1001, "é" * 1000,
                          "\U0001f600" * 1000, "\U0001f600" * 1001, "", 5, None, b"id", True,
                          *NOT_UTF8]
TYPES: list[Any] = ["result", "result", "result", "Result", "event", "", b"result", None, 1,
                    NOT_UTF8[0]]
OKS: list[Any] = [True, True, True, False, 1, 0, "true", None, 1.0]
EXTRA: list[str] = ["error", "request_id", "Data", "", "\x00", "type "]


def reply_pairs(rng: random.Random, poison: float) -> Pairs:
    """The (key, value) pairs of a reply: most of them a plain success."""
    def pick(options: list[Any]) -> Any:
        return rng.choice(options) if rng.random() < poison else options[0]

    roll = rng.random()
    if roll < 0.1:
        data: Any = deep(rng.randint(1, 12), rng)
    elif roll < 0.15 and poison:
        data = rng.choice([None, [], "data", 1, b"", msgpack.ExtType(1, b"")])
    else:
        data = data_map(rng, rng.randint(1, 9), poison)
    pairs = Pairs([("type", pick(TYPES)), ("command_id", pick(COMMAND_IDS)),
                   ("ok", pick(OKS)), ("data", data)])
    if rng.random() < poison:
        pairs.append((rng.choice(EXTRA), junk(rng, 2, poison)))
    if rng.random() < poison / 2:
        del pairs[rng.randrange(len(pairs))]  # a field missing
    if rng.random() < poison / 2:
        pairs.append(rng.choice(pairs[:4] or [("ok", True)])[:1] + (junk(rng, 2, poison),))
    if rng.random() < poison / 3:
        pairs.append((rng.choice([b"ok", 1, None]), True))  # a key that is not a string
    rng.shuffle(pairs)
    return pairs


def frame_of(pairs: Pairs, rng: random.Random, poison: float) -> tuple[bytes, Pairs | None]:
    """The frame of ``pairs``, and ``pairs`` if it is intact (not truncated,
    corrupted or followed by more bytes), else None."""
    frame = encode(pairs, rng)
    roll = rng.random()
    if roll < poison / 4 and frame:
        return frame[:rng.randrange(len(frame))], None  # truncated
    if roll < poison / 2 and frame:
        at = rng.randrange(len(frame))  # a byte changed
        return frame[:at] + bytes([rng.randrange(256)]) + frame[at + 1:], None
    if roll < poison * 0.6:
        return frame + b"\xc0", None  # trailing bytes
    return frame, pairs


def full_path(frame: bytes) -> edge.Reply | edge.Violation | None:
    try:
        return edge.parse_reply(codec.decode_map(frame))
    except codec.DecodeError:
        return None


def one_step(frame: bytes) -> Any:
    """What the gateway takes without the full path (its condition)."""
    try:
        fast = edge.decode_success(frame)
    except Exception:  # noqa: BLE001 - refused: the full path decides
        return None
    return fast if fast.ok is True and len(frame) <= edge.MAX_REPLY_BYTES else None


def exact(value: Any) -> bytes:
    """``value`` with every type and key order told apart (1, 1.0, True)."""
    return codec.msgpack_pack(value)


def no_repeats(value: Any) -> bool:
    """No map in ``value`` holds a key twice (then msgpack keeps the last
    value, which the one-step read may take or leave to the full path)."""
    if isinstance(value, Pairs | dict):
        pairs = list(value.items()) if isinstance(value, dict) else list(value)
        keys = [repr(k) for k, _ in pairs]
        return len(set(keys)) == len(keys) and all(no_repeats(v) for _, v in pairs)
    if isinstance(value, list):
        return all(no_repeats(v) for v in value)
    return True


def plain_success(pairs: Pairs) -> bool:
    """Exactly the four fields, string keys, no key twice anywhere: the
    one-step read must take such a frame whenever the full path takes it as
    a success."""
    keys = [k for k, _ in pairs]
    return sorted(k for k in keys if isinstance(k, str)) == sorted(
        ["command_id", "data", "ok", "type"]) and len(keys) == 4 and no_repeats(pairs)


def check(frame: bytes, pairs: Pairs | None) -> str:
    fast, full = one_step(frame), full_path(frame)
    if fast is not None:
        assert isinstance(full, edge.Reply), (frame, full)
        assert (full.ok, full.error) == (True, None)
        assert full.command_id == fast.command_id and type(fast.command_id) is str
        assert exact(full.data) == exact(fast.data), frame
        assert type(fast.data) is dict
        return "fast"
    if pairs is not None and plain_success(pairs) and isinstance(full, edge.Reply) and (
            full.ok):
        pytest.fail(f"a plain success left to the full path: {frame!r}")
    return "full" if isinstance(full, edge.Reply) else "refused"


# poison: how often a field is spoiled; at least so many frames of 3,000 taken
# in one step and refused, so the comparisons are not all of one kind
MIX = {0.0: (2000, 0), 0.1: (500, 500), 0.3: (100, 1500), 0.9: (0, 2500)}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("poison", sorted(MIX))
def test_the_one_step_read_takes_only_what_the_full_checks_take(seed: int,
                                                                 poison: float) -> None:
    takes_only_what_the_full_checks_take(check, reply_pairs, seed * 1000, poison)


def takes_only_what_the_full_checks_take(outcome: Any, pairs: Any, seed: int,
                                         poison: float) -> None:
    """3,000 generated frames (``pairs``, then ``frame_of``) through ``outcome``
    (which compares the one-step read with the full path): at least the
    mix's share of them read in one step, and of them refused."""
    rng = random.Random(seed + int(poison * 10))
    seen = {"fast": 0, "full": 0, "refused": 0}
    for _ in range(3000):
        seen[outcome(*frame_of(pairs(rng, poison), rng, poison))] += 1
    fast, refused = MIX[poison]
    assert seen["fast"] >= fast and seen["refused"] >= refused, seen


@pytest.mark.parametrize("depth", range(1, 14))
@pytest.mark.parametrize("shape", ["list", "map", "mixed"])
def test_data_nested_to_the_bound_and_beyond(depth: int, shape: str) -> None:
    """``depth`` levels of maps and lists, the data map the first."""
    value: Any = 1.5
    for level in range(depth - 1):
        as_list = shape == "list" or (shape == "mixed" and level % 2)
        value = [value] if as_list else {"k": value}
    frame = codec.pack({"type": "result", "command_id": "c", "ok": True, "data": {"d": value}})
    assert check(frame, None) == ("fast" if depth <= edge.MAX_DEPTH else "refused")


BOUNDS: list[tuple[Any, bool]] = [
    (2**63 - 1, True), (2**63, False), (2**64 - 1, False), (-(2**63), True),
    (9223372036854774784.0, True), (2.0**63, False), (-(2.0**63), True),
    (-(2.0**63) - 2048.0, False), (math.nan, False), (math.inf, False), (-math.inf, False),
    (1e308, False), (-0.0, True), (True, True), (None, True), ("", True),
]


@pytest.mark.parametrize("value,taken", BOUNDS, ids=repr)
@pytest.mark.parametrize("place", ["top", "list", "map"])
def test_numbers_at_and_beyond_the_bounds(value: Any, taken: bool, place: str) -> None:
    data = {"top": {"n": value}, "list": {"l": [1, value]}, "map": {"m": {"n": value}}}[place]
    for single in (False, True):
        try:
            frame = msgpack.packb({"type": "result", "command_id": "c", "ok": True,
                                   "data": data}, use_single_float=single)
        except OverflowError:
            continue
        if single and isinstance(value, float) and not math.isnan(value) and (
                msgpack.unpackb(frame)["data"] != data):
            continue  # not held by a float32: another value
        assert check(frame, None) == ("fast" if taken else "refused")


@pytest.mark.parametrize("frame,outcome", [
    # a key twice: msgpack keeps the last, and so must the one-step read
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80\xa2ok\xc2", "refused"),
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc2\xa4data\x80\xa2ok\xc3", "fast"),
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80"
     b"\xa4data\x81\xa1n\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", "refused"),  # the last NaN
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3"
     b"\xa4data\x81\xa1n\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\xa4data\x80", "full"),
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80"
     b"\xaacommand_id\xa0", "refused"),  # the last id empty
    # a repeated key inside data: the last value, in the first place
    (b"\x84\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x83\xa1a\x01\xa1b\x02"
     b"\xa1a\xc3", "fast"),
    # an unknown field holding an ext (the full path refuses it) or bin (it takes it)
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80\xa1x\xd4\x01\x00",
     "refused"),
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80\xa1x\xc4\x01\x00",
     "full"),
    # a bin key at the top, and in data
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80\xc4\x01x\x01", "full"),
    (b"\x84\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x81\xc4\x01x\x01",
     "refused"),
    # not UTF-8 in data, in the id
    (b"\x84\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x81\xa1x\xa2\xff\xfe",
     "refused"),
    (b"\x84\xa4type\xa6result\xaacommand_id\xa3\xed\xa0\x80\xa2ok\xc3\xa4data\x80",
     "refused"),
    # trailing bytes, a map claiming more entries than it has
    (b"\x84\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80\xc0", "refused"),
    (b"\x85\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\x80", "refused"),
    (b"\x84\xa4type\xa6result\xaacommand_id\xa1c\xa2ok\xc3\xa4data\xdf\xff\xff\xff\xff",
     "refused"),
])
def test_odd_frames(frame: bytes, outcome: str) -> None:
    assert check(frame, None) == outcome


def test_a_reply_over_the_size_bound_is_left_to_the_full_path() -> None:
    frame = codec.pack({"type": "result", "command_id": "c", "ok": True,
                        "data": {"x": "y" * edge.MAX_REPLY_BYTES}})
    assert edge.decode_success(frame).ok is True  # readable, but not taken:
    assert one_step(frame) is None  # the gateway names it too large


# -- domain events ------------------------------------------------------------

EVENT_FIELDS = ("event_id", "system", "order_id", "name")
EVENT_TYPES: list[Any] = ["event", "event", "Event", "result", "", b"event", None, 1]


def event_pairs(rng: random.Random, poison: float) -> Pairs:
    def pick(options: list[Any]) -> Any:
        return rng.choice(options) if rng.random() < poison else options[0]

    pairs = Pairs([("type", pick(EVENT_TYPES))])
    for key in EVENT_FIELDS:
        pairs.append((key, pick([f"{key}-1", *COMMAND_IDS[1:]])))
    roll = rng.random()
    if roll < 0.1:
        pairs.append(("data", deep(rng.randint(1, 12), rng)))
    elif roll < 0.15 and poison:
        pairs.append(("data", rng.choice([None, [], "data", 1, b"", msgpack.ExtType(1, b"")])))
    elif roll < 0.9:  # else no data: an empty map
        pairs.append(("data", data_map(rng, rng.randint(1, 9), poison)))
    if rng.random() < poison:
        pairs.append((rng.choice(["ok", "command_id", *EXTRA]), junk(rng, 2, poison)))
    if rng.random() < poison / 2:
        del pairs[rng.randrange(len(pairs))]
    if rng.random() < poison / 2:
        pairs.append(rng.choice(pairs[:5] or [("name", "n")])[:1] + (junk(rng, 2, poison),))
    if rng.random() < poison / 3:
        pairs.append((rng.choice([b"name", 1, None]), "x"))
    rng.shuffle(pairs)
    return pairs


def event_outcome(frame: bytes, pairs: Pairs | None) -> str:
    try:
        fast = edge.decode_event(frame)
    except Exception:  # noqa: BLE001 - refused: the full path decides
        fast = None
    try:
        full = edge.parse_event(codec.decode_map(frame))
    except codec.DecodeError:
        full = None
    if fast is not None:
        assert isinstance(full, edge.Event), (frame, full)
        assert tuple(getattr(fast, f) for f in EVENT_FIELDS) == full[:4]
        assert all(type(getattr(fast, f)) is str for f in EVENT_FIELDS)
        assert exact(full.data) == exact(fast.data) and type(fast.data) is dict, frame
        return "fast"
    if pairs is not None and isinstance(full, edge.Event):
        keys = [k for k, _ in pairs]
        plain = {"type", *EVENT_FIELDS}
        if all(isinstance(k, str) for k in keys) and set(keys) in (plain, {*plain, "data"}) and (
                no_repeats(pairs)):
            pytest.fail(f"a plain event left to the full path: {frame!r}")
    return "full" if isinstance(full, edge.Event) else "refused"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("poison", sorted(MIX))
def test_the_one_step_event_read_takes_only_what_the_full_checks_take(
        seed: int, poison: float) -> None:
    takes_only_what_the_full_checks_take(event_outcome, event_pairs, seed * 7919, poison)


@pytest.mark.parametrize("depth", range(1, 12))
def test_event_data_nested_to_the_bound_and_beyond(depth: int) -> None:
    value: Any = "leaf"
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    frame = codec.pack({"type": "event", "event_id": "e", "system": "warehouse",
                        "order_id": "o", "name": "n", "data": {"d": value}})
    assert event_outcome(frame, None) == ("fast" if depth <= edge.MAX_DEPTH else "refused")


@pytest.mark.parametrize("value,taken", BOUNDS, ids=repr)
def test_event_numbers_at_and_beyond_the_bounds(value: Any, taken: bool) -> None:
    frame = codec.pack({"type": "event", "event_id": "e", "system": "warehouse",
                        "order_id": "o", "name": "n", "data": {"l": [value]}})
    assert event_outcome(frame, None) == ("fast" if taken else "refused")


def test_an_event_without_data_has_an_empty_map_of_its_own() -> None:
    frame = codec.pack({"type": "event", "event_id": "e", "system": "warehouse",
                        "order_id": "o", "name": "n"})
    first, second = edge.decode_event(frame), edge.decode_event(frame)
    assert first.data == {} and first.data is not second.data
    assert event_outcome(frame, None) == "fast"
