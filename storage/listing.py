"""Listing orders (``list_orders``): newest first, filtered on each
record's head (``oms.snapshot.head``), in bounded work per call."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from oms import codec, snapshot
from oms.model import Order
from storage.records import MAX_ORDER_ID, SCAN_CHUNK, StoreView, ext_key, seek_before

logger = logging.getLogger(__name__)

LIST_BUDGET = 5_000  # records list_orders examines per call at most


class OrderListing(StoreView):
    """The store's listing part."""

    def list_orders(self, flt: ListFilter, limit: int, after: str | None,
                    budget: int = LIST_BUDGET, chunk: int = SCAN_CHUNK
                    ) -> tuple[list[Order], str | None]:
        """Orders matching ``flt``, newest first, older than the cursor ``after``.

        Bounded work: at most ``budget`` records are examined per call, read
        in chunks of short read transactions (so a call never holds a read
        slot for long). Returns the orders (at most ``limit``) and the cursor
        to continue with: the last order id examined when more orders may
        exist (the limit was reached or the budget spent), else None. A page
        may hold fewer than ``limit`` orders, even none, and still have a
        cursor. New orders get higher ids, so paging never repeats or skips
        an order while orders are added."""
        if flt.source_system is not None and flt.external_id is not None:
            return self._list_one(flt, after), None
        out: list[Order] = []
        cursor = after.encode()[:MAX_ORDER_ID] if after is not None else None
        examined, more = 0, True
        while more and len(out) < limit and examined < budget:
            rows: list[tuple[bytes, bytes]] = []
            with self.read() as txn:
                cur = txn.cursor(db=self.db["orders"])
                found = seek_before(cur, cursor)
                while found and len(rows) < min(chunk, budget - examined):
                    rows.append((cur.key(), cur.value()))
                    found = cur.prev()
            more = found
            for n, (key, raw) in enumerate(rows):
                examined += 1
                cursor = key
                order = _listed(key, raw, flt)
                if order is not None:
                    out.append(order)
                    if len(out) == limit:
                        more = more or n + 1 < len(rows)
                        break
        return out, (cursor.decode() if more and cursor is not None else None)

    def _list_one(self, flt: ListFilter, after: str | None) -> list[Order]:
        """source_system + external_id name at most one order: the index finds it."""
        with self.read() as txn:
            raw = txn.get(ext_key(flt.source_system or "", flt.external_id or ""),
                          db=self.db["ext"])
            if raw is None:
                return []
            order_id = codec.unpack(raw)[0]
            if after is not None and order_id >= after:
                return []
            rec = txn.get(order_id.encode(), db=self.db["orders"])
        order = None if rec is None else _listed(order_id.encode(), rec, flt)
        return [] if order is None else [order]


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What ``list_orders`` keeps; None matches anything."""

    state: str | None = None
    reason: str | None = None
    source_system: str | None = None
    customer_id: str | None = None
    external_id: str | None = None
    created_before: float | None = None

    def matches(self, head: snapshot.Head) -> bool:
        """On the record's head, so only matches are decoded into an Order
        (a version 1 head is unchecked: any field may have any type)."""
        cust, cts = head.customer, head.created_ts
        return ((self.state is None or head.state == self.state)
                and (self.reason is None or head.state_reason == self.reason)
                and (self.source_system is None or head.source_system == self.source_system)
                and (self.external_id is None or head.external_id == self.external_id)
                and (self.customer_id is None
                     or (isinstance(cust, dict) and cust.get("id") == self.customer_id))
                and (self.created_before is None or (
                    isinstance(cts, int | float) and cts <= self.created_before)))


def _listed(key: bytes, raw: bytes, flt: ListFilter) -> Order | None:
    """The order if its record matches; an unreadable record is logged, skipped."""
    try:
        head = snapshot.head(raw)
        if not flt.matches(head):
            return None
        return head if isinstance(head, Order) else snapshot.decode(raw)
    except Exception as exc:  # noqa: BLE001 - any decoding problem is reported with its key
        logger.error("list_orders skips record %r: %s: %s", key, type(exc).__name__, exc)
        return None
