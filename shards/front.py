"""The front of a sharded service: one intake, one events and one
domain-events endpoint in front of N shard processes (docs/scaling.md).

One thread polls every socket (``Front.run``). It routes each request to the
shard that owns it and relays the shard's reply unchanged, republishes every
shard's events, and forwards domain events to the owning shard, whose
``ack`` it relays. With CURVE on it applies the identity rules itself (the
shards listen for the front alone, on Unix sockets only the service's user
reaches: ``shards.rundir``). Who owns which socket:

- the channel intake ROUTER: ``shards.front_channels.ChannelEdge`` (replies,
  identity rules); each request is routed by ``shards.front_routing``, and
  ``list_orders`` / ``order_counts`` go to every shard (``shards.front_fanout``);
- the events XPUB (and the events proxy thread): ``shards.front_events``;
- the domain-events ROUTER: ``shards.front_domain.DomainRelay``;
- the DEALERs, SUBs and monitors to each shard, and the requests in flight
  on them: ``shards.front_links.ShardLinks``;
- the dedup index (``DATA/front``, LMDB): ``shards.front_index.DedupIndex``;
- the metrics port: ``actors.http.HttpServer``; settings, metrics and the
  placement of virtual shards: ``shards.front_config``.

Run by the supervisor as ``python -m shards.front CONFIG.json``; the file's
``shards`` list is read again when it changes (Ray moves a shard).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Gauge, process_collector

from actors import signals
from actors.flags import Flag
from actors.http import HttpServer
from actors.security import ChannelSecurity
from shards.front_channels import ChannelEdge
from shards.front_config import FrontConfig, FrontMetrics, Placement, server_socket
from shards.front_domain import DomainRelay
from shards.front_events import EventsFanIn
from shards.front_fanout import FanOut
from shards.front_index import DedupIndex
from shards.front_links import ShardLinks
from shards.front_routing import Routing

logger = logging.getLogger("shards.front")


class Front:
    """The parts of the front, its loop and its housekeeping."""

    def __init__(self, cfg: FrontConfig, config_file: str | None, ctx: zmq.Context,
                 index: DedupIndex, links: ShardLinks, channels: ChannelEdge,
                 routing: Routing, events: EventsFanIn, domain: DomainRelay,
                 security: ChannelSecurity | None, http: HttpServer | None) -> None:
        self.cfg, self.config_file, self.ctx = cfg, config_file, ctx
        self.index, self.links, self.channels, self.routing = index, links, channels, routing
        self.events, self.domain, self.security, self.http = events, domain, security, http
        self.stop_flag = Flag()
        self.reload_flag = Flag()  # SIGHUP: read the client keys again
        self.config_mtime = os.stat(config_file).st_mtime if config_file else 0.0
        # lines that may come in floods (``LogThrottle``): summaries leave at housekeeping
        self.logs = (links.log, channels.log, domain.log, events.subscribers.log)
        self.poller = zmq.Poller()
        for sock in [channels.sock, domain.sock, *events.sockets(), *links.sockets()]:
            self.poller.register(sock, zmq.POLLIN)

    def run(self) -> None:
        last_check = 0.0
        links, events = self.links, self.events
        while not self.stop_flag.is_set():
            ready = dict(self.poller.poll(50))
            now = time.monotonic()
            for link in links.links:
                if ready.get(link.req):
                    links.from_shard(link, link.req)
                if ready.get(link.dom):
                    links.from_shard(link, link.dom)
                if link.sub is not None and ready.get(link.sub):
                    events.relay(link.sub)
                if ready.get(link.mon_req):
                    links.on_connection(link, "req")
                if ready.get(link.mon_dom):
                    links.on_connection(link, "dom")
            if ready.get(self.channels.sock):
                self.routing.from_channels()
            if ready.get(self.domain.sock):
                self.domain.from_domains()
            if ready.get(events.subscribers.monitor):
                events.subscribers.on_monitor()
            if events.proxy is None and ready.get(events.pub):
                events.on_subscriptions()
            # this round's dedup index entries (one fsync), then what waited for them
            self.routing.end_round()
            if now - last_check >= 0.05:
                last_check = now
                self._housekeeping(now)

    def _check_threads(self) -> None:
        """The one failure rule, as a single node's readiness: a dead metrics
        server or CURVE authenticator thread ends the front loudly (70), so
        the supervisor restarts it, instead of a front that no longer
        answers scrapes or handshakes."""
        for name, part in (("metrics http", self.http), ("authenticator", self.security)):
            if part is not None and not part.alive():
                logger.critical("the front's %s thread ended; the front exits (restarted)", name)
                raise SystemExit(70)

    def _housekeeping(self, now: float) -> None:
        self.events.check_proxy()
        self._check_threads()
        self.index.probe(now)
        self.links.check_health(now)
        self.links.expire(now)
        for log in self.logs:
            log.flush()
        if self.reload_flag.is_set():
            self.reload_flag.clear()
            if self.security is not None:
                try:
                    self.security.reload()
                    self.links.m.keys_reload_failed.set(0)
                except Exception as exc:  # noqa: BLE001 - a bad folder: keep the keys we have
                    logger.error("client keys not reloaded: %s", exc)
                    self.links.m.keys_reload_failed.set(1)
        if self.config_file:
            self._reread_config(self.config_file)

    def _reread_config(self, file: str) -> None:
        """Ray moved a shard: connect to where it is now."""
        try:
            mtime = os.stat(file).st_mtime
        except OSError:
            return
        if mtime == self.config_mtime:
            return
        self.config_mtime = mtime
        try:
            cfg = FrontConfig.read(file)
        except (OSError, ValueError, TypeError) as exc:
            logger.error("front config not re-read: %s", exc)
            return
        for link, new in zip(self.links.links, cfg.shards, strict=False):
            if link.endpoints() == (new["intake"], new["events"], new["domain_events"]):
                continue
            for sock in link.sockets():
                self.poller.unregister(sock)
            self.links.move(link, new)
            for sock in link.sockets():
                self.poller.register(sock, zmq.POLLIN)
            if self.events.proxy is not None:
                self.events.proxy.restart([lk.events for lk in self.links.links])

    def close(self) -> None:
        for log in self.logs:
            log.flush(ending=True)
        if self.http is not None:
            self.http.stop()
        self.events.close()
        self.links.close()
        self.channels.sock.close(0)
        self.domain.sock.close(0)
        if self.security is not None:
            self.security.stop()
        self.ctx.term()
        self.index.close()


def open_front(cfg: FrontConfig, config_file: str | None = None) -> Front:
    """Open every part of the front, in dependency order: the dedup index
    (and its lock), the endpoints, the connections to the shards, the
    metrics port."""
    registry = CollectorRegistry()
    process_collector.ProcessCollector(registry=registry)
    metrics = FrontMetrics(registry)
    index = DedupIndex(Path(cfg.data) / "front", metrics)
    engine_types = list(cfg.order_types)
    if not engine_types:
        from actors.settings import load_processes

        engine_types = sorted(load_processes(cfg.processes))
    ctx = zmq.Context()
    security = None
    curve: dict[str, Any] = {}
    if cfg.curve_server_key or cfg.curve_clients:
        security = ChannelSecurity(ctx, cfg.curve_server_key or "", cfg.curve_clients or "")
        curve = security.server_options()
    identity_required = security is not None
    intake = server_socket(ctx, zmq.ROUTER, ROUTER_MANDATORY=1, SNDHWM=10_000,
                           RCVHWM=10_000, MAXMSGSIZE=4 * 1024 * 1024, **curve)
    intake.bind(cfg.intake)
    events = EventsFanIn.open(ctx, cfg, curve, metrics)
    domain_sock = server_socket(ctx, zmq.ROUTER, ROUTER_MANDATORY=1,
                                MAXMSGSIZE=4 * 1024 * 1024, **curve)
    domain_sock.bind(cfg.domain_events)
    # CURVE on: the front's loop relays the events, from a SUB to each shard
    links = ShardLinks(ctx, cfg.shards, events.proxy is None, metrics)
    placement = Placement(cfg.vshards, tuple(cfg.owner))
    channels = ChannelEdge(intake, identity_required, metrics)
    routing = Routing(channels, links, index, placement, FanOut(channels, links), engine_types)
    domain = DomainRelay(domain_sock, links, placement, identity_required,
                         frozenset(cfg.systems))

    def ready() -> bool:
        return links.ready() and index.writable

    Gauge("oms_ready", "1 when every shard answers the front and can write, and so can the "
          "front's dedup index (the front's /readyz)",
          registry=registry).set_function(lambda: float(ready()))
    http = (HttpServer(cfg.metrics_host, cfg.metrics_port, registry, ready)
            if cfg.metrics_port else None)
    front = Front(cfg, config_file, ctx, index, links, channels, routing, events, domain,
                  security, http)
    logger.info("front ready: intake %s, events %s, domain events %s, %d shards",
                cfg.intake, cfg.events, cfg.domain_events, len(links.links))
    return front


def main(argv: list[str] | None = None) -> int:
    from actors import logs

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m shards.front CONFIG.json", file=sys.stderr)
        return 2
    cfg = FrontConfig.read(args[0])
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        front = open_front(cfg, args[0])
    except Exception as exc:  # noqa: BLE001 - any start failure is reported and exits 2
        print(f"oms front: cannot start: {exc}", file=sys.stderr)
        return 2
    ready = Path(cfg.data) / "front" / "ready"
    try:
        ready.write_text(f"pid {os.getpid()}\n")  # the supervisor's start waits for it
    except OSError as exc:  # a full disk: serve anyway (reads; submits answered unavailable)
        logger.error("front ready file not written (a starting supervisor waits for it): %s",
                     exc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: front.stop_flag.set())
    signal.signal(signal.SIGHUP, lambda *_: front.reload_flag.set())
    signals.unblock_hup()  # the supervisor starts it with SIGHUP held back until now
    try:
        front.run()
    finally:
        ready.unlink(missing_ok=True)
        front.close()
    logger.info("front stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
