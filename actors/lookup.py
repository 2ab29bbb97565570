"""Finding the order a request names, for the intake: in the live store by
``order_id`` or by ``source_system`` and ``external_id``, or, once
retention has moved it, in the archive (its marker is kept for the dedup
window). Reads only; each answer is the order (or its archive record) or
the error reply to send."""

from __future__ import annotations

import logging
from typing import Any

from oms import errors
from storage import archive
from storage.records import CorruptRecord, Created, ext_key
from storage.store import Store

logger = logging.getLogger(__name__)


def find_order(store: Store, req: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The order a request names (``order_id``, or ``source_system`` and
    ``external_id``) from the live store, or the error to answer."""
    order_id = req.get("order_id")
    if order_id is None and isinstance(req.get("source_system"), str) and isinstance(
            req.get("external_id"), str):
        order_id = store.find_external(req["source_system"], req["external_id"])
        if order_id is None:
            return None, errors.error_reply(errors.NOT_FOUND, "no order with that "
                                            "source_system and external_id")
    if not isinstance(order_id, str):
        return None, errors.error_reply(
            errors.MALFORMED, "give order_id, or source_system and external_id (strings)")
    try:
        order = store.get_order(order_id)
    except CorruptRecord as exc:
        logger.error("%s", exc)
        return None, errors.error_reply(errors.INTERNAL, "order record is unreadable")
    if order is None:
        return None, errors.error_reply(errors.NOT_FOUND, f"no order {order_id!r:.100}")
    return order, None


def find_archived(store: Store, req: dict[str, Any], err: dict[str, Any]) -> dict[str, Any]:
    """The archive record for a not-found order, or ``err`` unchanged."""
    if err.get("code") != errors.NOT_FOUND:
        return err
    order_id = req.get("order_id")
    if order_id is None and isinstance(req.get("source_system"), str) and isinstance(
            req.get("external_id"), str):
        order_id = store.find_external(req["source_system"], req["external_id"])
    if not isinstance(order_id, str):
        return err
    marker = store.find_archived(order_id)
    if marker is None:
        return err
    day, offset = marker[0], marker[1]
    try:
        rec = archive.find_in_member(archive.file_for(store.path, day), offset, order_id)
    except (OSError, ValueError, KeyError) as exc:
        logger.error("archived order %s cannot be read from %s at %d: %s", order_id, day,
                     offset, exc, extra={"order_id": order_id})
        return errors.error_reply(errors.INTERNAL, "the archived order cannot be read; "
                                  "see the service log")
    if rec is None or "unreadable" in rec:
        return errors.error_reply(errors.INTERNAL, "archived order record is unreadable")
    return rec


def find_submitted(store: Store, order: dict[str, Any], digest: bytes) -> Created | None:
    """An earlier submit of this order's external id (``duplicate`` or
    ``conflict``), or None: how a resubmission is answered when no new
    order could be taken now (admission limit, store cannot write), since
    it asks for nothing new. None too when the store cannot be read."""
    try:
        with store.read() as txn:
            return store.known_create(txn, ext_key(order["source_system"],
                                                   order["external_id"]), digest)
    except Exception:  # then the refusal it would have had is the answer
        logger.exception("the idempotency index could not be read")
        return None


def request_id_of(req: dict[str, Any]) -> str | int | None:
    """The client's request_id, echoed if it is a string or an integer."""
    rid = req.get("request_id")
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
