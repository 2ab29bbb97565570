"""The service as a whole, in-process: events, configuration, start and stop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import retail_order

from actors.settings import load_config
from gateways.client import Client, wait_terminal
from oms import codec
from oms.config import ConfigError


def test_channel_events_for_every_change_on_its_own_topic(service: Any, eps: Any,
                                                          client: Client) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"web")
    sub.connect(eps.events)
    other = zmq.Context.instance().socket(zmq.SUB)
    other.setsockopt(zmq.LINGER, 0)
    other.setsockopt(zmq.SUBSCRIBE, b"store")
    other.connect(eps.events)
    # a slow joiner may miss the first events: resubscribe until one arrives
    probe = client.submit(retail_order("probe"))["order_id"]
    wait_terminal(client, [probe], timeout=20)
    oid = client.submit(retail_order("events-1"))["order_id"]
    events: list[dict[str, Any]] = []
    while not any(e["type"] == "order_summary" and e["order_id"] == oid for e in events):
        assert sub.poll(10_000), "no event within 10 s"
        topic, raw = sub.recv_multipart()
        assert topic == b"web\x00"  # the topic ends with NUL (docs/contract.md)
        events.append(codec.decode_map(raw))
    mine = [e for e in events if e["order_id"] == oid]
    states = [(e["previous_state"], e["state"]) for e in mine if e["type"] == "order_state"]
    assert states == [("acknowledged", "inProgress"), ("inProgress", "completed")]
    progress = [(e["step"], e["status"]) for e in mine if e["type"] == "order_progress"]
    assert ("reserve_stock", "running") in progress and ("await_delivery", "done") in progress
    summaries = [e for e in mine if e["type"] == "order_summary"]
    assert len(summaries) == 1 and summaries[0]["summary"]["state"] == "completed"
    assert all(e["external_id"] == "events-1" for e in mine)
    assert not other.poll(200)  # nothing for another source_system
    sub.close()
    other.close()


def test_stop_leaves_no_threads(make_service: Any, sim: Any, eps: Any) -> None:
    before = {t.name for t in threading.enumerate()}
    svc = make_service()
    with Client(eps.intake) as c:
        oid = c.submit(retail_order("stop-1"))["order_id"]
        wait_terminal(c, [oid], timeout=20)
    svc.stop()
    after = {t.name for t in threading.enumerate()}
    assert after <= before, after - before


def test_config_precedence(tmp_path: Path) -> None:
    file = tmp_path / "oms.toml"
    file.write_text('data = "from-file"\nworkers = 3\n[systems]\nbilling = "tcp://b:1"\n')
    cfg = load_config(str(file), env={"OMS_DATA": "from-env", "OMS_WORKERS": "5"},
                      workers=7, systems={"crm": "tcp://c:2"})
    assert cfg.data == "from-env"
    assert cfg.workers == 7
    assert cfg.systems["billing"] == "tcp://b:1" and cfg.systems["crm"] == "tcp://c:2"
    assert cfg.systems["warehouse"].startswith("tcp://127.0.0.1")


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1", "unknown setting 'colour'"),
    ("workers = 'many'", "workers must be an integer"),
    ("systems = ['billing']", "must be NAME=ENDPOINT"),
    ("map_size_mb = 0", "map_size_mb must be between 1 and"),
    ("max_map_size_mb = -1", "max_map_size_mb must be between 0 and"),
    ("max_in_flight = 0", "max_in_flight must be between 1 and"),
    ("passivate_after_s = inf", "passivate_after_s must be a finite number"),
    ("passivate_after_s = nan", "passivate_after_s must be a finite number"),
    ("passivate_after_s = -1.0", "passivate_after_s must be between 0 and"),
    ("breaker_cooldown_s = 1e400", "breaker_cooldown_s must be a finite number"),
    ("subscriber_timeout_s = 0", "subscriber_timeout_s must be between"),
    ("workers = 2.7", "workers must be an integer"),
    ("workers = true", "workers must be an integer"),
    ("workers = 0", "workers must be between 1 and"),
    ("metrics_port = 70000", "metrics_port must be between 0 and 65535"),
    ("events_hwm = 0", "events_hwm must be between 1 and"),
    ("log_level = 'bogus'", "log_level must be one of debug"),
    ("log_format = 'xml'", "log_format must be one of json, text"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "oms.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(file), env={})


@pytest.mark.parametrize(("name", "value", "message"), [
    ("OMS_PASSIVATE_AFTER_S", "inf", "finite"),
    ("OMS_PASSIVATE_AFTER_S", "NaN", "finite"),
    ("OMS_BREAKER_COOLDOWN_S", "-inf", "finite"),
    ("OMS_WORKERS", "99999999999999999999", "between"),
    ("OMS_MAX_IN_FLIGHT", "1e3", "integer"),
])
def test_bad_number_in_environment_is_a_clear_error(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={name: value})


def test_bad_number_flag_fails_serve_at_start(tmp_path: Path) -> None:
    """``oms serve`` with ``OMS_PASSIVATE_AFTER_S=inf`` once started, then
    exited 70 from a dead thread; now it refuses to start, exit 2, one line."""
    env = {**os.environ, "OMS_PASSIVATE_AFTER_S": "inf"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--data", str(tmp_path),
                           "--metrics-port", "0"], env=env, capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 2, done.stderr
    assert "passivate_after_s must be a finite number" in done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_fails_start(make_service: Any, eps: Any) -> None:
    blocker = zmq.Context.instance().socket(zmq.ROUTER)
    blocker.setsockopt(zmq.LINGER, 0)
    blocker.bind(eps.intake)
    try:
        with pytest.raises(zmq.ZMQError, match="Address already in use"):
            make_service()
    finally:
        blocker.close()
