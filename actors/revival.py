"""The order failure rule, carried out for the router (``OrderRouter``).

An order whose actor crashed is taken out of the live set by ``crashed``
before its actor stops; messages for it wait in ``_reviving`` until its last
durable snapshot is reloaded (after the writer has committed everything
queued before: a ``Barrier`` whose effect is ``actors.effects.Revive``),
then go to the new actor. An actor stopped by pykka's own ``stop`` hands its
unsaved slice and queued tells over the same way (``stopped``). See
docs/architecture.md, "Failure rule".

``Revival`` is a part of ``actors.router.OrderRouter`` (as the engine's
parts are of ``oms.engine_base.TurnBase``): it uses the router's live set,
stripes, counts and loading, declared below.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from actors import supervision
from actors.effects import Revive
from actors.order import Flushed, HoldInternalError, OrderActor, Rest
from actors.order_counts import OrderCounts
from actors.ports import OrderContext
from actors.store_writer import Barrier
from oms import errors
from oms.engine import INTERNAL_ERROR
from oms.model import Order
from oms.states import OrderState

if TYPE_CHECKING:
    from pykka import ActorRef

logger = logging.getLogger(__name__)


class Revival:
    """Crash and revival of order actors (a part of ``OrderRouter``)."""

    ctx: OrderContext
    counts: OrderCounts
    idle: dict[str, OrderActor]
    _live: dict[str, ActorRef[OrderActor]]
    _reviving: dict[str, list[Any]]  # messages for orders being reloaded
    _counted: dict[str, OrderState | None]  # ... the state their lost actor had counted

    def _stripe(self, order_id: str) -> threading.Lock:
        raise NotImplementedError

    def _spawn(self, order: Order, reason: str) -> ActorRef[OrderActor]:
        raise NotImplementedError

    def _load(self, order_id: str) -> Order | None:
        raise NotImplementedError


    def crashed(self, actor: OrderActor, exc_info: Any, message: Any,
                handled: list[Any]) -> None:
        """An order actor's handler raised (``message``; None: its slice end).

        The one place the order failure rule is carried out: the actor leaves
        the live set at once (before it stops, so no tell meets a dead
        actor); the order's last durable snapshot is reloaded once the
        writer has committed what was queued before; the messages of the
        slice handled before the crash are delivered to it again, then it is
        held as ``internal_error`` (``oms.engine.hold_internal_error``), then
        it gets the messages still queued or arriving meanwhile. The message
        that raised (or a failed slice's messages) is dropped, and a request
        among them gets an ``internal`` error reply. No other order waits.
        """
        order_id = actor.order.order_id
        exc = exc_info[1]
        error = f"{type(exc).__name__}: {exc}"
        what = type(message).__name__ if message is not None else "the end of its slice"
        logger.error("order %s: handler raised on %s; reloading its last durable snapshot "
                     "and holding it as internal_error", order_id, what, exc_info=exc_info,
                     extra={"order_id": order_id})
        self.ctx.metrics.order_crashes.inc()
        if isinstance(message, HoldInternalError):  # the hold itself failed: no loop
            logger.critical("order %s could not be held; it stays at its last durable "
                            "snapshot until its next message (those queued for it are "
                            "delivered to it again)", order_id,
                            extra={"order_id": order_id})
            with self._stripe(order_id):
                if self._live.get(order_id) is actor.actor_ref:
                    del self._live[order_id]
                self.idle.pop(order_id, None)
                queue = actor.actor_inbox.queue  # not lost: each is handled or refused
                queued = [e.message for e in queue if not isinstance(e.message, (Flushed, Rest))]
                queue.clear()
                actor.stop_now()
                self._revive(order_id, queued, actor.counted_state, spawn=False)
            return
        dropped = [message] if message is not None else list(handled)
        replay = list(handled) if message is not None else []
        replay.append(HoldInternalError(error, tuple(dropped)))
        with self._stripe(order_id):
            if self._live.get(order_id) is actor.actor_ref:
                del self._live[order_id]
            self.idle.pop(order_id, None)
            queue = actor.actor_inbox.queue
            replay += [envelope.message for envelope in queue]
            queue.clear()
            actor.stop_now()
            self._revive(order_id, replay, actor.counted_state)
        for msg in dropped:
            _refuse(msg, "the order failed handling this request and is held as "
                         "internal_error; see the service log")

    def stopped(self, actor: OrderActor, handled: list[Any]) -> None:
        """An order actor stopped by pykka's ``ActorRef.stop`` (in its own
        slice; nothing of ours does that: passivation, retirement and crashes
        use ``stop_now``). pykka would drop what it had not made durable:
        the messages handled in this slice (their snapshot is never saved)
        and the tells queued behind the stop; a lost command reply or
        ``Start`` leaves the order waiting forever. So, as for a crash but
        without the hold: it leaves the live set now and the order is
        reloaded from its last durable snapshot with those messages.
        Asks stay queued: pykka answers them ``ActorDeadError``."""
        order_id = actor.order.order_id
        logger.error("order %s: its actor was stopped from outside; reloading the order from "
                     "its last durable snapshot", order_id, extra={"order_id": order_id})
        self.ctx.metrics.internal_errors.labels("router").inc()
        with self._stripe(order_id):
            if self._live.get(order_id) is not actor.actor_ref:
                return
            del self._live[order_id]
            self.idle.pop(order_id, None)
            queue = actor.actor_inbox.queue
            told = [e.message for e in queue if e.reply_to is None]
            asked = [e for e in queue if e.reply_to is not None]
            queue.clear()
            queue.extend(asked)
            told = [m for m in told if not isinstance(m, (Flushed, Rest))]  # for this instance
            self._revive(order_id, list(handled) + told, actor.counted_state)

    def _revive(self, order_id: str, messages: list[Any], counted: OrderState | None,
                spawn: bool = True) -> None:
        """Queue the reload behind every write already handed to the writer
        (``spawn`` False: only put the counts back in line, then leave it
        passivated)."""
        pending = self._reviving.get(order_id)
        if pending is not None:  # already on its way: add to it
            pending += messages
            return
        self._reviving[order_id] = messages
        self._counted[order_id] = counted
        revive = Revive(self, order_id, spawn, supervision.current())
        self.ctx.writer.tell(Barrier((revive,)))

    def revived(self, order_id: str, spawn: bool) -> None:
        """In the writer, after the barrier (``actors.effects.Revive``): start
        the order again from the store."""
        with self._stripe(order_id):
            messages = self._reviving.pop(order_id)
            counted = self._counted.pop(order_id)
            order = self._load(order_id)
            if order is not None:
                if counted is not None:
                    self.counts.recount(counted, order.state, order_id)
                self.counts.park(order_id, order.state is OrderState.HELD
                          and order.state_reason == INTERNAL_ERROR)
            if order is not None and not spawn and not messages:
                return
            if order is None:
                logger.warning("order %s finished or unreadable; %d messages for it dropped",
                               order_id, len(messages), extra={"order_id": order_id})
                for msg in messages:
                    _refuse(msg, "the order could not be reloaded; see the service log")
                return
            crash = any(isinstance(m, HoldInternalError) for m in messages)
            ref = self._spawn(order, "crash" if crash else "reload")
            for msg in messages:
                ref.tell(msg)



def _refuse(message: Any, why: str) -> None:
    """Answer a request (cancel, operator action) that will not be handled."""
    reply_to = getattr(message, "reply_to", None)
    if callable(reply_to):
        try:
            reply_to(errors.error_reply(errors.INTERNAL, why))
        except Exception:
            logger.exception("could not answer a %s", type(message).__name__)
