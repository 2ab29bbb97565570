"""The operator's signals to ``oms serve``, from its first line of Python on.

SIGTERM and SIGINT mean "drain and stop" (exit 0); SIGHUP means "read the
CURVE client keys again" (docs/operations.md). Python's own default for
SIGHUP ends the process, and SIGTERM's ends it without a word: before the
service had installed its handlers (about half a second of imports and
settings), a SIGHUP killed ``oms serve`` (and, sharded, a shard or the
front). So ``guard`` is the first thing ``oms serve`` does (``app.cli``,
before its imports): from then on a signal only sets a flag, and the
command acts on it when it can. A SIGHUP before the service is ready is
applied once it is (the keys read again, logged); a SIGTERM before or
during the start (recovery included) stops it without opening the intake
(``app.recovery.Interrupted``).

The few milliseconds before the interpreter runs any of our code cannot be
covered from inside; a parent can: ``block_hup`` (``preexec_fn`` of the
sharded supervisor's children) blocks SIGHUP across ``exec``, the kernel
keeps one pending, and ``guard`` (or the front's handler) unblocks it once
a handler is in place, which then gets it.
"""

from __future__ import annotations

import signal

from actors.flags import Flag

STOP = Flag()  # SIGTERM or SIGINT: drain and stop
RELOAD = Flag()  # SIGHUP: read the client keys again, once the service is ready


def _stop(*_: object) -> None:
    STOP.set()


def _reload(*_: object) -> None:
    RELOAD.set()


def guard() -> tuple[Flag, Flag]:
    """Install the flag-setting handlers (again is harmless) and let a SIGHUP
    that a parent blocked through; returns (stop, reload). Main thread only."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    unblock_hup()
    return STOP, RELOAD


def unblock_hup() -> None:
    """SIGHUP delivered again (one kept pending while blocked arrives now)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def block_hup() -> None:  # pragma: no cover - runs in a forked child, before exec
    """For a child's ``preexec_fn``: SIGHUP stays pending until the child's
    handler is in place (a blocked signal's mask survives ``exec``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
