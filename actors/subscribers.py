"""The bound on subscribers of an events endpoint, shared by the single
node's publisher (``actors.publisher``) and the sharded front
(``shards.front_events``).

At most ``limit`` connections are kept; a connection beyond that is shut
down as soon as it is accepted, logged and counted (it may come back when a
place is free). The connections are watched with a ZeroMQ socket monitor
made before the bind, so that no connection goes uncounted; its owner polls
``monitor`` on the socket's own thread and calls ``on_monitor``.
"""

from __future__ import annotations

import socket

import zmq
from prometheus_client import Counter, Gauge
from zmq.utils.monitor import recv_monitor_message

from actors.throttle import LogThrottle


def bind_watched(sock: zmq.Socket, endpoint: str) -> tuple[zmq.Socket, int | None]:
    """Bind ``sock`` watched from before the bind: (the monitor socket, the
    bound TCP port or None). On a failed bind the monitor is closed again."""
    monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    try:
        sock.bind(endpoint)
    except BaseException:
        sock.disable_monitor()
        monitor.close(0)
        raise
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return monitor, int(bound.rsplit(":", 1)[1]) if bound.startswith("tcp://") else None


class SubscriberLimit:
    """The live connections of one events socket, at most ``limit`` of them.

    ``port`` is the socket's own TCP port (None: not TCP): a connection is
    shut only when its file descriptor is still a connection to that port."""

    def __init__(self, monitor: zmq.Socket, port: int | None, limit: int, connected: Gauge,
                 refused: Counter, log: LogThrottle) -> None:
        self.monitor, self.port, self.limit = monitor, port, limit
        self.connected, self.refused_total, self.log = connected, refused, log
        self.live: set[int] = set()  # fds of accepted connections
        self.refused: set[int] = set()  # of those, shut down: waiting for their close
        self.connected.set(0)

    def on_monitor(self) -> bool:
        """Read the monitor's events; True when a connection closed."""
        events = []
        for _ in range(1000):
            try:
                events.append(recv_monitor_message(self.monitor, flags=zmq.NOBLOCK))
            except zmq.Again:
                break
        # a connection closed later in this batch is not shut again (its fd
        # number may already belong to something else)
        closes = {e["value"]: i for i, e in enumerate(events)
                  if e["event"] == zmq.EVENT_DISCONNECTED}
        for i, ev in enumerate(events):
            fd = ev["value"]
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self.live.add(fd)
                if len(self.live - self.refused) > self.limit and closes.get(fd, -1) < i:
                    self._refuse(fd)
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.live.discard(fd)
                self.refused.discard(fd)
        self.connected.set(len(self.live - self.refused))
        return bool(closes)

    def _refuse(self, fd: int) -> None:
        """Shut a connection down; ZeroMQ notices and closes it (and its fd)."""
        self.refused_total.inc()
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            return
        try:
            # still ours? (the fd number of a connection that closed meanwhile
            # may have been reused: only a connection to our own port is shut)
            if self.port is None or conn.getsockname()[1] == self.port:
                conn.shutdown(socket.SHUT_RDWR)
                self.refused.add(fd)
        except (OSError, IndexError, TypeError):
            pass
        finally:
            conn.detach()  # ZeroMQ owns the fd: never close it here
        self.log.report("refused", "events subscriber refused: %d connected already "
                        "(max_subscribers)", self.limit,
                        summary="events subscribers refused (max_subscribers)")

    def close(self, sock: zmq.Socket) -> None:
        """Stop watching ``sock`` (the socket this monitor watches)."""
        sock.disable_monitor()
        self.monitor.close(0)
