"""The codec: bounded decoding of untrusted frames."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from oms import codec
from oms.order_rules import MAX_ATTR_DEPTH
from oms.sample import sample_orders
from oms.validation import validate_order


def test_round_trip_map() -> None:
    assert codec.decode_map(codec.pack({"a": [1, "b", None]})) == {"a": [1, "b", None]}


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x92\x01", codec.pack([1, 2]), codec.pack("str"), b"\x81\x01\x02",
    b"\xd4\x01\x02", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\x91" * 5000,
    b"\x81\xa1a\xa2\xff\xfe",
])
def test_hostile_frames_raise_decode_error(frame: bytes) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_map(frame)


def test_ext_types_refused() -> None:
    frame = msgpack.packb({"a": msgpack.ExtType(5, b"x")})
    with pytest.raises(codec.DecodeError, match="ext"):
        codec.decode_map(frame)


def test_digest_ignores_key_order() -> None:
    assert codec.digest({"a": 1, "b": {"x": 1, "y": 2}}) == codec.digest(
        {"b": {"y": 2, "x": 1}, "a": 1})
    assert codec.digest({"a": 1}) != codec.digest({"a": 2})


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=6),
    max_leaves=30)


@given(values)
@settings(max_examples=400, deadline=None)
def test_fast_encoder_writes_exactly_what_msgpack_writes(value: object) -> None:
    """Snapshots and wire payloads go through msgspec; its bytes are msgpack's
    bytes, so old and new records, and the digest, never disagree."""
    assert codec.pack(value) == codec.msgpack_pack(value)


@pytest.mark.parametrize(("value", "error"), [
    ({"a": 2**64}, OverflowError), ({"a": -(2**63) - 1}, OverflowError),
    ({"a": object()}, TypeError), ({1.5: "x"}, None),
])
def test_a_value_msgpack_refuses_fails_with_msgpack_error(value: object, error: type) -> None:
    if error is None:
        assert codec.pack(value) == codec.msgpack_pack(value)
        return
    with pytest.raises(error):
        codec.msgpack_pack(value)
    with pytest.raises(error):
        codec.pack(value)


_reused = bytearray(256)


@given(values)
@settings(max_examples=300, deadline=None)
def test_pack_into_a_reused_buffer_writes_what_pack_writes(value: object) -> None:
    """The gateways and the publisher encode into one buffer each, reused from
    a larger message to a smaller one and back: the bytes sent are ``pack``'s."""
    assert bytes(codec.pack_into(value, _reused)) == codec.pack(value)
    assert bytes(codec.pack_into({"big": "x" * 1000}, _reused)) == codec.pack({"big": "x" * 1000})


@pytest.mark.parametrize(("value", "error"), [
    ({"a": 2**64}, OverflowError), ({"a": object()}, TypeError), ({1.5: "x"}, None),
])
def test_pack_into_fails_as_pack_does(value: object, error: type) -> None:
    buffer = bytearray(b"before")
    if error is None:
        assert bytes(codec.pack_into(value, buffer)) == codec.msgpack_pack(value)
        return
    with pytest.raises(error):
        codec.pack_into(value, buffer)


@given(values)
@settings(max_examples=300, deadline=None)
def test_fast_decoder_reads_what_msgpack_reads(value: object) -> None:
    data = codec.msgpack_pack(value)
    assert repr(codec.unpack(data)) == repr(msgpack.unpackb(data, raw=False,
                                                            strict_map_key=False))


keyed = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=6) | st.binary(max_size=3) | st.integers(0, 9), inner, max_size=6),
    max_leaves=30)


@given(keyed)
@settings(max_examples=400, deadline=None)
def test_digest_bytes_are_the_reference_canonical_encoding(value: object) -> None:
    """The digest of a stored order must never change: the fast sorted
    encoding is byte for byte msgpack of ``canonical`` (any key types)."""
    assert codec.canonical_bytes(value) == codec.msgpack_pack(codec.canonical(value))


def _explicit_bounds(data: bytes) -> Any:
    """``decode_map`` as it was: msgpack alone, every bound spelled out."""
    limit = len(data)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=codec._refuse_ext,
                              max_str_len=limit, max_bin_len=limit, max_array_len=limit,
                              max_map_len=limit // 2, max_ext_len=0)
    except codec.DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise codec.DecodeError(f"not decodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise codec.DecodeError(f"payload must be a msgpack map, got {type(obj).__name__}")
    return obj


def _outcome(decode: Any, frame: bytes) -> str:
    """The map decoded, or the message of the ``DecodeError`` (it is sent
    back to the client in a ``malformed`` error)."""
    try:
        return repr(decode(frame))
    except codec.DecodeError as exc:
        return f"DecodeError: {exc}"


HEADERS = [b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xd9", b"\xda", b"\xdb", b"\xc4", b"\xc5",
           b"\xc6", b"\xc7", b"\xc8", b"\xc9", b"\xd4", b"\xd8"]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("claimed", [0, 1, 5, 6, 7, 11, 12, 13, 2**16 - 1, 2**32 - 1])
def test_bounds_are_the_frames_length(header: bytes, claimed: int) -> None:
    """A header claiming a length about the frame's (or 4 G) fails or
    decodes exactly as with every bound passed: the bounds are unpackb's
    defaults (strings, bins, arrays: the frame's length; maps: half)."""
    width = {b"\xdc": 2, b"\xde": 2, b"\xda": 2, b"\xc5": 2, b"\xc8": 2, b"\xd9": 1,
             b"\xc4": 1, b"\xc7": 1}.get(header, 4)
    size = claimed.to_bytes(8, "big")[-width:] if header not in (b"\xd4", b"\xd8") else b""
    for body in (b"", b"\x00" * 6, b"\xa1a\x01" * 4):
        frame = header + size + body
        assert _outcome(codec.decode_map, frame) == _outcome(_explicit_bounds, frame)
        assert _outcome(codec.decode_map, b"\x81\xa1k" + frame) == _outcome(
            _explicit_bounds, b"\x81\xa1k" + frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40) | st.builds(lambda h, b: h + b, st.sampled_from(HEADERS),
                                          st.binary(max_size=30)))
