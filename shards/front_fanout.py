"""Requests the front sends to every shard, merged into one reply:
``list_orders`` (pages merged newest first, with one composite cursor) and
``order_counts`` (summed). docs/scaling.md, "Requests other than submit".
"""

from __future__ import annotations

import base64
from typing import Any

from oms import codec, errors
from oms.order_rules import given
from shards.front_channels import ChannelEdge, gave_up
from shards.front_config import Envelope
from shards.front_links import OnReply, ShardLinks

CURSOR_PREFIX = "S1."


class FanOut:
    def __init__(self, edge: ChannelEdge, links: ShardLinks) -> None:
        self.edge, self.links = edge, links

    def list_orders(self, env: Envelope, req: dict[str, Any], rid: Any,
                    user: str | None) -> None:
        edge, shards = self.edge, len(self.links.links)
        source = req.get("source_system")
        if not edge.is_operator(user):
            if source is not None and (denied := edge.denied(user, source)):
                edge.answer(env, denied, rid, "list_orders")
                return
            req = dict(req, source_system=user)
        after = req.get("after")
        if after is None:
            cursors: dict[int, str | None] = dict.fromkeys(range(shards))
        else:
            parsed = parse_cursor(after, shards)
            if parsed is None:
                edge.answer(env, errors.error_reply(
                    errors.MALFORMED, "after must be a cursor string from a previous reply's "
                    "next"), rid, "list_orders")
                return
            cursors = parsed
        limit = given(req, "limit", 100)  # as a shard reads it (nil: the default)
        base = {k: v for k, v in req.items() if k not in ("request_id", "after")}
        pages: dict[int, dict[str, Any]] = {}
        asked = list(cursors)
        if not asked:
            edge.answer(env, {"type": "orders", "orders": [], "next": None}, rid, "list_orders")
            return

        def collect(k: int) -> OnReply:
            def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
                pages[k] = reply if reply is not None else gave_up("list_orders")
                if len(pages) == len(asked):
                    edge.answer(env, merge_pages(pages, cursors, limit), rid, "list_orders")
            return on_reply

        for k in asked:
            sub = dict(base)
            if cursors[k] is not None:
                sub["after"] = cursors[k]
            self.links.send(k, codec.pack(sub), "list_orders", collect(k))

    def order_counts(self, env: Envelope, rid: Any, index_writable: bool = True) -> None:
        """Every shard's counts, summed; ``writable`` only if the front's dedup
        index can write too (else submits are answered ``unavailable``)."""
        replies: dict[int, dict[str, Any]] = {}
        shards = len(self.links.links)

        def collect(k: int) -> OnReply:
            def on_reply(reply: dict[str, Any] | None, raw: bytes | None) -> None:
                replies[k] = reply if reply is not None else gave_up("order_counts")
                if len(replies) == shards:
                    summed = sum_counts(list(replies.values()))
                    if not index_writable and summed.get("type") == "order_counts":
                        summed["writable"] = False
                    self.edge.answer(env, summed, rid, "order_counts")
            return on_reply

        for k in range(shards):
            self.links.send(k, codec.pack({"type": "order_counts"}), "order_counts",
                            collect(k))


def make_cursor(cursors: dict[int, str | None]) -> str | None:
    """One opaque string: shard -> its own cursor (None: from the newest); a
    shard that is done is left out; nil when every shard is done."""
    if not cursors:
        return None
    packed = codec.pack({str(k): v for k, v in sorted(cursors.items())})
    return CURSOR_PREFIX + base64.urlsafe_b64encode(packed).decode()


def parse_cursor(value: Any, shards: int) -> dict[int, str | None] | None:
    if not isinstance(value, str) or not value.startswith(CURSOR_PREFIX) or len(value) > 8000:
        return None
    try:
        raw = codec.unpack(base64.urlsafe_b64decode(value[len(CURSOR_PREFIX):]))
        out = {int(k): v for k, v in raw.items()}
    except Exception:  # noqa: BLE001 - any undecodable cursor is a bad cursor
        return None
    if any(not 0 <= k < shards or not (v is None or isinstance(v, str)) for k, v in
           out.items()):
        return None
    return out


def merge_pages(pages: dict[int, dict[str, Any]], cursors: dict[int, str | None],
                limit: int) -> dict[str, Any]:
    """Newest first over every shard's page; each shard's cursor moves past
    exactly what was returned from it."""
    for reply in pages.values():
        if reply.get("type") != "orders":
            return reply  # an error (the same from every shard for a bad filter)
    heads = {k: list(reply.get("orders") or []) for k, reply in pages.items()}
    taken: dict[int, int] = dict.fromkeys(heads, 0)
    out: list[dict[str, Any]] = []
    while len(out) < limit:
        best, best_key = None, None
        for k, orders in heads.items():
            if taken[k] < len(orders):
                o = orders[taken[k]]
                key = (o.get("created_ts") or 0.0, str(o.get("order_id")))
                if best_key is None or key > best_key:
                    best, best_key = k, key
        if best is None:
            break
        out.append(heads[best][taken[best]])
        taken[best] += 1
    following: dict[int, str | None] = {}
    for k, orders in heads.items():
        if taken[k] == len(orders):
            nxt = pages[k].get("next")
            if nxt is not None:
                following[k] = nxt
        else:
            following[k] = orders[taken[k] - 1]["order_id"] if taken[k] else cursors[k]
    return {"type": "orders", "orders": out, "next": make_cursor(following)}


def sum_counts(replies: list[dict[str, Any]]) -> dict[str, Any]:
    for reply in replies:
        if reply.get("type") != "order_counts":
            return reply
    counts: dict[str, int] = {}
    for reply in replies:
        for state, n in (reply.get("counts") or {}).items():
            counts[state] = counts.get(state, 0) + int(n)
    return {"type": "order_counts", "counts": counts,
            "in_flight": sum(int(r.get("in_flight") or 0) for r in replies),
            "live_actors": sum(int(r.get("live_actors") or 0) for r in replies),
            "writable": all(r.get("writable") is not False for r in replies)}
