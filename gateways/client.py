"""A small intake client (DEALER), used by the CLI, the demo, the bench and tests."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from oms import codec
from oms.states import TERMINAL


class Client:
    """Requests to the intake endpoint, one at a time or pipelined."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None,
                 timeout: float = 10.0, curve: dict[str, Any] | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))  # no peer: fail, not hang
        for name, value in (curve or {}).items():  # see actors.security.client_options
            self.sock.setsockopt(getattr(zmq, name), value)
        self.endpoint = endpoint
        self.sock.connect(endpoint)
        self.timeout = timeout
        self.timeout_text = f"{timeout:g} s"  # how errors name the wait
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except zmq.Again:
            raise TimeoutError(f"cannot send to {self.endpoint}: no connection within "
                               f"{self.timeout_text}") from None

    def request(self, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply (matched by request_id)."""
        rid = f"r{next(self._ids)}"
        self._send(codec.pack(dict(payload, request_id=rid)))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                waited = self.timeout_text if timeout is None else f"{timeout:g} s"
                raise TimeoutError(f"no reply from {self.endpoint} to {payload.get('type')} "
                                   f"within {waited}")
            reply = codec.decode_map(self.sock.recv())
            if reply.get("request_id") == rid:
                return reply

    def send_raw(self, frame: bytes, timeout: float | None = None) -> dict[str, Any]:
        """Send any bytes as one frame; return the decoded reply."""
        self._send(frame)
        left = self.timeout if timeout is None else timeout
        if not self.sock.poll(left * 1000):
            raise TimeoutError(f"no reply from {self.endpoint} within {left:g} s")
        return codec.decode_map(self.sock.recv())

    def pipeline(self, payloads: Iterable[dict[str, Any]], window: int = 256,
                 timeout: float | None = None) -> Iterator[tuple[dict, dict]]:
        """Send with up to ``window`` requests outstanding; yield (request, reply)."""
        waiting: dict[str, dict[str, Any]] = {}
        source = iter(payloads)
        exhausted = False
        limit = self.timeout if timeout is None else timeout
        while waiting or not exhausted:
            while not exhausted and len(waiting) < window:
                try:
                    payload = next(source)
                except StopIteration:
                    exhausted = True
                    break
                rid = f"p{next(self._ids)}"
                waiting[rid] = payload
                self._send(codec.pack(dict(payload, request_id=rid)))
            if not waiting:
                break
            if not self.sock.poll(limit * 1000):
                waited = self.timeout_text if timeout is None else f"{limit:g} s"
                raise TimeoutError(f"{len(waiting)} requests to {self.endpoint} unanswered "
                                   f"within {waited}")
            while True:
                try:
                    reply = codec.decode_map(self.sock.recv(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                request = waiting.pop(str(reply.get("request_id")), None)
                if request is not None:
                    yield request, reply

    # -- conveniences ------------------------------------------------------

    def submit(self, order: dict[str, Any]) -> dict[str, Any]:
        return self.request({"type": "submit_order", "order": order})

    def get(self, order_id: str) -> dict[str, Any]:
        return self.request({"type": "get_order", "order_id": order_id})

    def cancel(self, order_id: str, reason: str | None = None) -> dict[str, Any]:
        return self.request({"type": "cancel_order", "order_id": order_id, "reason": reason})

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until the service answers (it opens intake after recovery)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request({"type": "get_order", "order_id": "-"}, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


def wait_terminal(client: Client, order_ids: Iterable[str], timeout: float = 60.0,
                  poll: float = 0.05) -> dict[str, dict[str, Any]]:
    """Poll get_order until every order is terminal; return their views."""
    left = list(order_ids)
    views: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while left:
        reqs = ({"type": "get_order", "order_id": oid} for oid in left)
        still = []
        for req, reply in client.pipeline(reqs, window=512):
            view = reply.get("order") or {}
            if view.get("state") in TERMINAL:
                views[req["order_id"]] = view
            else:
                still.append(req["order_id"])
        left = still
        if left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(left)} orders not terminal, e.g. {left[:3]}")
            time.sleep(poll)  # polling a remote service: nothing to wait on locally
    return views
