"""Shards on a Ray cluster (``pip install 'oms[ray]'``; docs/scaling.md).

Ray is the control plane only: it places and restarts processes. Each shard
is a named, detached actor (``oms-shard-K``, namespace ``oms``) in a bundle
of a placement group (strategy SPREAD); the actor runs the shard's
``oms serve`` process on its node and starts it again if it exits. The
front is an actor (``oms-front``) running the front process; it asks the
shard actors where they are (a Ray call) and rewrites the front's config
file when a shard has moved, and the front reconnects. Orders, replies and
events travel over ZeroMQ between the processes, never through Ray.

A shard's data folder must be on storage every node can reach. Each start
of a shard takes a new fencing epoch (the one stored in its LMDB + 1), so
a stale copy on a node that was only cut off exits before its next commit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from oms.config import Config
from shards import manifest as mf
from shards.manifest import ShardEndpoints
from shards.supervisor import child_env, front_config, shard_argv, write_json

NAMESPACE = "oms"
PG_NAME = "oms-shards"
FRONT = "oms-front"


def shard_name(k: int) -> str:
    return f"oms-shard-{k}"


def _kill_with_parent() -> None:  # pragma: no cover - runs in the child
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # a node gone is a crash
    except OSError:
        pass


def stored_epoch(folder: Path) -> int:
    """The fencing epoch in a shard's LMDB (0 when none), read without its lock."""
    import lmdb

    if not (folder / "data.mdb").exists():
        return 0
    env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=8)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(db=meta) as txn:
            return int(txn.get(b"epoch", b"0"))
    except lmdb.Error:
        return 0
    finally:
        env.close()


class Keeper:
    """Runs one child process and starts it again when it exits."""

    def __init__(self, argv_of: Any, env: dict[str, str], log: Path) -> None:
        self.argv_of, self.env, self.log = argv_of, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keeper", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set():
            self.starts += 1
            started = time.monotonic()
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(self.argv_of(), env=self.env, stdout=out,
                                             stderr=out, preexec_fn=_kill_with_parent)  # noqa: PLW1509
            self.proc.wait()
            if time.monotonic() - started > 30:
                backoff = 0.2
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@ray.remote(num_cpus=0)
class ShardActor:
    """Shard K: runs ``oms serve`` on DATA/shard-K with a new fencing epoch."""

    def __init__(self, k: int, cfg: dict[str, Any], vshards: int) -> None:
        self.k = k
        self.cfg = Config(**cfg)
        self.folder = mf.shard_folder(self.cfg.data, k)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = ray.util.get_node_ip_address()
        self.eps = ShardEndpoints.local(self.cfg.shard_base_port, k, self.host)
        self.node = ray.get_runtime_context().get_node_id()
        self.epoch = 0

        env = child_env({"OMS_VSHARDS": str(vshards), "OMS_LOG_SHARD": str(k)})

        def argv() -> list[str]:  # each start: a new epoch, above the stored one
            self.epoch = stored_epoch(self.folder) + 1
            env["OMS_EPOCH"] = str(self.epoch)
            return shard_argv(self.cfg, k, self.eps, None)

        self.keeper = Keeper(argv, env, Path(self.cfg.data) / f"shard-{k}.log")

    def where(self) -> dict[str, Any]:
        proc = self.keeper.proc
        return {"intake": self.eps.intake, "events": self.eps.events,
                "domain_events": self.eps.domain_events, "metrics_port": self.eps.metrics_port,
                "node": self.node, "pid": proc.pid if proc else None, "epoch": self.epoch,
                "starts": self.keeper.starts}

    def stop(self) -> None:
        self.keeper.stop()


