"""Reading settings from outside the process: the service's configuration
(a TOML file, then ``OMS_*`` environment variables, then command-line flags;
later wins) and process definitions from a folder.

The core only knows the shapes: ``oms.config.Config`` (settings, bounds) and
``oms.process`` (definitions parsed from text). This module does the reading.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oms.config import Config, ConfigError, from_environment
from oms.process import ProcessDef, ProcessError, builtin_processes, parse_process
from storage import files


def load_config(file: str | None = None, env: Mapping[str, str] | None = None,
                **flags: Any) -> Config:
    """The settings: defaults, then ``file`` (TOML), then ``env`` (the
    process environment unless given), then the flags that are not None."""
    sources: list[tuple[Mapping[str, Any], str]] = []
    if file:
        try:
            sources.append((tomllib.loads(files.read_text(file)), file))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
    sources.append((from_environment(os.environ if env is None else env), "environment"))
    sources.append(({k: v for k, v in flags.items() if v is not None}, "flags"))
    return Config.from_sources(sources)


def load_processes(directory: str | Path | None = None) -> dict[str, ProcessDef]:
    """The built-in definitions, overridden or extended by ``directory``.

    Every problem in every file is reported together in one ``ProcessError``.
    """
    procs = builtin_processes()
    if directory is None:
        return procs
    path = Path(directory)
    if not path.is_dir():
        raise ProcessError([f"{path}: not a directory"])
    problems = []
    defined: dict[str, Path] = {}  # order_type -> its file: two files may not both define one
    for file in sorted(path.glob("*.toml")):
        try:
            proc = parse_process(files.read_text(file), str(file))
        except ProcessError as exc:
            problems.extend(exc.problems)
        except (OSError, UnicodeDecodeError) as exc:  # unreadable, a folder, a FIFO, not UTF-8
            problems.append(f"{file}: cannot read: {exc}")
        else:
            if proc.order_type in defined:  # (else the later file would win, silently)
                problems.append(f"{file}: process.order_type: {proc.order_type!r} is defined "
                                f"in {defined[proc.order_type]} too")
            defined.setdefault(proc.order_type, file)
            procs[proc.order_type] = proc
    if problems:
        raise ProcessError(problems)
    return procs
