"""The one place where msgpack options live.

Every wire payload is one msgpack frame holding a map with string keys
(contract: "Encoding and transport"). Decoding is bounded so that a hostile
frame cannot allocate more than the frame itself allows, and ext types are
refused.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import msgpack

MAX_FRAME_BYTES = 1024 * 1024
"""Largest request frame the contract accepts (1 MiB)."""


class DecodeError(ValueError):
    """A frame that is not one msgpack map with string keys."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


_local = threading.local()


def pack(obj: Any) -> bytes:
    """Encode a map (or any msgpack-able value) to bytes.

    One ``Packer`` per thread, reused: ``msgpack.packb`` builds a new one
    per call, a fifth of the cost of a snapshot. (A Packer resets its buffer
    when ``pack`` fails, so a bad value does not spoil the next call.)
    """
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def unpack(data: bytes) -> Any:
    """Decode trusted bytes we wrote ourselves (store records)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_map(data: bytes) -> dict[str, Any]:
    """Decode one untrusted frame into a map with string keys.

    Lengths are bounded by the frame size; nesting is bounded by msgpack's
    own stack; ext types and integer keys are refused. Binary (bytes) keys
    get through msgpack's ``strict_map_key``: maps from outside are checked
    for them at the edge (``oms.edge.check_data``, ``oms.validation``).
    """
    limit = len(data)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit // 2,
            max_ext_len=0,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not decodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"payload must be a msgpack map, got {type(obj).__name__}")
    return obj


def canonical(obj: Any) -> Any:
    """Sort map keys recursively so equal maps encode to equal bytes."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    return obj


def digest(obj: Any) -> bytes:
    """A 16-byte fingerprint of a map, independent of key order."""
    return hashlib.blake2b(pack(canonical(obj)), digest_size=16).digest()
