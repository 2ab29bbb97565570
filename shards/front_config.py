"""The front's settings (``DATA/front.json``), its metrics, the placement of
virtual shards it routes by, its stop flags, and the socket helper
every endpoint of the front uses (its ROUTERs are read with
``actors.endpoint.RequestReader``, as the single node's)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from oms.sharding import vshard_of_order_id
from storage import files


@dataclass
class FrontConfig:
    data: str
    intake: str
    events: str
    domain_events: str
    vshards: int
    owner: list[int]
    shards: list[dict[str, str]]
    order_types: list[str] = field(default_factory=list)
    processes: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    curve_server_key: str | None = None
    curve_clients: str | None = None
    systems: list[str] = field(default_factory=list)  # domain systems' names
    events_hwm: int = 1000
    max_subscribers: int = 100
    subscriber_timeout_s: float = 30.0
    log_level: str = "info"
    log_format: str = "json"

    @classmethod
    def read(cls, file: str | Path) -> FrontConfig:
        raw = json.loads(files.read_text(file))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Placement:
    """Which shard process holds each virtual shard (the manifest's ``owner``)."""

    vshards: int
    owner: tuple[int, ...]

    def process_of_vshard(self, vshard: int) -> int:
        return self.owner[vshard]

    def process_of_order_id(self, order_id: Any) -> int:
        """The owner of the id's virtual shard; shard 0 for an id that is not
        ours (or not a string): it gives a single node's answer."""
        vshard = vshard_of_order_id(order_id, self.vshards)
        return 0 if vshard is None else self.owner[vshard]


class FrontMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("oms_front_requests_total", "Requests relayed by the front, by "
                                "type and reply type", ["type", "reply"], registry=registry)
        self.resent = Counter("oms_front_resent_total", "Requests re-sent to a shard that "
                              "came back", ["to_shard"], registry=registry)
        self.gave_up = Counter("oms_front_gave_up_total", "Requests answered internal because "
                               "their shard did not answer in time", ["to_shard"],
                               registry=registry)
        self.shard_up = Gauge("oms_front_shard_up", "1 when the shard answers the front's pings",
                              ["to_shard"], registry=registry)
        self.keys_reload_failed = Gauge("oms_client_keys_reload_failed", "1 when the last "
                                        "SIGHUP's client keys folder was refused",
                                        registry=registry)
        self.pending = Gauge("oms_front_pending_requests", "Requests waiting for a shard",
                             registry=registry)
        self.index_commit = Histogram("oms_front_index_commit_seconds", "Dedup index group "
                                      "commit (fsync) time", registry=registry,
                                      buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5))
        self.events = Counter("oms_front_events_total", "Channel events republished",
                              registry=registry)
        self.subscribers = Gauge("oms_event_subscribers", "Connections to the events "
                                 "endpoint", registry=registry)
        self.subscribers_refused = Counter("oms_event_subscribers_refused_total",
                                           "Events connections closed at once: "
                                           "max_subscribers were connected", registry=registry)


def server_socket(ctx: zmq.Context, kind: int, **options: Any) -> zmq.Socket:
    """A socket for one of the front's own endpoints (bound by its owner)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 1000)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


Envelope = tuple[bytes, ...]
