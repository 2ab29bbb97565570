"""The manifest of a sharded data folder (``DATA/shards.json``), where
each shard process lives (its folder and its endpoints), and the folder's
lock (``DATA/supervisor.lock``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oms.config import ConfigError
from oms.sharding import DEFAULT_VSHARDS, MAX_VSHARDS
from shards import rundir
from storage import files

FILE = "shards.json"
LOCK = "supervisor.lock"


@dataclass
class Manifest:
    vshards: int
    processes: int
    owner: list[int]
    epochs: list[int] = field(default_factory=list)
    created: float = 0.0

    @classmethod
    def new(cls, processes: int, vshards: int = DEFAULT_VSHARDS) -> Manifest:
        check_counts(processes, vshards)
        return cls(vshards, processes, [v % processes for v in range(vshards)],
                   [0] * processes, time.time())

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "vshards": self.vshards, "processes": self.processes,
                "owner": self.owner, "epochs": self.epochs, "created": self.created}

    def process_of(self, vshard: int) -> int:
        return self.owner[vshard]

    def vshards_of(self, process: int) -> list[int]:
        return [v for v, p in enumerate(self.owner) if p == process]


def check_counts(processes: int, vshards: int) -> None:
    if not 2 <= vshards <= MAX_VSHARDS:
        raise ConfigError(f"virtual shards must be 2..{MAX_VSHARDS}, not {vshards}")
    if not 1 <= processes <= vshards:
        raise ConfigError(f"--shards must be 1..{vshards} (the virtual shards), not "
                          f"{processes}")


def path(data: str | Path) -> Path:
    return Path(data) / FILE


def load(data: str | Path) -> Manifest | None:
    """The folder's manifest, None when it is not sharded; a clear error when broken."""
    file = path(data)
    if not file.exists():
        return None
    try:
        raw = json.loads(files.read_text(file))  # a FIFO: refused, not waited on
        m = Manifest(int(raw["vshards"]), int(raw["processes"]), [int(p) for p in raw["owner"]],
                     [int(e) for e in raw.get("epochs") or [0] * int(raw["processes"])],
                     float(raw.get("created", 0.0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file} is not a readable shard manifest: {exc}") from None
    check_counts(m.processes, m.vshards)
    if len(m.owner) != m.vshards or any(not 0 <= p < m.processes for p in m.owner):
        raise ConfigError(f"{file}: owner must name a process 0..{m.processes - 1} for each "
                          f"of the {m.vshards} virtual shards")
    if len(m.epochs) != m.processes:
        m.epochs = (m.epochs + [0] * m.processes)[:m.processes]
    return m


def save(data: str | Path, manifest: Manifest) -> None:
    """Atomically (``storage.files.write_atomically``: a new temporary
    file, fsync, rename, the folder synced)."""
    file = path(data)
    file.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(file, json.dumps(manifest.to_json(), indent=1))


def open_or_create(data: str | Path, processes: int,
                   vshards: int = DEFAULT_VSHARDS) -> Manifest:
    """For ``oms serve --shards N``: the manifest, created on first use."""
    folder = Path(data)
    m = load(folder)
    if m is None:
        if (folder / "data.mdb").exists():
            raise ConfigError(f"{folder} holds a single-process service's data; shards need "
                              "a new data folder (see docs/scaling.md)")
        m = Manifest.new(processes, vshards)
        save(folder, m)
        return m
    if m.processes != processes:
        raise ConfigError(f"{folder} is sharded for {m.processes} processes, not {processes}: "
                          f"run with --shards {m.processes}, or move virtual shards first "
                          f"(oms shards move --data {folder} --processes {processes})")
    return m


def take_lock(data: Path, holder: str) -> Any:
    """``DATA/supervisor.lock``, held by whoever may change what the running
    front was told (``front.json``, the manifest): the supervisor while it
    runs (``holder`` "oms serve --shards"), or ``oms shards move``. A second
    supervisor would rewrite ``front.json`` under the running front; a move
    while the supervisor runs would move records under it, the shards'
    own locks being free whenever the shards are between a crash and their
    restart. The open file is returned: the lock lasts until it is closed."""
    data.mkdir(parents=True, exist_ok=True)
    try:
        return files.take_lock(data / LOCK, holder)
    except files.Held as held:
        raise ConfigError(f"data folder {data} is in use by {held.owner}; stop the service "
                          "(or let the move end) first, or pass another --data folder") from None


def shard_folder(data: str | Path, k: int) -> Path:
    return Path(data) / f"shard-{k}"


@dataclass(frozen=True)
class ShardEndpoints:
    """Where shard K listens: its intake, events and domain-events endpoints
    and its metrics port (on 127.0.0.1)."""

    intake: str
    events: str
    domain_events: str
    metrics_port: int

    @classmethod
    def private(cls, folder: Path, base_port: int, k: int) -> ShardEndpoints:
        """``oms serve --shards N``: Unix sockets in the private ``folder``
        (``shards.rundir``); metrics on port BASE+4K+3."""
        intake, events, domain = (f"ipc://{rundir.socket_path(folder, k, name)}"
                                  for name in rundir.NAMES)
        return cls(intake, events, domain, base_port + 4 * k + 3)

    @classmethod
    def local(cls, base_port: int, k: int, host: str = "127.0.0.1") -> ShardEndpoints:
        """On Ray (shards on other machines): TCP on the node's address,
        ports BASE+4K .. BASE+4K+3."""
        port = base_port + 4 * k
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}",
                   f"tcp://{host}:{port + 2}", port + 3)
