"""``oms serve --shards N``: N shard processes and the front, kept running.

Each shard is a full ``oms serve`` on ``DATA/shard-K`` whose intake, events
and domain-events endpoints are Unix sockets in a folder only this user may
enter (``shards.rundir``), its metrics on a loopback port; the front
(``shards.front``) owns the configured endpoints. One supervisor a data
folder, and no ``oms shards move`` while it runs (``DATA/supervisor.lock``,
``shards.manifest.take_lock``). A child that exits is started again
(backoff 0.5 s doubling to 10 s, back to 0.5 s after a minute up).
SIGTERM/SIGINT stop the front first (no new work), then the shards, which
drain as a single service does. Children get SIGTERM if this process dies
(Linux parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors import signals
from actors.flags import Flag
from oms.config import Config, ConfigError
from shards import manifest as mf
from shards import rundir
from shards.manifest import ShardEndpoints
from storage import files

logger = logging.getLogger("shards.supervisor")

BACKOFF_START_S, BACKOFF_MAX_S, STABLE_S = 0.5, 10.0, 60.0
USAGE_EXIT = 2  # `oms serve` and the front: bad configuration, port in use, folder locked


def _in_child() -> None:  # pragma: no cover - runs in the child, before exec
    """SIGTERM when this process dies; SIGHUP held back (pending, not lost)
    until the child has its handler (``actors.signals``): Python's default
    action for it would end a child that is still starting."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signals.block_hup()


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_in_child)  # noqa: PLW1509
        self.started = time.monotonic()
        self.restart_at = None

    def stop(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("%s did not stop within %g s: killed", self.name, timeout)
            self.proc.kill()
            return self.proc.wait()


def shard_argv(cfg: Config, k: int, ep: ShardEndpoints, config_file: str | None) -> list[str]:
    argv = [sys.executable, "-m", "app.cli", "serve", "--shards", "1",
            "--data", str(mf.shard_folder(cfg.data, k)), "--intake", ep.intake,
            "--events", ep.events, "--domain-events", ep.domain_events,
            "--metrics-port", str(ep.metrics_port if cfg.metrics_port else 0),
            "--workers", str(cfg.workers), "--max-in-flight",
            str(max(1, -(-cfg.max_in_flight // cfg.shards))),
            "--log-level", cfg.log_level, "--log-format", cfg.log_format,
            "--retention-s", repr(cfg.retention_s), "--dedup-window-s", repr(cfg.dedup_window_s)]
    if config_file:
        argv += ["--config", config_file]
    if cfg.processes:
        argv += ["--processes", cfg.processes]
    for name, endpoint in cfg.systems.items():
        argv += ["--system", f"{name}={endpoint}"]
    return argv


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment for a shard: every ``OMS_*`` setting carries
    over (flags override the ones the supervisor sets), except CURVE, which
    the front does: empty values win over a config file's keys."""
    env = dict(os.environ)
    env.update({"OMS_CURVE_SERVER_KEY": "", "OMS_CURVE_CLIENTS": "",
                "OMS_DOMAIN_SERVER_KEY": ""})
    env.update(extra)
    return env


def front_config(cfg: Config, manifest: mf.Manifest,
                 shards: list[ShardEndpoints]) -> dict[str, Any]:
    return {"data": cfg.data, "intake": cfg.intake, "events": cfg.events,
            "domain_events": cfg.domain_events, "vshards": manifest.vshards,
            "owner": manifest.owner,
            "shards": [{"intake": s.intake, "events": s.events,
                        "domain_events": s.domain_events} for s in shards],
            "processes": cfg.processes, "metrics_host": cfg.metrics_host,
            "metrics_port": cfg.metrics_port, "curve_server_key": cfg.curve_server_key,
            "curve_clients": cfg.curve_clients, "systems": sorted(cfg.systems),
            "events_hwm": cfg.events_hwm, "subscriber_timeout_s": cfg.subscriber_timeout_s,
            "max_subscribers": cfg.max_subscribers,
            "log_level": cfg.log_level,
            "log_format": cfg.log_format}


def write_json(file: Path, value: Any) -> None:
    files.write_atomically(file, json.dumps(value, indent=1))


def targets(cfg: Config, shards: list[ShardEndpoints]) -> list[dict[str, Any]]:
    """Prometheus file_sd: each shard a target with its ``shard`` label."""
    if not cfg.metrics_port:
        return []
    out = [{"targets": [f"127.0.0.1:{s.metrics_port}"], "labels": {"shard": str(k)}}
           for k, s in enumerate(shards)]
    out.append({"targets": [f"{cfg.metrics_host}:{cfg.metrics_port}"],
                "labels": {"shard": "front"}})
    return out


class Supervisor:
    def __init__(self, cfg: Config, config_file: str | None = None) -> None:
        if cfg.domain_server_key:
            raise ConfigError("--domain-server-key is not supported with --shards yet "
                              "(docs/scaling.md)")
        if bool(cfg.curve_server_key) != bool(cfg.curve_clients):
            raise ConfigError("CURVE needs both --curve-server-key and --curve-clients")
        self.cfg = cfg
        self.data = Path(cfg.data)
        rundir.check_data(self.data)  # before anything is written in it
        with contextlib.ExitStack() as undo:  # a failed start leaves nothing held
            self.lock = mf.take_lock(self.data, "oms serve --shards")
            undo.callback(self.lock.close)
            self.manifest = mf.open_or_create(self.data, cfg.shards)
            self.run_dir = rundir.open_run_dir(self.data, cfg.shards)
            undo.callback(self.run_dir.remove)
            self.endpoints = [ShardEndpoints.private(self.run_dir.path, cfg.shard_base_port, k)
                              for k in range(cfg.shards)]
            self.shards = [Child(f"shard-{k}", shard_argv(cfg, k, ep, config_file), child_env(
                {"OMS_VSHARDS": str(self.manifest.vshards), "OMS_LOG_SHARD": str(k)}))
                           for k, ep in enumerate(self.endpoints)]
            self.front_file = self.data / "front.json"
            write_json(self.front_file, front_config(cfg, self.manifest, self.endpoints))
            self.ready_file = self.data / "front" / "ready"
            self.front = Child("front", [sys.executable, "-m", "shards.front",
                                         str(self.front_file)],
                               child_env({"OMS_LOG_SHARD": "front"}))
            self.targets_file = self.data / "prometheus-targets.json"
            write_json(self.targets_file, targets(cfg, self.endpoints))
            self.stopping = threading.Event()
            undo.pop_all()  # held until ``stop``

    def children(self) -> list[Child]:
        return [*self.shards, self.front]

    def start(self, timeout: float = 120.0, stop: Flag | None = None) -> bool:
        """Start every child and wait until all are ready (True), or until
        ``stop`` is set (False: SIGTERM while starting). A child that exits
        with 2 (its configuration, a port in use, a locked folder) cannot
        start: raise. Any other exit (killed, out of memory, exit 70) is
        restarted as ``watch`` does, with the same backoff, and waited for."""
        from gateways.client import Client

        self.ready_file.unlink(missing_ok=True)
        for child in self.children():
            child.start()
        deadline = time.monotonic() + timeout
        waiting = {k: Client(ep.intake, timeout=1.0) for k, ep in enumerate(self.endpoints)}
        try:
            while waiting or not self.ready_file.exists():
                if stop is not None and stop.is_set():
                    return False
                for child in self.children():
                    proc = child.proc if child.restart_at is None else None
                    if proc is not None and proc.poll() == USAGE_EXIT:
                        raise ConfigError(f"{child.name} exited with code {USAGE_EXIT} at "
                                          "start (its log above says why)")
                    self._check(child, time.monotonic())  # any other exit: restarted
                for k in list(waiting):
                    try:
                        waiting[k].request({"type": "get_order", "order_id": "-"}, timeout=0.2)
                        waiting.pop(k).close()
                    except TimeoutError:
                        pass
                if time.monotonic() > deadline:
                    exits = "; ".join(f"{c.name} exited with {c.exits}" for c in self.children()
                                      if c.exits)
                    raise ConfigError(f"the shards were not ready within {timeout:g} s"
                                      + (f" ({exits})" if exits else ""))
                if not waiting:
                    time.sleep(0.05)  # the front's ready file: nothing to wait on but the disk
        finally:
            for client in waiting.values():
                client.close()
        logger.info("sharded service ready: %d shards behind intake %s, events %s",
                    len(self.shards), self.cfg.intake, self.cfg.events)
        return True

    def watch(self, stop: Flag, reload: Flag | None = None) -> None:
        """Until ``stop`` (or ``stopping``) is set: restart any child that
        exits, and pass a ``reload`` (SIGHUP) on to the front, which holds
        the client keys. Runs on the thread that started the children: a
        child's ``PR_SET_PDEATHSIG`` follows the thread that forked it, so a
        child restarted from another thread would get SIGTERM when that
        thread ended, before the front in the stop order."""
        while not stop.wait(0.1) and not self.stopping.is_set():
            if reload is not None and reload.is_set():
                reload.clear()
                self.forward_reload()
            now = time.monotonic()
            for child in self.children():
                self._check(child, now)

    def forward_reload(self) -> None:
        """SIGHUP to the front (the shards run without CURVE: nothing to read again)."""
        proc = self.front.proc
        if proc is not None and proc.poll() is None:
            logger.info("SIGHUP: passed on to the front (client keys read again)")
            proc.send_signal(signal.SIGHUP)
        else:  # restarting: it reads the keys as it starts
            logger.warning("SIGHUP: the front is not running; it reads the keys when it starts")

    def _check(self, child: Child, now: float) -> None:
        if child.proc is None:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                logger.warning("restarting %s (restart %d)", child.name, child.restarts)
                child.start()
            return
        code = child.proc.poll()
        if code is None:
            if now - child.started > STABLE_S:
                child.backoff = BACKOFF_START_S
            return
        child.exits.append(code)
        if child is self.front:  # its ready file is the dead front's: not ready until anew
            self.ready_file.unlink(missing_ok=True)
        child.restarts += 1
        child.restart_at = now + child.backoff
        logger.error("%s exited with code %s; restarting in %.1f s", child.name, code,
                     child.backoff)
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        self.stopping.set()
        self.front.stop(10.0)
        for child in self.shards:  # SIGTERM to all at once, then wait for each
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.shards:
            child.stop(60.0)
        self.run_dir.remove()
        self.lock.close()
        logger.info("sharded service stopped")


def run_sharded(cfg: Config, config_file: str | None, stop: Flag,
                reload: Flag | None = None) -> int:
    try:  # a lock or settings path that is no file, a full disk: exit 2, as ``oms serve``
        sup = Supervisor(cfg, config_file)
    except OSError as exc:
        raise ConfigError(f"cannot start: {exc}") from None
    try:
        started = sup.start(stop=stop)
    except BaseException as exc:  # whatever it is, no child is left running
        sup.stop()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot start: {exc}") from None
        raise
    if not started:
        logger.info("signal received while starting: stopping the front, then the shards")
        sup.stop()
        return 0
    try:
        sup.watch(stop, reload)  # on this thread, the one that started the children
        logger.info("signal received: stopping the front, then the shards")
    finally:
        sup.stop()
    return 0
