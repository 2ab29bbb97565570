"""The channel intake endpoint (contract §1): a ROUTER socket, one thread.

Serves DEALER clients (``[identity, payload]``, or ``[identity, b"",
payload]`` with an empty delimiter) and REQ clients (``[identity, b"",
payload]``): a reply goes back with that envelope. A message of any other
shape is answered ``malformed`` without its frames (``actors.endpoint``).
Every request gets exactly one reply, and no request can take the endpoint
down: anything unexpected becomes an ``internal`` error.

``submit_order`` is answered only after the store writer has committed the
order (the writer calls back, and the reply is queued to this actor, the
only thread that may touch the socket).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from actors.effects import AnswerCreate, NewOrder, ReplyTo
from actors.endpoint import BAD_ENVELOPE, RouterEndpoint
from actors.lister import Lister, list_request
from actors.lookup import find_archived, find_order, find_submitted, request_id_of
from actors.ports import OrderContext
from actors.security import DOMAINS, is_operator_name
from actors.store_writer import CreateOrder
from oms import codec, errors
from oms.messages import Cancel, Operate, Start
from oms.sharding import vshard_of
from oms.states import OrderState
from oms.validation import validate_order
from storage.records import Created

logger = logging.getLogger(__name__)

OPERATOR_ONLY = {"retry_step", "skip_step", "abort_order", "order_counts"}


class Intake(RouterEndpoint):
    thread_name = "intake"
    label = "intake"

    def __init__(self, zctx: zmq.Context, endpoint: str, octx: OrderContext,
                 max_in_flight: int, hwm: int = 10_000, curve: dict[str, Any] | None = None,
                 vshards: int = 0) -> None:
        """``vshards``: in a shard process (docs/scaling.md), how many virtual
        shards order ids are spread over (0: not sharded)."""
        super().__init__(zctx, endpoint, octx.metrics, curve, hwm, tagged=vshards > 0)
        self.octx = octx
        self.vshards = vshards
        self.max_in_flight = max_in_flight
        self.admitting = 0  # creates handed to the writer, not yet committed or refused
        self._admitting_lock = threading.Lock()
        self.user: str | None = None
        self.lister = Lister()  # its thread starts with the intake (on_start)
        for code in (errors.MALFORMED, errors.UNKNOWN_TYPE, errors.TOO_LARGE, errors.BUSY,
                     errors.UNAUTHORIZED, errors.NOT_FOUND, errors.CONFLICT, errors.INTERNAL,
                     errors.UNAVAILABLE):
            self.metrics.intake_errors.labels(code)
        self.handlers: dict[str, Callable[[tuple[bytes, ...], dict[str, Any]], Any]] = {
            "submit_order": self.submit_order,
            "get_order": self.get_order,
            "cancel_order": self.cancel_order,
            "list_orders": self.list_orders,
            "order_counts": self.order_counts,
            "retry_step": lambda env, req: self.operate(env, req, "retry"),
            "skip_step": lambda env, req: self.operate(env, req, "skip"),
            "abort_order": lambda env, req: self.operate(env, req, "abort"),
        }
        for name in ("cancel_order", "retry_step", "skip_step", "abort_order"):
            self.handlers[name] = self.needs_store(self.handlers[name])

    def on_start(self) -> None:
        super().on_start()
        self.lister.start()

    def on_stop(self) -> None:
        self.lister.stop()
        super().on_stop()

    def needs_store(self, handler: Callable[[tuple[bytes, ...], dict[str, Any]], Any]
                    ) -> Callable[[tuple[bytes, ...], dict[str, Any]], Any]:
        """A request answered only after a commit is refused at once while the
        store cannot write (its answer would wait for the disk)."""
        def guarded(envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
            if not self.octx.writer.healthy:
                return errors.error_reply(errors.UNAVAILABLE, "the store cannot write right "
                                          "now; nothing was changed; retry later")
            return handler(envelope, req)

        return guarded

    def reply_later(self, envelope: tuple[bytes, ...], request_id: Any) -> ReplyTo:
        """Where the reply to this request goes (data; calling it sends the
        reply, from any thread)."""
        return ReplyTo(self, envelope, request_id)

    # -- requests ----------------------------------------------------------

    def on_frame(self, envelope: tuple[bytes, ...], frame: bytes,
                 user: str | None = None) -> None:
        self.user = user
        request_id = None
        rtype = "?"
        try:
            if len(frame) > codec.MAX_FRAME_BYTES:
                reply: dict[str, Any] | None = errors.error_reply(
                    errors.TOO_LARGE, f"frame is {len(frame)} bytes; the limit is "
                    f"{codec.MAX_FRAME_BYTES}")
            else:
                req = codec.decode_request(frame)
                request_id = request_id_of(req)
                rtype = kind if isinstance(kind := req.get("type"), str) else "?"
                handler = self.handlers.get(rtype)
                if handler is None:
                    rtype = "unknown"  # (a metric label: never the sender's text)
                if self.is_domain_system():  # every request, a known type or not (§6)
                    reply = self.denied("")
                elif handler is not None and rtype in OPERATOR_ONLY and not self.is_operator():
                    reply = errors.error_reply(errors.UNAUTHORIZED,
                                               f"{rtype} is for operators only")
                elif handler is None:
                    reply = errors.error_reply(
                        errors.UNKNOWN_TYPE, f"unknown request type {req.get('type')!r:.100}; "
                        f"known: {', '.join(self.handlers)}")
                else:
                    reply = handler(envelope, req)
        except codec.DecodeError as exc:
            reply = errors.error_reply(errors.MALFORMED, str(exc))
        except Exception:
            logger.exception("intake failed on a %s request", rtype)
            reply = errors.error_reply(errors.INTERNAL, "internal error; see the service log")
        if reply is None:
            return  # answered later, after a commit or by the order
        self.answer(envelope, reply, rtype, request_id)

    def on_bad_envelope(self, envelope: tuple[bytes, ...], user: str | None) -> None:
        self.answer(envelope, errors.error_reply(errors.MALFORMED, BAD_ENVELOPE), "?", None)

    def answer(self, envelope: tuple[bytes, ...], reply: dict[str, Any], rtype: str,
               request_id: Any) -> None:
        """Send a reply made at once, counted by request type and reply."""
        self.metrics.requests.labels(rtype, reply["type"]).inc()
        if reply["type"] == "error":
            self.metrics.intake_errors.labels(reply["code"]).inc()
            if reply["code"] == errors.INTERNAL:  # a bug or an unreadable record
                self.metrics.internal_errors.labels("intake").inc()
        if request_id is not None:
            reply["request_id"] = request_id
        self.send_reply(envelope, reply)

    def submit_order(self, envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
        engines = self.octx.engines
        order, errs = validate_order(req.get("order"), engines.keys())
        if order is None:
            raw = req.get("order")
            src = self.metrics.source_label(
                raw.get("source_system") if isinstance(raw, dict) else None)
            self.metrics.orders_received.labels(src, "rejected").inc()
            return {"type": "rejected", "errors": [e.to_wire() for e in errs]}
        denied = self.denied(order["source_system"])
        if denied:
            return denied
        digest = codec.digest(order)
        if not self.octx.writer.healthy or not self.admit():  # nothing new can be taken:
            known = find_submitted(self.octx.store, order, digest)  # a resubmission is
            if known is not None:  # answered as ever (`busy` would say it was not taken)
                return self.created_reply(known, order["source_system"])
            if not self.octx.writer.healthy:
                return self.store_unavailable(order["source_system"])
            self.metrics.orders_received.labels(
                self.metrics.source_label(order["source_system"]), "busy").inc()
            return errors.error_reply(
                errors.BUSY, f"{self.max_in_flight} orders in flight; retry later")
        build = NewOrder(order, engines[order["order_type"]])
        reply = self.reply_later(envelope, request_id_of(req))
        answer = AnswerCreate(self, order["source_system"], reply, build)  # after the commit
        vshards = self.vshards
        vshard = vshard_of(order["customer"]["id"], vshards) if vshards else None
        self.octx.writer.tell(CreateOrder(order["source_system"], order["external_id"],
                                          digest, build, answer, vshard))
        return None

    def admit(self) -> bool:
        """Take an admission slot for a new order: orders in flight (committed,
        unfinished) plus creates not yet committed stay within the limit, so a
        pipelined burst cannot slip past it before its commits land."""
        with self._admitting_lock:
            if self.octx.counts.in_flight + self.admitting >= self.max_in_flight:
                return False
            self.admitting += 1
            return True

    def admitted(self) -> None:
        """The create's outcome is known (the new order, if any, is counted in
        the router first, so no moment counts it nowhere)."""
        with self._admitting_lock:
            self.admitting -= 1

    def store_unavailable(self, source: str) -> dict[str, Any]:
        """The store cannot commit (disk full, map at its cap, I/O error): the
        order is not taken; the client may send it again later."""
        self.metrics.orders_received.labels(self.metrics.source_label(source),
                                            "unavailable").inc()
        return errors.error_reply(errors.UNAVAILABLE, "the order was not taken: the store "
                                  "cannot write right now; retry later")

    def created(self, created: Created, source: str, reply: ReplyTo,
                started: tuple[Any, ...] | None = None) -> None:
        """After the create's commit: the reply, then the new order's actor
        and its ``Start`` (already run by ``NewOrder`` if ``started``)."""
        if created.kind == "unavailable":
            reply(self.store_unavailable(source))
            return
        if created.kind == "error":
            reply(errors.error_reply(errors.INTERNAL, "the order could not be stored; "
                                     "see the service log"))
            return
        reply(self.created_reply(created, source))
        order = created.order
        if order is not None:
            self.octx.counts.counted(order)
            if order.seq_key:
                self.octx.sequencer.request(order.seq_key, order.order_id, True)
            self.octx.router.start(order, Start() if started is None else None, started=started)

    def created_reply(self, created: Created, source: str) -> dict[str, Any]:
        """``accepted`` (new or ``duplicate``) or ``conflict``, counted."""
        self.metrics.orders_received.labels(self.metrics.source_label(source),
                                            created.kind).inc()
        if created.kind == "conflict":
            return errors.error_reply(
                errors.CONFLICT, f"this source_system and external_id were submitted as "
                f"{created.order_id} with a different payload")
        state = created.state if created.order is None else str(OrderState.ACKNOWLEDGED)
        return {"type": "accepted", "order_id": created.order_id, "state": state,  # contract:
                "duplicate": created.kind == "duplicate"}  # a new order is acknowledged

    def is_operator(self) -> bool:
        return not self.identity_required or is_operator_name(self.user)

    def is_domain_system(self) -> bool:
        """With CURVE on, a domain system's key (``warehouse``) or ``domains``:
        it sends events to the domain-events endpoint and is no channel."""
        return self.identity_required and (
            self.user == DOMAINS or self.user in self.octx.gateways)

    def denied(self, source_system: str) -> dict[str, Any] | None:
        """With CURVE on, a channel may touch only its own source_system's
        orders, and a domain system's key is not a channel at all."""
        if self.is_domain_system():
            return errors.error_reply(errors.UNAUTHORIZED, f"this key is the domain system "
                                      f"{self.user!r}; a domain system is not a channel and "
                                      "may not act on orders through the intake")
        if self.is_operator() or source_system == self.user:
            return None
        return errors.error_reply(errors.UNAUTHORIZED, f"this channel is {self.user!r}; "
                                  f"it may not act on orders of {source_system!r:.100}")

    def get_order(self, envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
        if isinstance(req.get("source_system"), str) and (
                denied := self.denied(req["source_system"])):
            return denied
        order, err = find_order(self.octx.store, req)
        if err:
            return self.archived_order(req, err)
        engine = self.octx.engines.get(order.order_type)  # its point of no return: `fallout`
        ponr = engine.proc.point_of_no_return if engine is not None else None
        return self.denied(order.source_system) or {"type": "order", "order": order.view(ponr)}

    def archived_order(self, req: dict[str, Any], err: dict[str, Any]) -> dict[str, Any]:
        """get_order for an order retention moved to the archive (its marker is
        kept for the dedup window): the final view with ``archived: true``."""
        found = find_archived(self.octx.store, req, err)
        if isinstance(found, dict) and found.get("type") == "error":
            return found
        view = found["order"]
        return self.denied(view.get("source_system", "")) or {
            "type": "order", "order": dict(view, archived=True)}

    def archived_cancel(self, req: dict[str, Any], err: dict[str, Any]) -> dict[str, Any]:
        found = find_archived(self.octx.store, req, err)  # by order_id, or by external id
        if found.get("type") == "error":
            return found
        view = found["order"]
        return self.denied(view.get("source_system", "")) or {
            "type": "cancel_rejected", "order_id": view["order_id"],
            "reason": f"order is already {view['state']} (archived)"}

    def cancel_order(self, envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
        if isinstance(req.get("source_system"), str) and (
                denied := self.denied(req["source_system"])):
            return denied
        reason, operator = req.get("reason"), req.get("operator")
        if reason is not None and not isinstance(reason, str):
            return errors.error_reply(errors.MALFORMED, "reason must be a string")
        if operator is not None and not (isinstance(operator, str) and 1 <= len(operator) <= 64):
            return errors.error_reply(errors.MALFORMED, "operator must be a string of 1 to 64 "
                                      "characters")  # (in every state of the order, as operate)
        if operator is not None and not self.is_operator():  # a channel's history is its own
            return errors.error_reply(errors.UNAUTHORIZED, "only an operator identity may name "
                                      "an operator")
        order, err = find_order(self.octx.store, req)  # by order_id, or source_system + external_id
        if err:
            return self.archived_cancel(req, err)
        if denied := self.denied(order.source_system):
            return denied
        if order.state.terminal:
            return {"type": "cancel_rejected", "order_id": order.order_id,
                    "reason": f"order is already {order.state}"}
        reply = self.reply_later(envelope, request_id_of(req))
        if not self.octx.router.deliver(order.order_id, Cancel(reason, reply, operator)):
            return {"type": "cancel_rejected", "order_id": order.order_id,
                    "reason": "order is already finished"}
        return None

    def operate(self, envelope: tuple[bytes, ...], req: dict[str, Any], action: str) -> Any:
        """An operator's retry / skip / abort, answered by the order itself."""
        operator, step = req.get("operator"), req.get("step")
        if operator is not None and not (isinstance(operator, str) and 1 <= len(operator) <= 64):
            return errors.error_reply(errors.MALFORMED, "operator must be a string of 1 to 64 "
                                      "characters")
        operator = operator or self.user or "anonymous"  # CURVE: the key's name
        if step is not None and not isinstance(step, str):
            return errors.error_reply(errors.MALFORMED, "step must be a string")
        if not isinstance(req.get("order_id"), str):  # (§5: by order_id only)
            return errors.error_reply(errors.MALFORMED, "order_id (a string) is required: "
                                      "an operator request names the order by its id")
        order, err = find_order(self.octx.store, {"order_id": req["order_id"]})
        if err:
            return err
        reason = req.get("reason")
        if reason is not None and not isinstance(reason, str):
            return errors.error_reply(errors.MALFORMED, "reason must be a string")
        if order.state.terminal:
            return {"type": "operator_rejected", "order_id": order.order_id, "action": action,
                    "reason": f"order is already {order.state}"}
        reply = self.reply_later(envelope, request_id_of(req))
        msg = Operate(action, step, operator, reason, reply)
        if not self.octx.router.deliver(order.order_id, msg):
            return {"type": "operator_rejected", "order_id": order.order_id, "action": action,
                    "reason": "order is already finished"}
        logger.info("operator %s asks to %s order %s", operator, action, order.order_id,
                    extra={"order_id": order.order_id})
        return None

    def order_counts(self, envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
        snap = self.octx.router.snapshot()
        return {"type": "order_counts", "counts": snap["states"], "in_flight": snap["in_flight"],
                "live_actors": snap["live"], "writable": self.octx.writer.healthy}

    def list_orders(self, envelope: tuple[bytes, ...], req: dict[str, Any]) -> Any:
        """Validated here; read by the lister thread, which replies: a long
        listing never holds back intake (see ``Lister``)."""
        flt, limit, after, err = list_request(req, self.is_operator(), self.user, self.denied)
        if err:
            return err
        reply = self.reply_later(envelope, request_id_of(req))
        store, metrics = self.octx.store, self.metrics

        def job() -> None:
            try:
                orders, cursor = store.list_orders(flt, limit, after)
                payload = {"type": "orders", "orders": [o.summary_view() for o in orders],
                           "next": cursor}
            except Exception:
                logger.exception("list_orders failed")
                metrics.internal_errors.labels("intake").inc()
                payload = errors.error_reply(errors.INTERNAL, "internal error; see the "
                                             "service log")
            metrics.requests.labels("list_orders", payload["type"]).inc()
            reply(payload)

        if not self.lister.submit(job):
            return errors.error_reply(errors.BUSY, f"{Lister.QUEUED} list_orders requests "
                                      "are waiting already; retry later")
        return None

