"""Errors that cross the wire as data: a code, a message, retryable or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Intake error codes (contract §1).
MALFORMED = "malformed"
UNKNOWN_TYPE = "unknown_type"
TOO_LARGE = "too_large"
BUSY = "busy"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
INTERNAL = "internal"

# Domain error codes the service itself produces (contract §3).
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
CIRCUIT_OPEN = "circuit_open"  # the gateway's breaker is open: wait, do not spend attempts
INVALID_REPLY = "invalid_reply"  # a reply that breaks the contract (oms.edge): retryable


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure.

    field: path into the request, e.g. ``items[0].quantity``.
    message: what is wrong, for a person.
    """

    field: str
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class DomainError:
    """A domain system's refusal or a transport failure.

    code: machine-readable reason (``payment_declined``, ``timeout`` ...).
    message: for a person.
    retryable: whether the same command may succeed if sent again.
    """

    code: str
    message: str
    retryable: bool

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    @classmethod
    def from_wire(cls, raw: Any) -> DomainError:
        if not isinstance(raw, dict):
            return cls("invalid_reply", f"error is not a map: {raw!r:.100}", False)
        return cls(
            str(raw.get("code", "unknown")),
            str(raw.get("message", "")),
            bool(raw.get("retryable", False)),
        )


def error_reply(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    """An intake ``error`` reply map."""
    reply: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        reply["request_id"] = request_id
    return reply
