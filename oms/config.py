"""Service configuration: the settings, their defaults and their bounds.

``Config.from_sources`` lays settings over the embedded defaults, later
sources winning, and checks them; reading the sources (a TOML file, the
``OMS_*`` environment variables, command-line flags) is
``actors.settings.load_config``'s job. ``docs/operations.md`` lists every
setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_SYSTEMS = {
    "warehouse": "tcp://127.0.0.1:5561",
    "billing": "tcp://127.0.0.1:5562",
    "shipping": "tcp://127.0.0.1:5563",
    "crm": "tcp://127.0.0.1:5564",
    "provisioning": "tcp://127.0.0.1:5565",
}


class ConfigError(ValueError):
    """A setting that cannot be used."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# (low, high) of every numeric setting: a value outside, NaN or inf is an
# error at start, never a thread that dies later on a sleep it cannot take.
BOUNDS: dict[str, tuple[float, float]] = {
    "metrics_port": (0, 65535),
    "workers": (1, 256),
    "passivate_after_s": (0, 86_400),
    "breaker_failures": (1, 1_000_000),
    "breaker_cooldown_s": (0.01, 3600),
    "max_in_flight": (1, 10_000_000),
    "events_hwm": (1, 1_000_000),
    "max_subscribers": (1, 100_000),
    "subscriber_timeout_s": (0.1, 3600),
    "map_size_mb": (1, 16 * 1024 * 1024),
    "max_map_size_mb": (0, 16 * 1024 * 1024),
    "shards": (1, 100),
    "shard_base_port": (1024, 65535 - 400),
    "vshards": (0, 100),
    "epoch": (0, 2**62),
}


@dataclass
class Config:
    data: str = "oms-data"
    intake: str = "tcp://127.0.0.1:5555"
    events: str = "tcp://127.0.0.1:5556"
    domain_events: str = "tcp://127.0.0.1:5557"
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    systems: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYSTEMS))
    processes: str | None = None
    workers: int = 2
    passivate_after_s: float = 1.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    max_in_flight: int = 200_000
    events_hwm: int = 1000
    max_subscribers: int = 100
    subscriber_timeout_s: float = 30.0
    map_size_mb: int = 256
    max_map_size_mb: int = 0  # 0: the map grows as long as the disk allows
    curve_server_key: str | None = None
    curve_clients: str | None = None
    domain_server_key: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    retention_s: float = 30 * 86400.0
    dedup_window_s: float = 90 * 86400.0
    retention_batch: int = 512
    retention_interval_s: float = 0.25
    # sharding (docs/scaling.md): processes behind one front; 1 = one process, no front
    shards: int = 1
    shard_base_port: int = 5600  # shard K's metrics on 127.0.0.1:BASE+4K+3 (Ray: all 4)
    vshards: int = 0  # set for a shard process by its supervisor: give out sharded ids
    epoch: int = 0  # set for a shard process on Ray: its fencing epoch (0 = no fencing)

    @classmethod
    def from_sources(cls, sources: Iterable[tuple[Mapping[str, Any], str]]) -> Config:
        """The defaults, then each ``(settings, origin)`` in turn (later
        wins), checked: a ``ConfigError`` names the origin of a bad value."""
        cfg = cls()
        for values, origin in sources:
            cfg.update(values, origin)
        cfg.check_store()
        return cfg

    def check_store(self) -> None:
        """Settings that could never work: numbers out of bounds, NaN or inf;
        an unknown log level or format."""
        for name, allowed in (("log_level", LOG_LEVELS), ("log_format", ("json", "text"))):
            if str(getattr(self, name)).lower() not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)} "
                                  f"(got {getattr(self, name)!r:.40})")
            setattr(self, name, str(getattr(self, name)).lower())  # "JSON" is json, not text
        if not self.data.strip():  # Path("") is the working directory (/ under systemd)
            raise ConfigError("data must name a folder (got an empty value)")
        check_utf8_path(self.data, "data")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if not math.isfinite(value) or not low <= value <= high:
                raise ConfigError(f"{name} must be between {low:g} and {high:g} "
                                  f"(got {value})")

    def update(self, values: Mapping[str, Any], origin: str) -> None:
        known = {f.name: f for f in fields(self)}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{origin}: unknown setting {key!r}")
            current = getattr(self, name)
            if name == "systems":
                setattr(self, name, {**self.systems, **parse_systems(value, origin)})
            elif isinstance(current, int | float) and not isinstance(current, bool):
                setattr(self, name, parse_number(value, type(current), origin, key))
            elif value is not None and not isinstance(value, str):  # data = [1]: no "[1]" folder
                raise ConfigError(f"{origin}: {key} must be text, got {value!r:.40}")
            else:  # "" for an optional path is unset (OMS_PROCESSES=), never "." by accident
                setattr(self, name, None if value == "" and known[name].default is None
                        else value)


def check_utf8_path(path: str, name: str) -> None:
    """A folder name that is not valid UTF-8 (``b'/srv/x\\xff'``, which Python
    carries as a lone surrogate) is refused: LMDB and ZeroMQ's socket paths
    take UTF-8 only, and would fail with a traceback part way through the start."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ConfigError(f"{name} must be a UTF-8 path (got {shown}: bytes that are "
                          "not UTF-8 cannot name an LMDB store or a socket)") from None


def parse_number(value: Any, kind: type, origin: str, key: str) -> int | float:
    """``value`` as ``kind`` (int or float), from a number or its text; a
    bool, a fraction for an integer, NaN or inf is an error."""
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise ConfigError(f"{origin}: {key} must be {noun}, got {value!r}")
    try:
        number = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{origin}: {key} must be {noun}, got {value!r:.40}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{origin}: {key} must be a finite number, got {value!r:.40}")
    return number


def parse_systems(value: Any, origin: str) -> dict[str, str]:
    """``{"name": "ep"}``, ``["name=ep", ...]`` or ``"name=ep,name=ep"``."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, str | list | tuple):
        raise ConfigError(f"{origin}: systems must be a table, a list or text of "
                          f"NAME=ENDPOINT, got {value!r:.40}")
    items = value.split(",") if isinstance(value, str) else list(value)
    out = {}
    for item in items:
        name, sep, endpoint = str(item).partition("=")
        if not sep or not name or not endpoint:
            raise ConfigError(f"{origin}: system {item!r} must be NAME=ENDPOINT")
        out[name.strip()] = endpoint.strip()
    return out


def from_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The settings named in ``env`` (``OMS_<SETTING>``, e.g. ``OMS_DATA``)."""
    names = {f"OMS_{f.name.upper()}": f.name for f in fields(Config)}
    return {name: env[key] for key, name in names.items() if key in env}
