"""Messages an order receives and effects it asks for.

The engine (``oms.engine``) turns one message into a list of effects; the
order actor persists the new snapshot and only then carries the effects out.
All are small immutable types.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from oms.errors import DomainError

# --- messages to an order -------------------------------------------------


class Start(NamedTuple):
    """Begin the process of a freshly acknowledged order."""


class Resume(NamedTuple):
    """After a restart or reactivation: re-send unanswered commands and
    re-arm timers from the persisted snapshot."""


class Turn(NamedTuple):
    """From the sequencer. go: the order may run now; False: it must wait."""

    go: bool


class CommandResult(NamedTuple):
    """A domain system's answer (or the gateway's timeout) to a command.

    command_id: the idempotency key the command was sent with.
    ok: whether the domain system applied it.
    data: the result map when ok.
    error: why not, when not ok.
    data_fit: True only from a gateway that found ``data`` fit to keep at
      the edge (``oms.edge.fit_to_keep``): the engine skips its own check
      of it (``oms.untrusted.data_problem``). From anywhere else, False:
      the engine checks.
    """

    command_id: str
    ok: bool
    data: dict[str, Any] | None = None
    error: DomainError | None = None
    data_fit: bool = False


class DomainEvent(NamedTuple):
    """An asynchronous event a domain system pushed for this order.

    event_id: the domain system's id for it (already recorded durably).
    system: which domain system sent it.
    name: e.g. ``stock_reserved``, ``shipment_delivered``.
    data: its payload map.
    """

    event_id: str
    system: str
    name: str
    data: dict[str, Any]


class TimerFired(NamedTuple):
    """A timer the order armed has come due. token: what it was for."""

    token: tuple[Any, ...]


class Cancel(NamedTuple):
    """A channel asks to cancel. reply_to: where the answer goes; operator:
    who, when an operator cancels (recorded in the history)."""

    reason: str | None
    reply_to: Any = None
    operator: str | None = None


class Operate(NamedTuple):
    """An operator acts on an order.

    action: "retry" (run the failed step again), "skip" (mark it done and go
      on) or "abort" (compensate, then failed).
    step: the step, for "skip" (default: the failed one).
    operator: who, for the history.
    reason: why, for the history.
    """

    action: str
    step: str | None
    operator: str
    reason: str | None
    reply_to: Any = None


# --- effects an order asks for --------------------------------------------


class Send(NamedTuple):
    """Send a command to a domain system (after the intent is persisted).

    raw: ``args`` as the step keeps them (``oms.model.kept``: their msgpack
    bytes), when the engine has them: the gateway sends these bytes instead
    of encoding the map again (the same bytes, by construction)."""

    system: str
    command_id: str
    op: str
    args: dict[str, Any]
    timeout_s: float
    raw: msgspec.Raw | None = None


class Publish(NamedTuple):
    """Publish a channel event (contract §2). payload: the event map."""

    payload: dict[str, Any]


class Timer(NamedTuple):
    """Deliver ``TimerFired(token)`` to this order at ``at`` (epoch s)."""

    at: float
    token: tuple[Any, ...]


class Reply(NamedTuple):
    """Answer a request that came with a ``reply_to``."""

    reply_to: Any
    payload: dict[str, Any]


class Sequence(NamedTuple):
    """Ask the sequencer for a turn (enter=True) or give the turn up."""

    key: str
    enter: bool


Effect = Send | Publish | Timer | Reply | Sequence
"""Any effect the engine returns (``oms.engine.Turning.effects``)."""
