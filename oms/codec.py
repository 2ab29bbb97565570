"""The one place where msgpack options live.

Every wire payload is one msgpack frame holding a map with string keys
(contract: "Encoding and transport"). Decoding is bounded so that a hostile
frame cannot allocate more than the frame itself allows, and ext types are
refused.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import msgpack

try:  # about 2.5x cheaper than msgpack's Packer for a snapshot (docs/performance.md)
    import msgspec
except ImportError:  # pragma: no cover - msgspec is a dependency; msgpack is the fallback
    msgspec = None  # type: ignore[assignment]

MAX_FRAME_BYTES = 1024 * 1024
"""Largest request frame the contract accepts (1 MiB)."""


class DecodeError(ValueError):
    """A frame that is not one msgpack map with string keys."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


_local = threading.local()


_encode = msgspec.msgpack.Encoder().encode if msgspec is not None else None


def pack(obj: Any) -> bytes:
    """Encode a map (or any msgpack-able value) to bytes: every wire
    payload and store value (a snapshot record: ``oms.snapshot.encode``).

    msgspec's encoder writes the same msgpack as ``msgpack_pack`` (the same
    smallest forms, float64, bin for bytes) at about 40 % of its cost. A
    value it refuses is given to ``msgpack_pack``, so a bad value fails with
    msgpack's own error (``TypeError``, ``ValueError``, ``OverflowError``)
    as callers expect.
    """
    if _encode is not None:
        try:
            return _encode(obj)
        except Exception:  # noqa: BLE001, S110 - msgpack decides, and raises its own error
            pass
    return msgpack_pack(obj)


def _no_encode_into(obj: Any, buffer: bytearray) -> None:  # pragma: no cover - no msgspec
    raise TypeError("msgspec is not installed")


encode_into: Callable[[Any, bytearray], None] = (
    msgspec.msgpack.Encoder().encode_into if msgspec is not None else _no_encode_into)
"""msgspec's ``encode_into`` itself, the first try of ``pack_into``: for a
hot caller (the publisher's events, the gateways' commands: 19 an order)
that calls it inline and, if it raises, ``pack_into``, which decides (the
same bytes, or msgpack's own error), without a Python frame for the common
case."""


def pack_into(obj: Any, buffer: bytearray) -> bytearray:
    """``pack(obj)`` written into ``buffer`` (resized to fit) and returned:
    the same bytes, without a new bytes object, for a caller that sends them
    at once (a copying send) and reuses its buffer (the gateways' commands,
    the publisher's events: 19 an order). Fails as ``pack`` does."""
    try:
        encode_into(obj, buffer)
        return buffer
    except Exception:  # noqa: BLE001, S110 - msgpack decides, and raises its own error
        pass
    buffer[:] = msgpack_pack(obj)
    return buffer


def msgpack_pack(obj: Any) -> bytes:
    """Encode with msgpack's ``Packer``: the reference encoding (``digest``).

    One ``Packer`` per thread, reused: ``msgpack.packb`` builds a new one
    per call, a fifth of the cost of a snapshot. (A Packer resets its buffer
    when ``pack`` fails, so a bad value does not spoil the next call.)
    """
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


_decode = msgspec.msgpack.Decoder().decode if msgspec is not None else None


def unpack(data: bytes) -> Any:
    """Decode trusted bytes we wrote ourselves (store records): msgspec
    where it can (about 60 % of msgpack's cost), else msgpack."""
    if _decode is not None:
        try:
            return _decode(data)
        except Exception:  # noqa: BLE001, S110 - msgpack decides, and raises its own error
            pass
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


_unpackb = msgpack.unpackb
PLAIN_DEPTH = 11
"""Nesting of the frames ``decode_map`` reads with msgspec's typed decoder
(deeper ones are read by msgpack): an item's ``attributes`` hold maps and
lists 7 levels deep at most (their values may be at level 8,
``oms.order_rules.check_free_map``) below the request's 4 (request, order,
items, item), a reply's ``data`` at most 8 below its 2. No deeper: msgspec
builds the decoder's type in time and memory that double with each level
(12: about 20 ms; 16 took 0.45 s of every process's start, the CLI's
included)."""


def _plain_map(depth: int) -> Any:
    """The type of a str-keyed map of plain msgpack values nested up to
    ``depth`` levels: nil, bool, int, float, str, and arrays and str-keyed
    maps of those (not bin, not ext: msgspec's unions hold one str-like
    type). Built at run time (a type checker sees ``Any``)."""
    scalar: Any = None | bool | int | float | str
    value = scalar
    for _ in range(depth - 1):
        value = scalar | list.__class_getitem__(value) | dict.__class_getitem__((str, value))
    return dict.__class_getitem__((str, value))


