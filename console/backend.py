"""The console's only way to the service: requests to the intake endpoint and
a subscription to the events endpoint, with ``gateways.client``.

``Backend`` turns replies into data or one of two exceptions the pages
render: ``ServiceDown`` (no answer in time) and ``ServiceError`` (an
``error`` reply). ``EventFeed`` reads the events endpoint in one thread and
hands each event to the live pages' queues; it also remembers the orders in
jeopardy it has seen (the service keeps no list of them).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import zmq

from gateways.client import Client
from oms import codec
from oms.states import TERMINAL

logger = logging.getLogger(__name__)

PAGE = 50  # orders per search page
SCAN_LIMIT = 5000  # orders examined for one page when the service ignores a filter
MAX_REQUESTS = 20  # list_orders requests for one page (a page may be short and have a next)
FILTERS = ("state", "state_reason", "source_system", "customer_id", "external_id")


class ServiceDown(Exception):
    """The service did not answer within the timeout."""


class ServiceError(Exception):
    """The service answered with an ``error`` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Backend:
    """Requests to the intake endpoint from a small pool of DEALER clients
    (one request per client at a time; the web server has several threads)."""

    def __init__(self, intake: str, curve: dict[str, Any] | None = None,
                 timeout: float = 3.0, ctx: zmq.Context | None = None) -> None:
        self.intake, self.curve, self.timeout = intake, curve, timeout
        self.ctx = ctx or zmq.Context.instance()
        self._free: queue.LifoQueue[Client] = queue.LifoQueue()
        self._closed = False

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                return

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            client = self._free.get_nowait()
        except queue.Empty:
            client = Client(self.intake, self.ctx, timeout=self.timeout, curve=self.curve)
        try:
            reply = client.request(payload, timeout=self.timeout)
        except TimeoutError:
            client.close()  # its queued request must not reach a service that comes back
            raise ServiceDown(f"the service did not answer at {self.intake} within "
                              f"{self.timeout:g} s") from None
        except Exception:
            client.close()
            raise
        if self._closed:
            client.close()
        else:
            self._free.put(client)
        return reply

    def _checked(self, payload: dict[str, Any], want: str) -> dict[str, Any]:
        reply = self.request(payload)
        if reply.get("type") == "error":
            raise ServiceError(str(reply.get("code")), str(reply.get("message")))
        if reply.get("type") != want:
            raise ServiceError("unexpected", f"the service answered {reply.get('type')!r} "
                               f"to {payload['type']}")
        return reply

    # -- reads -------------------------------------------------------------

    def get_order(self, order_id: str) -> dict[str, Any] | None:
        """The order view, or None if the service knows no such order."""
        try:
            return self._checked({"type": "get_order", "order_id": order_id}, "order")["order"]
        except ServiceError as exc:
            if exc.code == "not_found":
                return None
            raise

    def find_external(self, source_system: str, external_id: str) -> dict[str, Any] | None:
        try:
            return self._checked({"type": "get_order", "source_system": source_system,
                                  "external_id": external_id}, "order")["order"]
        except ServiceError as exc:
            if exc.code == "not_found":
                return None
            raise

    def counts(self) -> dict[str, int] | None:
        """Unfinished orders per state, or None if this console may not ask."""
        try:
            reply = self._checked({"type": "order_counts"}, "order_counts")
        except ServiceError as exc:
            if exc.code == "unauthorized":
                return None
            raise
        return {str(k): int(v) for k, v in reply.get("counts", {}).items()}

    def search(self, filters: dict[str, str], after: str | None = None,
               size: int = PAGE) -> tuple[list[dict[str, Any]], str | None]:
        """One page of orders matching every filter, in the service's order
        (newest first), and the cursor of the next page (None: no more).

        Every filter is sent to the service; the rows are checked here as
        well, so a service that does not know a filter yet (customer_id and
        external_id are newer) gives fewer rows per request, never wrong ones.
        Each request asks for no more rows than the page still needs, so a
        page ends where a service's page ends and the cursor is always the
        service's own ``next`` (behind the sharded front an opaque string; an
        order id there is ``malformed``).
        """
        req: dict[str, Any] = {"type": "list_orders",
                               **{k: v for k, v in filters.items() if k in FILTERS and v}}
        rows: list[dict[str, Any]] = []
        scanned = 0
        cursor = after
        for _ in range(MAX_REQUESTS):
            req["limit"] = size - len(rows)
            if cursor:
                req["after"] = cursor
            page = self._checked(req, "orders")
            orders, nxt = page.get("orders") or [], page.get("next")
            scanned += len(orders)
            rows += [order for order in orders if matches(order, filters)][:size - len(rows)]
            if len(rows) == size:
                return rows, (str(nxt) if nxt is not None else None)
            if nxt is None:
                return rows, None
            cursor = str(nxt)  # a page may be short, even empty, and still have a next
            if scanned >= SCAN_LIMIT:
                break
        return rows, cursor  # the rest on the next page

    # -- actions -----------------------------------------------------------

    def act(self, action: str, order_id: str, operator: str, reason: str,
            step: str | None = None) -> dict[str, Any]:
        """An operator action; returns the reply (accepted, rejected or error)."""
        rtype = {"retry": "retry_step", "skip": "skip_step", "abort": "abort_order",
                 "cancel": "cancel_order"}[action]
        req: dict[str, Any] = {"type": rtype, "order_id": order_id, "operator": operator,
                               "reason": reason}
        if step:
            req["step"] = step
        return self.request(req)


