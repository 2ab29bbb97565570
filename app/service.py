"""The whole service, started and stopped in one visible place.

Every actor runs on one event loop (``actors.eventloop``), started first.
Start order (dependencies first): store, store writer, publisher, order
router (which launches the timers, sequencer and gateways it needs through
``_order_parts``, giving them its ``deliver``), domain-events endpoint,
recovery, and only then the intake, so that no order is accepted before
every earlier one is back under management. Stop runs the reverse, in
``finally`` blocks: intake first (no new work), the store writer last (so
every snapshot already handed to it is committed), then the store is closed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from types import MappingProxyType
from typing import Any

import lmdb
import zmq
from prometheus_client import CollectorRegistry, gc_collector, platform_collector, process_collector

from actors import supervision
from actors.domain_events import DomainEvents
from actors.eventloop import EventLoop
from actors.http import HttpServer
from actors.intake import Intake
from actors.metrics import Metrics, ServiceCollector
from actors.ports import Deliver, OrderCore, OrderParts
from actors.publisher import Publisher
from actors.router import OrderRouter
from actors.security import ChannelSecurity, SecurityError, client_options
from actors.sequencer import Sequencer
from actors.settings import load_processes
from actors.store_writer import StoreWriter
from actors.timers import TimerService
from app import recovery
from gateways.breaker import LEVEL, Breaker
from gateways.gateway import Gateway
from oms.config import Config, ConfigError
from oms.engine import Engine
from storage.store import Store

logger = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 exit: Callable[[int], None] | None = supervision.hard_exit,  # noqa: A002
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.stop_requested = stop_requested  # asked during the start (SIGTERM): app.recovery
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        # a component that dies ends the process with ``exit(70)`` (actors.supervision)
        self.supervisor = supervision.Supervisor(self.metrics, exit)
        self._outer_supervisor: supervision.Supervisor | None = None
        self.ready = threading.Event()
        self._stops: list[tuple[str, Callable[[], object]]] = []
        self.http: HttpServer | None = None
        self.gateways: dict[str, Gateway] = {}  # by domain system
        self._domain_curve: dict[str, Any] = {}  # CURVE options of the gateways

    # -- start -------------------------------------------------------------

    def start(self) -> None:
        self._outer_supervisor = supervision.install(self.supervisor)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        cfg = self.config
        from actors.retention import check_settings

        check_settings(cfg)  # before anything starts: a bad setting stops it at once
        procs = load_processes(cfg.processes)
        missing = sorted({s for p in procs.values() for s in p.systems} - set(cfg.systems))
        if missing:
            raise ConfigError(f"no endpoint for domain system(s): {', '.join(missing)}; "
                              "add --system NAME=ENDPOINT")
        self.zctx = zmq.Context()
        self._stops.append(("zmq context", lambda: self.zctx.destroy(linger=0)))
        # every actor of the process runs on this one thread (actors.eventloop)
        self.loop = EventLoop("loop", supervisor=self.supervisor,
                              turn_seconds=self.metrics.loop_turn).start()
        self._stops.append(("event loop", self.loop.stop))
        loop = self.loop
        self.security = None
        channel_curve: dict[str, Any] = {}
        if cfg.curve_server_key or cfg.curve_clients:
            if not (cfg.curve_server_key and cfg.curve_clients):
                raise SecurityError("CURVE needs both --curve-server-key and --curve-clients")
            self.security = ChannelSecurity(self.zctx, cfg.curve_server_key, cfg.curve_clients)
            self._stops.append(("authenticator", self.security.stop))
            channel_curve = self.security.server_options()
        if cfg.domain_server_key:
            if not cfg.curve_server_key:
                raise SecurityError("--domain-server-key needs --curve-server-key (the "
                                    "service's own keypair)")
            self._domain_curve = client_options(cfg.curve_server_key,
                                                cfg.domain_server_key)
        if self.security is None:
            _warn_if_exposed(cfg)
        try:
            self.store = Store(cfg.data, map_size=cfg.map_size_mb * 1024 * 1024,
                               max_map_size=cfg.max_map_size_mb * 1024 * 1024,
                               epoch=cfg.epoch)  # epoch: fencing of a shard on Ray
        except lmdb.Error as exc:  # not an LMDB store: a restart cannot help (exit 2)
            raise ConfigError(f"data folder {cfg.data} cannot be opened: {exc}") from None
        self._stops.append(("store", self.store.close))
        self.writer = StoreWriter.launch(self.store, self.metrics, loop=loop)
        self._stops.append(("store writer", lambda: _stop_actor(self.writer)))
        self.publisher = Publisher.launch(self.zctx, cfg.events, self.metrics,
                                          curve=channel_curve, hwm=cfg.events_hwm,
                                          max_subscribers=cfg.max_subscribers,
                                          stall_timeout_s=cfg.subscriber_timeout_s, loop=loop)
        self._stops.append(("publisher", lambda: _stop_actor(self.publisher)))
        core = OrderCore(loop, self.store, self.metrics,
                         {t: Engine(p) for t, p in procs.items()}, self.writer, self.publisher)
        self.router = OrderRouter(core, self._order_parts, loop, cfg.passivate_after_s)
        self._stops.append(("passivator", self.router.stop))
        self.octx = self.router.ctx
        octx = self.octx
        self.domain_events = DomainEvents.launch(self.zctx, cfg.domain_events, octx,
                                                 curve=channel_curve, tagged=cfg.vshards > 0,
                                                 loop=loop)
        self._stops.append(("domain events", lambda: _stop_actor(self.domain_events)))
        self.registry.register(ServiceCollector(self.snapshot))
        for collector in (process_collector.ProcessCollector, platform_collector.PlatformCollector,
                          gc_collector.GCCollector):
            collector(registry=self.registry)
        if cfg.metrics_port:
            self.http = HttpServer(cfg.metrics_host, cfg.metrics_port, self.registry,
                                   lambda: self.ready.is_set() and self.store_writable,
                                   self.dead_components)
            self._stops.append(("metrics http", self.http.stop))
        self.recover()
        self.start_retention()
        self.intake = Intake.launch(self.zctx, cfg.intake, octx, cfg.max_in_flight,
                                    curve=channel_curve, vshards=cfg.vshards, loop=loop)
        self._stops.append(("intake", lambda: _stop_actor(self.intake)))
        self.ready.set()
        logger.info("service ready: intake %s, events %s, domain events %s", cfg.intake,
                    cfg.events, cfg.domain_events)

    def _order_parts(self, deliver: Deliver) -> OrderParts:
        """The order router's parts that need its ``deliver``: the timers,
        the sequencer and a gateway per domain system (``OrderRouter``
        builds them in its constructor, then the orders' context)."""
        cfg, loop = self.config, self.loop
        self.timers = TimerService(deliver, self.metrics, loop=loop)
        self._stops.append(("timers", self.timers.stop))
        self.sequencer = Sequencer.launch(deliver, loop=loop)
        self._stops.append(("sequencer", lambda: _stop_actor(self.sequencer)))
        for system, endpoint in cfg.systems.items():
            gateway = Gateway.launch(self.zctx, system, endpoint, deliver, self.metrics,
                                     breaker=Breaker(cfg.breaker_failures,
                                                     cfg.breaker_cooldown_s),
                                     curve=self._domain_curve, loop=loop)
            self.gateways[system] = gateway
            self._stops.append((f"gateway {system}", partial(_stop_actor, gateway)))
        return OrderParts(self.timers, self.sequencer, MappingProxyType(dict(self.gateways)))

    @property
    def store_writable(self) -> bool:
        """False while store commits fail (disk full, map at its cap, I/O
        error): the service is then not ready (see actors.store_writer).
        Safe from any thread: the writer's ``writable`` flag."""
        writer = getattr(self, "writer", None)
        return writer is not None and writer.writable.is_set()

    def reload_keys(self) -> None:
        """SIGHUP: read the allowed client keys again (only those: say so)."""
        logger.info("SIGHUP: %s; process definitions are read at start only (restart to "
                    "use changed ones)", "CURVE is off, no client keys to read"
                    if self.security is None else "reading the client keys again")
        if self.security is not None:
            try:
                self.security.reload()
            except SecurityError:
                self.metrics.keys_reload_failed.set(1)
                raise
            self.metrics.keys_reload_failed.set(0)

    def recover(self) -> None:
        """Every unfinished order back under management (``app.recovery``);
        ``Interrupted`` if a stop is asked for meanwhile."""
        recovery.recover(self, self.stop_requested)

    def dead_components(self) -> list[str]:
        """Components whose thread has ended (readiness: none may be). Called
        from the metrics thread: each ``alive()`` reads only thread-safe
        state (a thread's liveness, a stop flag), never an actor's fields."""
        parts: list[tuple[str, Any]] = [
            ("timers", getattr(self, "timers", None)),
            ("passivator", getattr(self, "router", None)),
            ("event loop", getattr(self, "loop", None)),
            ("metrics http", self.http),
            ("authenticator", getattr(self, "security", None)),
        ]
        for name in ("writer", "publisher", "sequencer", "domain_events", "intake"):
            actor = getattr(self, name, None)
            parts.append((getattr(actor, "component", name), actor))
        parts += [(f"gateway {system}", g) for system, g in list(self.gateways.items())]
        dead = [name for name, part in parts if part is not None and not part.alive()]
        return list(dict.fromkeys(self.supervisor.dead + dead))

    def is_ready(self) -> bool:
        """Recovered, accepting orders, the store writable, and every component alive."""
        return self.ready.is_set() and self.store_writable and not self.dead_components()

    def snapshot(self) -> dict[str, Any]:
        """Values read at scrape time, by the metrics thread. Only through
        the seams that are safe from any thread (docs/architecture.md, "Who
        owns what"): the order counts (under their lock), each actor's
        mailbox depth, each gateway's ``gauges`` (a value it replaces on the
        loop), the store's read transactions."""
        snap = self.router.snapshot()
        snap.update(self.store.stats())
        snap["ready"] = self.is_ready()
        gauges = {n: g.gauges for n, g in self.gateways.items()}
        snap["mailboxes"] = {
            "store_writer": self.writer.mailbox_depth(),
            "publisher": self.publisher.mailbox_depth(),
            "loop_runnable": self.loop.backlog(),  # actors with mail waiting for the loop
            **{f"gateway_{n}": g.mailbox_depth() for n, g in self.gateways.items()},
        }
        snap["pending"] = {n: g.pending for n, g in gauges.items()}
        snap["breakers"] = {n: LEVEL[g.breaker] for n, g in gauges.items()}
        return self.retention_snapshot(snap)

    def retention_snapshot(self, snap: dict[str, Any]) -> dict[str, Any]:
        snap["retention"] = dict(self.store.retention_stats(),
                                 retention_s=self.config.retention_s)
        return snap

    def start_retention(self) -> None:
        """The retention thread (after recovery; stopped before the writer)."""
        from actors.retention import Retention

        self.retention = Retention(self.store, self.writer, self.metrics, self.config)
        self._stops.append(("retention", self.retention.stop))
        self.retention.start()

    # -- stop --------------------------------------------------------------

    def stop(self) -> None:
        """Reverse start order; each part is stopped even if another fails."""
        self.supervisor.stopping = True  # threads ending from here on are not deaths
        self.ready.clear()
        while self._stops:
            name, stop = self._stops.pop()
            try:
                stop()
            except Exception:
                logger.exception("stopping %s failed", name)
        supervision.install(self._outer_supervisor)
        logger.info("service stopped")


LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def _warn_if_exposed(cfg: Config) -> None:
    """CURVE is off: say so loudly if an endpoint listens beyond this host."""
    exposed = [ep for ep in (cfg.intake, cfg.events, cfg.domain_events)
               if ep.startswith("tcp://") and not ep[6:].startswith(LOOPBACK_HOSTS)]
    if exposed:
        logger.warning("CURVE is off and %s listen(s) beyond this host: any peer that can "
                       "connect may submit, cancel and operate on orders (every client is an "
                       "operator) and forge domain events; turn CURVE on (docs/security.md) "
                       "or bind 127.0.0.1", ", ".join(exposed))


def _stop_actor(actor: Any, timeout: float = 10.0) -> None:
    """Stop a loop actor after it has handled everything already queued
    (nothing to wait for if its loop has ended: no turn would handle it)."""
    if not actor.alive():
        return
    actor.actor_ref.stop(block=True, timeout=timeout)
    actor.join(timeout)