@ray.remote(num_cpus=0)
class FrontActor:
    """The front process, told where the shards are by their actors."""

    def __init__(self, cfg: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.cfg = Config(**cfg)
        self.manifest = mf.Manifest(manifest["vshards"], manifest["processes"],
                                    manifest["owner"])
        self.file = Path(self.cfg.data) / "front.json"
        self.shards = self._locate()
        self._write()
        self.keeper = Keeper(lambda: [sys.executable, "-m", "shards.front", str(self.file)],
                             child_env({"OMS_LOG_SHARD": "front"}),
                             Path(self.cfg.data) / "front.log")
        self.stopping = threading.Event()
        threading.Thread(target=self._follow, name="follow", daemon=True).start()

    def _locate(self) -> list[ShardEndpoints]:
        out: list[ShardEndpoints] = []
        for k in range(self.manifest.processes):
            actor = ray.get_actor(shard_name(k), namespace=NAMESPACE)
            # an actor handle is untyped: ray.get cannot know that ``where`` returns a dict
            w = cast(dict[str, Any], ray.get(actor.where.remote(), timeout=60))
            out.append(ShardEndpoints(w["intake"], w["events"], w["domain_events"],
                                      w["metrics_port"]))
        return out

    def _write(self) -> None:
        write_json(self.file, front_config(self.cfg, self.manifest, self.shards))

    def _follow(self) -> None:
        """Control plane: a moved shard's endpoints go to the front's config file."""
        while not self.stopping.wait(0.5):
            try:
                found = self._locate()
            except Exception:  # noqa: BLE001, S112 - an actor restarting: ask again next round
                continue
            if found != self.shards:
                self.shards = found
                self._write()

    def where(self) -> dict[str, Any]:
        return {"intake": self.cfg.intake, "events": self.cfg.events,
                "domain_events": self.cfg.domain_events,
                "node": ray.get_runtime_context().get_node_id()}

    def stop(self) -> None:
        self.stopping.set()
        self.keeper.stop()


def up(cfg: Config, front_resources: dict[str, float] | None = None,
       timeout: float = 120.0) -> dict[str, Any]:
    """Place the shards (SPREAD) and the front; return where they are.
    Needs ``ray.init`` (namespace ``oms``) done by the caller."""
    manifest = mf.open_or_create(cfg.data, cfg.shards)
    plain = dict(vars(cfg))
    pg = placement_group([{"CPU": 1}] * cfg.shards, strategy="SPREAD", name=PG_NAME,
                         lifetime="detached")
    ray.get(pg.ready(), timeout=timeout)
    shards = []
    for k in range(cfg.shards):
        shards.append(ShardActor.options(  # type: ignore[attr-defined]
            name=shard_name(k), namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            max_task_retries=-1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=k),
        ).remote(k, plain, manifest.vshards))
    ray.get([s.where.remote() for s in shards], timeout=timeout)
    front = FrontActor.options(  # type: ignore[attr-defined]
        name=FRONT, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
        max_task_retries=-1, resources=front_resources or {},
    ).remote(plain, manifest.to_json())
    return status(timeout) | {"front": ray.get(front.where.remote(), timeout=timeout)}


def status(timeout: float = 30.0) -> dict[str, Any]:
    out: dict[str, Any] = {"shards": []}
    k = 0
    while True:
        try:
            actor = ray.get_actor(shard_name(k), namespace=NAMESPACE)
        except ValueError:
            break
        out["shards"].append(ray.get(actor.where.remote(), timeout=timeout))
        k += 1
    return out


def down() -> None:
    for name in [FRONT] + [shard_name(k) for k in range(1000)]:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if name != FRONT:
                break
            continue
        try:
            ray.get(actor.stop.remote(), timeout=60)
        except Exception:  # noqa: BLE001, S110 - it is killed below either way
            pass
        ray.kill(actor, no_restart=True)
    try:
        remove_placement_group(ray.util.get_placement_group(PG_NAME))
    except ValueError:
        pass


def cmd_ray(args: Any, cfg: Config) -> int:
    from oms.config import ConfigError

    try:
        ray.init(address=args.address, namespace=NAMESPACE)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {args.address}: {exc}") from None
    try:
        if args.action == "up":
            print(json.dumps(up(cfg), indent=1))
        elif args.action == "status":
            print(json.dumps(status(), indent=1))
        else:
            down()
            print("oms ray: shards and front stopped")
    finally:
        ray.shutdown()
    return 0