def matches(order: dict[str, Any], filters: dict[str, str]) -> bool:
    return all(not filters.get(k) or order.get(k) == filters[k] for k in FILTERS)


class EventFeed:
    """Reads the events endpoint in a thread; fans events out to listeners."""

    def __init__(self, endpoint: str, curve: dict[str, Any] | None = None,
                 ctx: zmq.Context | None = None, keep: int = 200) -> None:
        self.endpoint, self.curve, self.keep = endpoint, curve, keep
        self.ctx = ctx or zmq.Context.instance()
        self.jeopardy: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.received = 0
        self._listeners: set[queue.Queue[dict[str, Any]]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def listen(self, size: int = 1000) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(size)
        with self._lock:
            self._listeners.add(q)
        return q

    def unlisten(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._listeners.discard(q)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)

    def in_jeopardy(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self.jeopardy.values()))

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in (self.curve or {}).items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # an operator key gets every source_system
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if sock.poll(250):
                    self.deliver(self._read(sock))
        except Exception:  # the feed is a convenience: pages still work without it
            logger.exception("the console's event feed stopped; live updates are off")
        finally:
            sock.close(0)

    @staticmethod
    def _read(sock: zmq.Socket) -> Iterable[dict[str, Any]]:
        out = []
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                out.append(codec.decode_map(frames[-1]))
            except codec.DecodeError:
                continue
        return out

    def deliver(self, events: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for ev in events:
                if not isinstance(ev, dict):
                    continue
                self.received += 1
                self._remember(ev)
                for q in self._listeners:
                    with contextlib.suppress(queue.Full):  # a slow page reloads anyway
                        q.put_nowait(ev)

    def _remember(self, ev: dict[str, Any]) -> None:
        oid = ev.get("order_id")
        if not isinstance(oid, str):
            return
        if ev.get("type") == "order_jeopardy":
            self.jeopardy[oid] = {k: ev.get(k) for k in
                                  ("order_id", "external_id", "step", "expected_s", "late_s",
                                   "ts")}
            self.jeopardy.move_to_end(oid)
            while len(self.jeopardy) > self.keep:
                self.jeopardy.popitem(last=False)
        elif ev.get("type") == "order_summary" or (
                ev.get("type") == "order_state" and ev.get("state") in TERMINAL):
            self.jeopardy.pop(oid, None)
