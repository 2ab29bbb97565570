"""The codec: bounded decoding of untrusted frames."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oms import codec


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
