"""What a gateway logs about its commands: a timeout, a refusal, a reply
that breaks the contract. One line each would flood the log when a system
stops answering (every command in flight times out at once) or refuses
everything: each kind (with its op) is bounded by ``LogThrottle``, the
first ``BURST`` a second logged one by one with their order_id and
command_id, the rest counted in one summary line ("240 more timeouts from
billing to capture_payment in the last 1.0 s"). The metrics count every
one (``oms_gateway_timeouts_total``, ``oms_step_seconds``).

A refusal that is a business outcome (``BUSINESS``: the stock is out, the
card declined) is logged at ``info``: it is the order's answer, shown on
the order and counted in ``oms_step_seconds{outcome}``, not a fault to look
into. Any other refusal (retryable, or a code not known here) is a warning.
"""

from __future__ import annotations

import logging
from typing import Any

from actors.throttle import LogThrottle
from oms.errors import DomainError

BURST = 10  # lines of a kind logged one by one a second
BUSINESS = frozenset({"out_of_stock", "payment_declined", "invalid_address", "unknown_service"})


class GatewayLog(LogThrottle):
    """A gateway's throttled log lines (``LogThrottle``, kinds per op)."""

    def __init__(self, logger: logging.Logger, system: str) -> None:
        super().__init__(logger, 1.0, BURST, extra={"system": system})
        self.system = system

    def timed_out(self, op: str, order_id: str, command_id: str) -> None:
        system = self.system
        self.report(("timeout", op), "no reply from %s to %s within its timeout", system, op,
                    summary=f"timeouts from {system} to {op}", extra={
                        "order_id": order_id, "command_id": command_id, "system": system})

    def refused(self, op: str, outcome: str, error: DomainError, order_id: str,
                command_id: str) -> None:
        """``outcome``: the error's code, bounded (a code a system invents is
        ``other``), so the kinds stay a bounded set."""
        system = self.system
        level = logging.INFO if error.code in BUSINESS else logging.WARNING
        self.report(("refused", op, outcome), "%s refused %s: %s %s", system, op, error.code,
                    error.message, level=level,
                    summary=f"{outcome} refusals from {system} to {op}", extra={
                        "order_id": order_id, "command_id": command_id, "system": system})

    def broke_contract(self, reason: str, message: str, order_id: str | None,
                       command_id: str | None) -> None:
        """``reason``: ``oms.edge.Violation.reason``, a bounded set."""
        system = self.system
        extra: dict[str, Any] = {"system": system, "command_id": command_id,
                                 "order_id": order_id}
        self.report(("invalid", reason), "%s sent a reply that breaks the contract (%s): %s",
                    system, reason, message, extra=extra,
                    summary=f"replies from {system} that break the contract ({reason})")
