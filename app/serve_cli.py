"""`oms serve`, `oms ray` and `oms shards`: run the service (one process
or shards) and move virtual shards."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

from actors import logs, signals
from actors.runtime import tune_gc
from actors.settings import load_config
from oms.config import ConfigError, check_utf8_path, parse_systems

logger = logging.getLogger("oms")


def endpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intake", help="intake endpoint (env OMS_INTAKE)")
    p.add_argument("--events", help="channel events PUB endpoint (env OMS_EVENTS)")


def add_parsers(sub: Any) -> None:
    """serve, ray, shards."""
    serve = sub.add_parser("serve", help="run the order management service")
    serve.add_argument("--config", help="TOML file with any of the settings below")
    serve.add_argument("--data", help="data folder (env OMS_DATA; default ./oms-data)")
    endpoint_flags(serve)
    serve.add_argument("--domain-events", help="domain events ROUTER endpoint")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off")
    serve.add_argument("--system", action="append", metavar="NAME=EP",
                       help="domain system endpoint (repeatable)")
    serve.add_argument("--processes", help="folder of process definitions (*.toml)")
    serve.add_argument("--workers", type=int, help="no effect: every actor runs on the "
                       "event loop (accepted so existing command lines still work)")
    serve.add_argument("--max-in-flight", type=int, help="admission limit")
    serve.add_argument("--retention-s", type=float, help="finished orders older than this "
                       "leave the live store for the archive (0 = keep; default 30 days)")
    serve.add_argument("--dedup-window-s", type=float, help="an archived order's external id "
                       "is still a duplicate this long after it finished (default 90 days)")
    serve.add_argument("--curve-server-key", metavar="FILE",
                       help="the service's secret key file: turns CURVE on for channels")
    serve.add_argument("--curve-clients", metavar="DIR",
                       help="folder of allowed public keys; file name = identity")
    serve.add_argument("--domain-server-key", metavar="FILE",
                       help="domain systems' public key: CURVE toward them as well")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument("--shards", type=int, help="shard processes behind one front "
                       "(env OMS_SHARDS; default 1: one process, no front; docs/scaling.md)")
    serve.add_argument("--shard-base-port", type=int, help="shard K serves its metrics on "
                       "127.0.0.1 port BASE+4K+3 (default 5600; its other endpoints are "
                       "Unix sockets in DATA/run)")

    rayp = sub.add_parser("ray", help="shards on a Ray cluster: up, status, down "
                          "(pip install 'oms[ray]'; docs/scaling.md)")
    rayp.add_argument("action", choices=["up", "status", "down"])
    rayp.add_argument("--address", default="auto", help="Ray cluster (default %(default)s)")
    rayp.add_argument("--config", help="TOML file of the service's settings")
    rayp.add_argument("--data", help="data folder on storage every node reaches")
    rayp.add_argument("--shards", type=int, help="shard processes (default 2)")
    rayp.add_argument("--shard-base-port", type=int, help="shard K: ports BASE+4K..+3")
    endpoint_flags(rayp)
    rayp.add_argument("--domain-events", help="domain events ROUTER endpoint (the front)")
    rayp.add_argument("--metrics-port", type=int, help="the front's Prometheus port, 0 = off")
    rayp.add_argument("--system", action="append", metavar="NAME=EP")
    rayp.add_argument("--processes", help="folder of process definitions (*.toml)")

    shp = sub.add_parser("shards", help="a sharded data folder: show where the virtual "
                         "shards are, or move them (service stopped; docs/scaling.md)")
    shsub = shp.add_subparsers(dest="action", required=True)
    shshow = shsub.add_parser("show", help="virtual shards per process")
    shshow.add_argument("--data", required=True)
    shmove = shsub.add_parser("move", help="rebalance onto --processes M (offline)")
    shmove.add_argument("--data", required=True)
    shmove.add_argument("--processes", type=int, required=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.security import SecurityError
    from app.recovery import Interrupted
    from app.service import Service
    from storage.store import StoreLocked

    systems = parse_systems(args.system, "--system") if args.system else None
    cfg = load_config(args.config, data=args.data, intake=args.intake, events=args.events,
                      domain_events=args.domain_events, metrics_port=args.metrics_port,
                      systems=systems, processes=args.processes, workers=args.workers,
                      max_in_flight=args.max_in_flight, log_level=args.log_level,
                      retention_s=args.retention_s, dedup_window_s=args.dedup_window_s,
                      log_format=args.log_format, curve_server_key=args.curve_server_key,
                      curve_clients=args.curve_clients,
                      domain_server_key=args.domain_server_key, shards=args.shards,
                      shard_base_port=args.shard_base_port)
    logs.setup(cfg.log_level, cfg.log_format)
    stop, reload = signals.guard()  # installed before the imports already (app.cli)
    if stop.is_set():
        logger.info("signal received while starting: not started")
        return 0
    if cfg.shards != 1:  # docs/scaling.md
        from shards.supervisor import run_sharded

        return run_sharded(cfg, args.config, stop, reload)
    if not cfg.vshards and (Path(cfg.data) / "shards.json").exists():
        raise ConfigError(f"{cfg.data} holds a sharded service (shards.json): run oms serve "
                          "--shards N on it (N as in the file)")
    service = Service(cfg, stop_requested=stop.is_set)
    tune_gc()  # before start: recovery runs under these thresholds (see actors.runtime)
    try:
        service.start()
    except Interrupted as exc:  # SIGTERM during recovery: stopped, the intake never opened
        logger.info("signal received while starting: %s; stopped before the intake opened "
                    "(the next start recovers every unfinished order)", exc)
        return _exit_quickly(0)
    except (StoreLocked, SecurityError) as exc:
        print(f"oms serve: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        raise  # the loop did not answer in time (recovery's run_sync): a fault, not exit 2
    except OSError as exc:
        print(f"oms serve: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith("zmq"):
            print(f"oms serve: cannot open an endpoint: {exc}", file=sys.stderr)
            return 2
        raise
    if reload.is_set():
        logger.info("SIGHUP while starting: applied now that the service is ready")
    try:
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                try:
                    service.reload_keys()
                except SecurityError as exc:
                    logger.error("keys not reloaded: %s", exc)
        logger.info("signal received: draining and stopping")
    finally:
        service.stop()
    return _exit_quickly(0)


def _exit_quickly(code: int) -> int:
    """Everything is committed and closed: keep the interpreter's exit from
    passing over every order still in memory (its collections at exit took
    6 s for 30,000 recovered orders, after "service stopped")."""
    gc.freeze()
    return code


def cmd_ray(args: argparse.Namespace) -> int:
    try:
        from shards.ray_cluster import cmd_ray as run
    except ImportError as exc:
        raise ConfigError(f"Ray is not installed ({exc}): pip install 'oms[ray]'") from None
    systems = parse_systems(args.system, "--system") if args.system else None
    cfg = load_config(args.config, data=args.data, intake=args.intake, events=args.events,
                      domain_events=args.domain_events, metrics_port=args.metrics_port,
                      systems=systems, processes=args.processes,
                      shards=args.shards or 2, shard_base_port=args.shard_base_port)
    return run(args, cfg)


def cmd_shards(args: argparse.Namespace) -> int:
    from shards import reshard
    from storage.store import StoreLocked

    check_utf8_path(args.data, "--data")
    try:
        out = (reshard.show(args.data) if args.action == "show"
               else reshard.move(args.data, args.processes))
    except StoreLocked as exc:
        raise ConfigError(f"{exc} (stop the service before moving virtual shards)") from None
    except OSError as exc:  # e.g. DATA/supervisor.lock a folder
        raise ConfigError(str(exc)) from None
    print(json.dumps(out, indent=1))
    return 0

