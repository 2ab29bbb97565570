"""The metrics port: ``/metrics`` (Prometheus), ``/healthz`` (the process is
alive and serving HTTP) and ``/readyz`` (recovered and accepting orders;
503 before and while stopping)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Scrapes are not worth a log line each."""


def health_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> Any:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if ready():
                start("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            start("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"not ready\n"]
        return metrics(environ, start)

    return app


class HttpServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Callable[[], bool]) -> None:
        self.server = make_server(host, port, health_app(registry, ready), ThreadingWSGIServer,
                                  handler_class=_Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
