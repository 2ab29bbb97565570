"""``list_orders`` for the intake: the request's checks (``list_request``)
and the thread that reads the store for it (``Lister``), so a long listing
never holds back the intake (docs/durability.md, defect 14)."""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from oms import errors
from oms.order_rules import given
from oms.states import OrderState
from storage.listing import ListFilter
from storage.records import usable_order_id

logger = logging.getLogger(__name__)

_STATES = {str(s) for s in OrderState}
_CURSOR = re.compile(r"O[0-9]{12,40}")
"""An order id, as ``storage.records.format_order_id`` makes (12 digits, more
once there are 10**12 orders): what the contract says a one-node cursor is."""


def list_request(req: dict[str, Any], operator: bool, user: str | None,
                 denied: Callable[[str], dict[str, Any] | None]
                 ) -> tuple[ListFilter, int, str | None, dict[str, Any] | None]:
    """The filter, limit and cursor of a list_orders request, or its error.
    A channel (not ``operator``) sees only its own source system, ``user``;
    ``denied`` says why it may not name another."""
    state, source = req.get("state"), req.get("source_system")
    limit, after = given(req, "limit", 100), req.get("after")
    min_age = req.get("min_age_s")
    texts = {name: req.get(name) for name in ("state_reason", "customer_id", "external_id")}
    flt = ListFilter()
    for name, value in texts.items():
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            return flt, 0, None, errors.error_reply(
                errors.MALFORMED, f"{name} must be a string of at most 1000 characters")
    if min_age is not None and (isinstance(min_age, bool) or not isinstance(
            min_age, int | float) or not math.isfinite(min_age) or min_age < 0):
        return flt, 0, None, errors.error_reply(
            errors.MALFORMED, "min_age_s must be a number of seconds, 0 or more")
    if state is not None and (not isinstance(state, str) or state not in _STATES):
        return flt, 0, None, errors.error_reply(errors.MALFORMED,
                                                f"unknown state {state!r:.100}")
    if source is not None and not isinstance(source, str):
        return flt, 0, None, errors.error_reply(errors.MALFORMED,
                                                "source_system must be a string")
    if not operator:
        if source is not None and (refused := denied(source)):
            return flt, 0, None, refused
        source = user
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        return flt, 0, None, errors.error_reply(errors.MALFORMED,
                                                "limit must be an integer 1 to 1000")
    if after is not None and (not isinstance(after, str) or not usable_order_id(after)
                              or not _CURSOR.fullmatch(after)):
        return flt, 0, None, errors.error_reply(
            errors.MALFORMED, "after must be a cursor (an order id) from an earlier page")
    flt = ListFilter(state=state, reason=texts["state_reason"], source_system=source,
                     customer_id=texts["customer_id"], external_id=texts["external_id"],
                     created_before=time.time() - min_age if min_age is not None else None)
    return flt, limit, after, None



class Lister:
    """Runs ``list_orders`` reads off the intake thread: one thread, a bounded
    queue (a full queue answers ``busy``). Each job's work is bounded too
    (``Store.list_orders``' budget), and a job that fails replies an error, so
    the thread never dies."""

    QUEUED = 16

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(self.QUEUED)
        self.thread = threading.Thread(target=self._run, name="lister", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job()
            except Exception:  # a reply that could not be queued (intake stopped)
                logger.exception("list_orders reply failed")

    def stop(self) -> None:
        """End the thread (nothing to do if it never started)."""
        if not self.thread.is_alive():
            return
        while self.thread.is_alive():
            try:
                self.jobs.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join(10)
