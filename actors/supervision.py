"""Supervision: the service-thread half of the one failure rule.

(The order half is ``OrderRouter.crashed``; both are described in
docs/architecture.md, "Failure rule".)

- An unexpected error while a service thread or loop actor handles *one*
  message, frame, timer or request: ``survived`` logs it with its traceback
  and counts it (``oms_internal_errors_total{component}``); the thread goes
  on with the next one.
- A service thread or loop actor that ends anyway (its loop raised, or it
  stopped while the service was not stopping): ``died`` logs which
  component died, CRITICAL, and ends the process at once with status 70, so
  that its supervisor (systemd, Kubernetes) restarts it and recovery takes
  over. A process with a dead thread never limps on, and ``/readyz`` says
  "not ready" from the moment a component is dead.

Every service thread runs its loop inside ``guarded`` (plain threads) or
``actors.loop.LoopActor._actor_loop`` (loop actors), which call ``died``.
The supervisor in charge is the running service's (``install``); tests
pass their own ``exit`` function, as they pass a clock.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from actors.metrics import Metrics

logger = logging.getLogger(__name__)

EXIT_COMPONENT_DIED = 70  # EX_SOFTWARE, as the store writer's fatal exit


def hard_exit(status: int) -> None:
    """End the process now: no clean-up that could hang on the dead part.
    Everything acknowledged is already committed; recovery resumes the rest."""
    logging.shutdown()
    os._exit(status)


class Supervisor:
    def __init__(self, metrics: Metrics | None = None,
                 exit: Callable[[int], None] | None = hard_exit) -> None:  # noqa: A002
        self.metrics = metrics
        self.exit = exit
        self.dead: list[str] = []
        self.stopping = False  # the service is stopping: threads ending is normal

    def survived(self, component: str, exc_info: Any = None) -> None:
        """One message failed; the component carries on."""
        logger.error("%s: unexpected error handling one message; carrying on", component,
                     exc_info=exc_info or sys.exc_info())
        if self.metrics is not None:
            self.metrics.internal_errors.labels(component).inc()

    def died(self, component: str, exc_info: Any = None) -> None:
        """A component's thread ended while the service runs: exit non-zero."""
        if self.stopping:
            return
        self.dead.append(component)
        logger.critical("component %s died; the process exits with status %d so that its "
                        "supervisor restarts it (recovery resumes every order)", component,
                        EXIT_COMPONENT_DIED, exc_info=exc_info)
        if self.metrics is not None:
            self.metrics.internal_errors.labels(component).inc()
        if self.exit is not None:
            self.exit(EXIT_COMPONENT_DIED)


_current: Supervisor | None = None  # outside a service (unit tests, simulators): none


def current() -> Supervisor | None:
    return _current


def install(supervisor: Supervisor | None) -> Supervisor | None:
    """Make ``supervisor`` the one in charge; returns the previous one."""
    global _current
    previous, _current = _current, supervisor
    return previous


def survived(supervisor: Supervisor | None, component: str, exc_info: Any = None) -> None:
    """``supervisor.survived``, or a plain log line when there is none."""
    if supervisor is not None:
        supervisor.survived(component, exc_info)
    else:
        logger.error("%s: unexpected error handling one message", component,
                     exc_info=exc_info or sys.exc_info())


def guarded(component: str, run: Callable[[], None]) -> Callable[[], None]:
    """A thread target reporting to the supervisor in charge when it is made:
    its component died if ``run`` raises, or returns while the service runs."""
    supervisor = current()
    if supervisor is None:
        return run

    def target() -> None:
        try:
            run()
        except BaseException:  # noqa: BLE001 - reported: the supervisor ends the process
            supervisor.died(component, sys.exc_info())
            return
        supervisor.died(component)  # returning while the service runs is dying too

    return target