_decode_plain = (msgspec.msgpack.Decoder(_plain_map(PLAIN_DEPTH)).decode
                 if msgspec is not None else None)


def decode_map(data: bytes) -> dict[str, Any]:
    """Decode one untrusted frame into a map with string keys.

    Lengths are bounded by the frame size; nesting is bounded by msgpack's
    own stack; ext types and integer keys are refused. Binary (bytes) keys
    get through msgpack's ``strict_map_key``: a client's request is read by
    ``decode_request``, which refuses them; a domain system's maps are
    checked at the edge (``oms.edge.check_data``).

    Most frames are read by msgspec, typed as a map of plain values (nil,
    bool, int, float, str, arrays and str-keyed maps, ``PLAIN_DEPTH``
    deep), at about half msgpack's cost. What it decodes is what msgpack
    decodes from the same bytes, every bound met (a map of n entries takes
    at least 2n bytes, a string or array of n at least n); anything else
    (bin, ext, other keys, deeper, malformed) it refuses, and msgpack
    decides, and names the error (``tests/test_codec.py`` compares the two).

    msgpack's bounds are ``unpackb``'s own defaults, not passed (each
    keyword costs): ``raw=False``, ``strict_map_key=True``, strings, bins
    and arrays at most ``len(data)`` long, maps at most ``len(data) // 2``.
    ``max_ext_len=0`` refuses every ext with a payload before its hook runs.
    """
    if _decode_plain is not None:
        try:
            return _decode_plain(data)
        except Exception:  # noqa: BLE001, S110 - msgpack decides, and names the error
            pass
    return _decode_msgpack(data)


def _decode_msgpack(data: bytes) -> dict[str, Any]:
    """``decode_map``'s msgpack read: what msgspec's typed read refused."""
    try:
        obj = _unpackb(data, ext_hook=_refuse_ext, max_ext_len=0)
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not decodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"payload must be a msgpack map, got {type(obj).__name__}")
    return obj


def decode_request(data: bytes) -> dict[str, Any]:
    """``decode_map`` for a client's request (the intake, the front): a
    binary (bin) map key anywhere is a ``DecodeError`` too, as the contract
    says keys are strings ("Encoding and transport"): 1.4 took them, ignored
    one at the top and named one in an ``order`` as ``b'colour'``. Only a
    frame msgspec's typed read refuses (it takes no bin) is walked."""
    if _decode_plain is not None:
        try:
            return _decode_plain(data)
        except Exception:  # noqa: BLE001, S110 - msgpack decides, and names the error
            pass
    obj = _decode_msgpack(data)
    path = binary_key_path(obj)
    if path is not None:
        raise DecodeError(f"map keys must be strings, not binary (bin): {path[:200]}")
    return obj


def binary_key_path(obj: Any) -> str | None:
    """Where the first binary map key lies in ``obj`` (``order.items[0].x``,
    the bytes shown as UTF-8 with ``\\xNN`` escapes), or None. Iterative:
    msgpack nests deeper than Python recurses."""
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(key, bytes):
                    name = key.decode("utf-8", "backslashreplace")
                    return f"{path}.{name}" if path else name
                todo.append((f"{path}.{key}" if path else str(key), inner))
        elif isinstance(value, list):
            todo.extend((f"{path}[{k}]", inner) for k, inner in enumerate(value))
    return None


def canonical(obj: Any) -> Any:
    """Sort map keys recursively so equal maps encode to equal bytes."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    return obj


_encode_sorted = (msgspec.msgpack.Encoder(order="sorted").encode if msgspec is not None
                  else None)


def canonical_bytes(obj: Any) -> bytes:
    """``msgpack_pack(canonical(obj))``: msgspec sorts the keys while it
    encodes (same bytes: it sorts str keys by code point, as ``sorted``
    does; a map with a key that is not a str goes the slow way)."""
    if _encode_sorted is not None:
        try:
            return _encode_sorted(obj)
        except Exception:  # noqa: BLE001, S110 - the reference path decides
            pass
    return msgpack_pack(canonical(obj))


def digest(obj: Any) -> bytes:
    """A 16-byte fingerprint of a map, independent of key order."""
    return hashlib.blake2b(canonical_bytes(obj), digest_size=16).digest()