def test_random_frames_decode_as_with_explicit_bounds(frame: bytes) -> None:
    assert _outcome(codec.decode_map, frame) == _outcome(_explicit_bounds, frame)


wire = st.recursive(  # what a client may send: also bin, ext, int keys, float32, deep
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6) | st.binary(max_size=3) | st.integers(0, 3), inner, max_size=5),
    max_leaves=40)


@given(st.dictionaries(st.text(max_size=6), wire, max_size=5), st.booleans())
@settings(max_examples=600, deadline=None)
def test_decode_map_reads_what_msgpack_alone_reads(value: dict[str, Any], single: bool) -> None:
    """msgspec's typed read, when it succeeds, gives what msgpack gives from
    the same bytes (the same values of the same types, keys in the same
    order); when msgpack refuses a frame, the same error."""
    try:
        frame = msgpack.packb(value, use_single_float=single)
    except OverflowError:  # a float beyond float32
        assume(False)
    assert _outcome(codec.decode_map, frame) == _outcome(_explicit_bounds, frame)


def _nested(depth: int) -> dict[str, Any]:
    """Maps and lists ``depth`` levels deep (a map on top), a string inside."""
    value: Any = "leaf"
    for n in range(depth - 1):
        value = [value] if n % 2 else {"k": value}
    return {"top": value}


@pytest.mark.parametrize("frame", [
    b"\x82\xa1a\x01\xa1a\x02",  # a key twice: the last value, in the first place
    b"\x83\xa1a\x01\xa1b\x02\xa1a\xc3",
    b"\x81\xa1a\xa3\xed\xa0\x80",  # a surrogate in UTF-8: refused
    b"\x81\xa1a\xa2\xc0\x80",  # an overlong encoding: refused
    b"\x81\xa1a\xa4\xf4\x90\x80\x80",  # beyond U+10FFFF: refused
    b"\x81\xa1a\xd6\xff\x00\x00\x00\x00",  # a timestamp ext: refused
    b"\x81\xa1a\xc7\x00\x05",  # an empty ext: refused by its hook
    b"\x81\xa1a\xc7\x00\xff",  # an empty ext of a reserved type
    b"\x81\xa1a\xca\x7f\xc0\x00\x00",  # float32 NaN
    b"\x81\xa1a\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # 2^64 - 1
    b"\x81\xa1a\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # -2^63
    b"\x81\xa1a\xdd\xff\xff\xff\xff",  # an array of 4 G claimed
    b"\x81\xa1a\xc0\xc0",  # trailing bytes
    b"\x81\xc4\x01a\x01",  # a bin key: msgpack reads it
    *(codec.pack(_nested(depth)) for depth in (11, 12, 13, 15, 16, 17, 40)),
])
def test_odd_frames_decode_as_with_msgpack_alone(frame: bytes) -> None:
    assert _outcome(codec.decode_map, frame) == _outcome(_explicit_bounds, frame)


def test_plain_frames_take_the_typed_read() -> None:
    """The bench's frames (an order, a reply) are read by msgspec: the
    comparisons above are not all msgpack against itself."""
    order = {"type": "submit_order", "request_id": 7, "order": {
        "source_system": "web", "items": [{"id": "a", "quantity": 2, "price": 1.5}],
        "attributes": {"gift": True, "note": None}}}
    reply = {"type": "result", "command_id": "O1:reserve", "ok": True, "data": {"id": "r-1"}}
    for value in (order, reply, _nested(codec.PLAIN_DEPTH)):
        assert codec._decode_plain is not None
        assert codec._decode_plain(codec.pack(value)) == value == codec.decode_map(
            codec.pack(value))


def _deep_order(levels: int) -> dict[str, Any]:
    """A submit_order whose item ``attributes`` nest ``levels`` deep, counting
    their values (the innermost a number: a map or list, even empty, may
    only be a level above it)."""
    attrs: Any = 1
    for n in range(levels - 2):
        attrs = {"k": attrs} if n % 2 else [attrs]
    order = next(iter(sample_orders(1, seed=3)))
    order["items"][0]["attributes"] = {"top": attrs}
    return {"type": "submit_order", "request_id": 1, "order": order}


def test_the_deepest_order_validation_accepts_takes_the_typed_read() -> None:
    """``PLAIN_DEPTH`` is as deep as intake needs and no deeper (msgspec's
    decoder costs double for each level more at every process's start):
    the most deeply nested order that validation accepts is read by
    msgspec; one level more is read by msgpack, to the same result."""
    req = _deep_order(MAX_ATTR_DEPTH)
    order, problems = validate_order(req["order"], ["retail"])
    assert order is not None, problems
    too_deep, problems = validate_order(_deep_order(MAX_ATTR_DEPTH + 1)["order"], ["retail"])
    assert too_deep is None and "nested deeper" in problems[0].message
    frame = codec.pack(req)
    assert codec._decode_plain is not None
    assert codec._decode_plain(frame) == req == codec.decode_map(frame)
    deeper = {"wrap": req}
    with pytest.raises(msgspec.ValidationError):  # too deep for its type
        codec._decode_plain(codec.pack(deeper))
    assert codec.decode_map(codec.pack(deeper)) == deeper
