"""Where the front sends each channel request (docs/scaling.md, "Routing
keeps every guarantee of one node"): a submit to its customer's virtual
shard, after the dedup index; a request for one order to the owner of the
virtual shard in its id (or the index's, for an external id);
``list_orders`` and ``order_counts`` to every shard (``shards.front_fanout``).
Anything the front cannot read goes to shard 0, which answers exactly as a
single node.
"""

from __future__ import annotations

import logging
from typing import Any

from actors.endpoint import BAD_ENVELOPE
from oms import codec, errors
from oms.sharding import vshard_of
from oms.states import TERMINAL
from oms.validation import validate_order
from shards.front_channels import ChannelEdge, gave_up
from shards.front_config import Envelope, Placement
from shards.front_fanout import FanOut
from shards.front_index import DedupIndex
from shards.front_links import Pending, ShardLinks
from storage.records import ext_key

logger = logging.getLogger("shards.front")

OPERATOR_ONLY = {"retry_step", "skip_step", "abort_order", "order_counts"}
BY_ORDER = {"get_order", "cancel_order", "retry_step", "skip_step", "abort_order"}
TERMINAL_NAMES = {str(state) for state in TERMINAL}


class Routing:
    def __init__(self, edge: ChannelEdge, links: ShardLinks, index: DedupIndex,
                 placement: Placement, fanout: FanOut, engine_types: list[str]) -> None:
        self.edge, self.links, self.index = edge, links, index
        self.placement, self.fanout, self.engine_types = placement, fanout, engine_types
        # this round's submits that wait for the dedup index's commit (``end_round``)
        self.waiting: list[tuple[Pending, Envelope, Any]] = []

    def from_channels(self) -> None:
        for env, frame, user in self.edge.requests():
            try:
                if frame is None:  # not one request frame (actors.endpoint.RequestReader)
                    self.edge.answer(env, errors.error_reply(errors.MALFORMED, BAD_ENVELOPE),
                                     None, "?")
                    continue
                self.on_request(env, frame, user)
            except Exception:
                logger.exception("front failed on a request")
                self.edge.answer(env, errors.error_reply(errors.INTERNAL, "internal error; see "
                                                         "the service log"), None, "?")

    def on_request(self, env: Envelope, frame: bytes, user: str | None) -> None:
        edge = self.edge
        try:
            req = codec.decode_request(frame) if len(frame) <= codec.MAX_FRAME_BYTES else None
        except codec.DecodeError:
            req = None
        if req is None:  # shard 0 gives exactly a single node's answer (too_large, malformed)
            self.links.send(0, frame, "raw", edge.relay(env, "?"))
            return
        rid = req.get("request_id")
        rid = rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
        rtype = req.get("type") if isinstance(req.get("type"), str) else "?"
        if rtype in OPERATOR_ONLY and not edge.is_operator(user):
            edge.answer(env, errors.error_reply(errors.UNAUTHORIZED,
                                                f"{rtype} is for operators only"), rid, rtype)
        elif rtype == "submit_order":
            self.submit(env, frame, req, rid, user)
        elif rtype in BY_ORDER:
            self.by_order(env, frame, req, rid, rtype, user)
        elif rtype == "list_orders":
            self.fanout.list_orders(env, req, rid, user)
        elif rtype == "order_counts":
            self.fanout.order_counts(env, rid, self.index.writable)
        else:  # unknown type: shard 0 answers it with the list of known types
            self.links.send(0, frame, "raw", edge.relay(env, "unknown", rid))

    # -- submit_order --------------------------------------------------------------

    def submit(self, env: Envelope, frame: bytes, req: dict[str, Any], rid: Any,
               user: str | None) -> None:
        order, _errs = validate_order(req.get("order"), self.engine_types)
        if order is None:  # the shard answers `rejected` with every error, as one node
            self.links.send(0, frame, "submit_order", self.edge.relay(env, "submit_order", rid))
            return
        if denied := self.edge.denied(user, order["source_system"]):
            self.edge.answer(env, denied, rid, "submit_order")
            return
        vshard = vshard_of(order["customer"]["id"], self.placement.vshards)
        key = ext_key(order["source_system"], order["external_id"])
        known = self.index.lookup(key)
        if known is not None and known != vshard:
            self._conflict(env, order, known, rid)
            return
        later = known is None or self.index.uncommitted(key)
        if known is None:
            self.index.record(key, vshard)
        sent = self.links.send(self.placement.process_of_vshard(vshard), frame, "submit_order",
                               self.edge.relay(env, "submit_order", rid), later=later)
        if later:
            self.waiting.append((sent, env, rid))

    def end_round(self) -> None:
        """Commit this round's dedup index entries (one fsync), then send what
        waited for them (``ShardLinks.flush_deferred``). If the index cannot
        write, each submit that waited for it is answered ``unavailable``
        (nothing taken, as a single node whose store cannot write) and is
        never forwarded: a shard may not create an order the index does not
        know (a later submit of its key with another customer would create
        it twice)."""
        waiting, self.waiting = self.waiting, []
        if not self.index.commit():
            for sent, env, rid in waiting:
                if self.links.pending.pop(sent.tag, None) is not None:
                    self.edge.answer(env, errors.error_reply(
                        errors.UNAVAILABLE, "the order was not taken: the front's dedup "
                        "index cannot write right now; retry later"), rid, "submit_order")
        self.links.flush_deferred()

    def _conflict(self, env: Envelope, order: dict[str, Any], vshard: int, rid: Any) -> None:
        """The key is known in another virtual shard: the customer changed."""
        def found(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            view = (reply or {}).get("order") or {}
            what = f"submitted as {view['order_id']}" if view.get("order_id") else "submitted"
            self.edge.answer(env, errors.error_reply(
                errors.CONFLICT, f"this source_system and external_id were {what} with a "
                "different payload (another customer)"), rid, "submit_order")

        ask = {"type": "get_order", "source_system": order["source_system"],
               "external_id": order["external_id"]}
        self.links.send(self.placement.process_of_vshard(vshard), codec.pack(ask), "get_order",
                        found)

    # -- one order: get, cancel, operator requests ------------------------------------

    def by_order(self, env: Envelope, frame: bytes, req: dict[str, Any], rid: Any,
                 rtype: str, user: str | None) -> None:
        edge = self.edge
        order_id = req.get("order_id")
        source, ext = req.get("source_system"), req.get("external_id")
        by_ext = (rtype in ("get_order", "cancel_order") and order_id is None
                  and isinstance(source, str) and isinstance(ext, str))
        if by_ext and (denied := edge.denied(user, source)):
            edge.answer(env, denied, rid, rtype)
            return
        if by_ext:
            assert isinstance(source, str) and isinstance(ext, str)  # by_ext says so
            vshard = self.index.lookup(ext_key(source, ext))
            if vshard is None:
                edge.answer(env, errors.error_reply(errors.NOT_FOUND, "no order with that "
                                                    "source_system and external_id"), rid, rtype)
                return
            shard = self.placement.process_of_vshard(vshard)
        else:
            shard = self.placement.process_of_order_id(order_id)
        if edge.is_operator(user):
            self.links.send(shard, frame, rtype, edge.relay(env, rtype, rid))
            return
        if rtype == "get_order":
            self.links.send(shard, frame, rtype, edge.relay(
                env, rtype, rid, check=lambda reply: edge.not_own(user, reply)))
            return
        # cancel_order by a channel: read the order's owner first, then cancel
        ask: dict[str, Any] = {k: req[k] for k in ("order_id", "source_system", "external_id")
                               if k in req}
        ask["type"] = "get_order"

        def then(reply: dict[str, Any] | None, raw: bytes | None) -> None:
            if reply is None:
                edge.answer(env, gave_up("get_order"), rid, rtype)
            elif reply.get("type") != "order":
                edge.answer(env, reply, rid, rtype)
            elif denied := edge.not_own(user, reply):
                edge.answer(env, denied, rid, rtype)
            elif names_operator(req, reply):  # the shards run without CURVE: refused here
                edge.answer(env, errors.error_reply(errors.UNAUTHORIZED, "only an operator "
                                                    "identity may name an operator"), rid, rtype)
            else:
                self.links.send(shard, frame, rtype, edge.relay(env, rtype, rid))

        self.links.send(shard, codec.pack(ask), "get_order", then)


def names_operator(req: dict[str, Any], reply: dict[str, Any]) -> bool:
    """A channel's cancel that a single node refuses as unauthorized (it names
    an operator, ``actors.intake.Intake.cancel_order``); what that node answers
    first (a bad reason or operator, an order already terminal) the shard does."""
    operator, reason = req.get("operator"), req.get("reason")
    view = reply.get("order")
    state = view.get("state") if isinstance(view, dict) else None
    return (isinstance(operator, str) and 1 <= len(operator) <= 64
            and (reason is None or isinstance(reason, str))
            and state not in TERMINAL_NAMES)
