"""Structured logs: one JSON object per line, with ``order_id`` and
``command_id`` when the log call passes them in ``extra``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_CONTEXT = ("order_id", "command_id", "system", "event_id")


SHARD = os.environ.get("OMS_LOG_SHARD")  # set by `oms serve --shards N` for its children


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if SHARD:
            out["shard"] = SHARD
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        where = f" [{SHARD}]" if SHARD else ""
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
