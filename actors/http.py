"""The metrics port: ``/metrics`` (Prometheus), ``/healthz`` (the process is
alive and serving HTTP) and ``/readyz`` (recovered, accepting orders and
every component alive; 503 before, while stopping, and once a component
has died).

The server holds a fixed number of threads however many clients connect
(defect 17: a thread per connection let 300 idle connections make 318
threads). One thread accepts connections and watches them in a selector;
a connection goes to one of ``WORKERS`` worker threads only once it has
bytes to read. An idle connection costs a file descriptor, not a thread,
and is closed after ``IDLE_TIMEOUT_S``; past ``MAX_CONNECTIONS`` waiting
connections the oldest is closed. A worker reads a request within one
deadline (``REQUEST_DEADLINE_S`` for all of it, ``READ_TIMEOUT_S`` for each
read), so neither a client that stops half-way nor one that sends a byte
now and then holds it longer; its answer is sent within ``READ_TIMEOUT_S``.
"""

from __future__ import annotations

import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from actors import supervision

logger = logging.getLogger(__name__)

WORKERS = 4
IDLE_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 5.0
REQUEST_DEADLINE_S = 10.0
MAX_CONNECTIONS = 256


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, all of them within one deadline: a client
    that trickles a byte at a time (each read well inside the socket
    timeout) still frees its worker once the deadline passes."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not read within its deadline")
        self._sock.settimeout(min(left, READ_TIMEOUT_S))
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(READ_TIMEOUT_S)  # the answer's own bound


class _Quiet(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        deadline = getattr(self.server, "request_deadline_s", REQUEST_DEADLINE_S)
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, time.monotonic() + deadline))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Scrapes are not worth a log line each."""


def health_app(registry: CollectorRegistry, ready: Callable[[], bool],
               dead: Callable[[], list[str]] = list) -> Any:
    """``dead``: names of components that died (app.service); any makes
    ``/readyz`` answer 503, naming them."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            down = dead()
            if ready() and not down:
                start("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            start("503 Service Unavailable", [("Content-Type", "text/plain")])
            if down:
                return [f"not ready: dead: {', '.join(down)}\n".encode()]
            return [b"not ready\n"]
        if path != "/metrics":  # (prometheus_client serves its page at any path)
            start("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this port serves /metrics, /readyz and /healthz\n"]
        return metrics(environ, start)

    return app


class PooledWSGIServer(WSGIServer):
    """A WSGI server with a fixed pool of workers (see the module docstring)."""

    request_queue_size = 1024  # the listen backlog (the kernel caps it)
    request_deadline_s = REQUEST_DEADLINE_S  # to read one request, whole

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket.setblocking(False)
        self._work: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._waiting: dict[socket.socket, tuple[float, Any]] = {}
        self._stopping = threading.Event()
        self.threads = [threading.Thread(
            target=supervision.guarded(f"metrics-http-{i}", self._worker),
            name=f"metrics-http-{i}", daemon=True) for i in range(WORKERS)]
        for thread in self.threads:
            thread.start()

    def serve(self) -> None:
        """Accept connections; hand each to a worker once it is readable."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=0.5):
                    if key.fileobj is self.socket:
                        self._accept(sel)
                    elif key.fileobj in self._waiting:  # not closed earlier in this round
                        conn = key.fileobj
                        sel.unregister(conn)
                        _, addr = self._waiting.pop(conn)
                        self._work.put((conn, addr))
                self._expire(sel)
            for conn in list(self._waiting):
                sel.unregister(conn)
                conn.close()
            self._waiting.clear()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                conn, addr = self.socket.accept()
            except OSError:  # none left (EAGAIN), or out of descriptors
                return
            self._watch(sel, conn, addr)

    def _watch(self, sel: selectors.BaseSelector, conn: socket.socket, addr: Any) -> None:
        if len(self._waiting) >= MAX_CONNECTIONS:
            oldest = min(self._waiting, key=lambda c: self._waiting[c][0])
            sel.unregister(oldest)
            del self._waiting[oldest]
            oldest.close()
        self._waiting[conn] = (time.monotonic(), addr)
        sel.register(conn, selectors.EVENT_READ)

    def _expire(self, sel: selectors.BaseSelector) -> None:
        cutoff = time.monotonic() - IDLE_TIMEOUT_S
        for conn, (since, _) in list(self._waiting.items()):
            if since < cutoff:
                sel.unregister(conn)
                del self._waiting[conn]
                conn.close()

    def _worker(self) -> None:
        while (job := self._work.get()) is not None:
            conn, addr = job
            try:
                conn.setblocking(True)
                self.finish_request(conn, addr)
            except Exception:  # one bad request must not end a worker
                logger.debug("metrics request from %s failed", addr, exc_info=True)
            finally:
                self.shutdown_request(conn)

    def stop(self) -> None:
        self._stopping.set()
        for _ in self.threads:
            self._work.put(None)


class HttpServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Callable[[], bool], dead: Callable[[], list[str]] = list,
                 request_deadline_s: float = REQUEST_DEADLINE_S) -> None:
        """``ready`` and ``dead`` are called from the server's threads: they
        must read only what is safe from any thread (``app.service``)."""
        try:
            self.server: PooledWSGIServer = make_server(
                host, port, health_app(registry, ready, dead), PooledWSGIServer,
                handler_class=_Quiet)
        except OSError as exc:  # say which port: the service binds four endpoints
            raise OSError(exc.errno, f"metrics port {host}:{port}: {exc.strerror}") from None
        self.server.request_deadline_s = request_deadline_s
        self.thread = threading.Thread(
            target=supervision.guarded("metrics-http", self.server.serve), name="metrics-http",
            daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and all(t.is_alive() for t in self.server.threads)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        for thread in self.server.threads:
            thread.join(5)
        self.server.server_close()
