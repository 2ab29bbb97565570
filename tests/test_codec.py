"""The codec: bounded decoding of untrusted frames."""

from __future__ import annotations

import msgpack
import pytest

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
