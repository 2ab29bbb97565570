"""Review 11 (rev11d): starting, stopping, configuring and reloading ``oms serve``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import zmq
from helpers import curve_keys, poll_until

from app.cli import main
from gateways.client import Client


@pytest.mark.parametrize("text", [
    b"systems = 5\n",  # not a table, list or text: was a TypeError traceback
    b"systems = true\n",
    b"\xff\xfe = 1\n",  # not UTF-8: was a UnicodeDecodeError traceback
])
def test_a_hostile_config_file_is_one_line_and_exit_2(tmp_path: Path, text: bytes,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    cfg = tmp_path / "oms.toml"
    cfg.write_bytes(text)
    assert main(["serve", "--config", str(cfg), "--data", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oms serve: ") and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists()  # refused before anything started


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``oms serve`` refused at start (exit 2): what it said on stderr."""
    assert main(["serve", *argv]) == 2
    return capsys.readouterr().err


def _unreadable(path: Path, make: str, garbage: bytes) -> None:
    """``path`` made a folder (``make`` "a_folder") or a file of ``garbage``."""
    if make == "a_folder":
        path.mkdir()
    else:
        path.write_bytes(garbage)


@pytest.mark.parametrize("make", ["not_utf8", "a_folder"])
def test_an_unreadable_process_definition_is_one_line_and_exit_2(
        tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    procs = tmp_path / "procs"
    procs.mkdir()
    _unreadable(procs / "bad.toml", make, b"\xff\xfe = 1\n")  # was a UnicodeDecodeError traceback
    err = _refused(["--processes", str(procs), "--data", str(tmp_path / "d"),
                    "--metrics-port", "0"], capsys)
    assert "oms serve: " in err and "bad.toml" in err and "Traceback" not in err, err


def _get_order(intake: str, curve: dict[str, Any]) -> dict[str, Any] | None:
    """A fresh connection (one refused at the handshake is not retried)."""
    with Client(intake, zmq.Context.instance(), curve=curve, timeout=0.5) as client:
        try:
            return client.request({"type": "get_order", "order_id": "x"})
        except TimeoutError:
            return None


@pytest.mark.slow
def test_sighup_to_a_sharded_service_reloads_the_keys_and_stops_nothing(
        procs: Any, tmp_path: Path) -> None:
    """docs/scaling.md: the front's client keys are "reloaded on SIGHUP". The
    operator signals the `oms serve --shards N` process, the one they
    started; it had no SIGHUP handler, so the default action ended it and,
    through the parent-death signal, the front and every shard."""
    from test_shards import Sharded

    keys = curve_keys(tmp_path / "keys", ["web", "late"])
    (keys.allowed / "late.key").unlink()
    s = Sharded(procs, tmp_path, serve_args=(
        "--curve-server-key", str(keys.folder / "server" / "server.key_secret"),
        "--curve-clients", str(keys.allowed)))
    assert poll_until(lambda: _get_order(s.eps.intake, keys.opts("web")), timeout=20,
                      every=0.1)["code"] == "not_found"
    assert _get_order(s.eps.intake, keys.opts("late")) is None
    (keys.allowed / "late.key").write_text((keys.folder / "own" / "late.key").read_text())
    for _ in range(5):  # a burst, as a config-management run may send
        s.svc.p.send_signal(signal.SIGHUP)
    reply = poll_until(lambda: _get_order(s.eps.intake, keys.opts("late")), timeout=20,
                       every=0.1)
    assert reply["code"] == "not_found"
    assert s.svc.p.poll() is None
    assert s.svc.terminate() == 0


@pytest.mark.parametrize("make", ["garbage", "a_folder"])
def test_a_data_folder_that_is_not_a_store_is_one_line_and_exit_2(
        tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Was an ``lmdb.InvalidError`` (or ``lmdb.Error``) traceback and exit 1."""
    data = tmp_path / "d"
    data.mkdir()
    _unreadable(data / "data.mdb", make, b"not lmdb " * 10_000)
    err = _refused(["--data", str(data), "--metrics-port", "0"], capsys)
    assert f"oms serve: data folder {data}" in err and "Traceback" not in err, err


def test_an_empty_data_setting_is_refused_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``OMS_DATA=$UNSET oms serve``: ``Path("")`` is ``.``, so the store was
    opened in the working directory (``/`` under systemd) instead of the
    default or an error; a later start with the folder set finds no orders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMS_DATA", "")
    assert main(["serve", "--metrics-port", "0"]) == 2
    assert "data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_processes_setting_is_no_folder_not_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the empty CURVE settings (the shard supervisor's way to turn them off)."""
    from actors.settings import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.toml").write_text("not a process")
    cfg = load_config(None, env={"OMS_PROCESSES": ""})
    assert cfg.processes is None


def test_sighup_says_process_definitions_are_not_reloaded(
        make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An operator who edits a definition and sends SIGHUP got silence (CURVE
    off: no line at all), as if the new definition were in force."""
    svc = make_service()
    with caplog.at_level("INFO", logger="app.service"):
        svc.reload_keys()  # what cmd_serve runs on SIGHUP
    assert any("process definitions are read at start only" in r.getMessage()
               for r in caplog.records)


def test_a_metrics_port_in_use_is_named_in_the_refusal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was "cannot start: [Errno 98] Address already in use": which of the
    four endpoints? (The ZeroMQ ones name their address already.)"""
    import socket

    from conftest import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert main(["serve", "--data", str(tmp_path / "d"), "--metrics-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"metrics port 127.0.0.1:{port}" in err and "Traceback" not in err, err


def test_log_format_in_capitals_is_json_not_silently_text() -> None:
    """``OMS_LOG_FORMAT=JSON`` passed the check (case-blind) but
    ``actors.logs.setup`` compares ``== "json"``: the logs came out as text."""
    from actors.settings import load_config

    cfg = load_config(None, env={"OMS_LOG_FORMAT": "JSON", "OMS_LOG_LEVEL": "Warning"})
    assert (cfg.log_format, cfg.log_level) == ("json", "warning")


def test_the_keys_in_force_are_the_keys_read_once(tmp_path: Path) -> None:
    """``ChannelSecurity`` checked the folder with ``load_clients`` (pathlib's
    glob: hidden ``.name.key`` files too) and then let pyzmq read it again
    (``glob.glob``: no hidden files; a failure only logged by pyzmq). The
    identities, the "N allowed" line and ``oms_client_keys_reload_failed``
    could then describe other keys than the ones in force: a key renamed
    ``.web.key`` to disable it was still counted; a folder changed between
    the two reads left the old keys in force after a "reloaded" line."""
    from actors.security import ChannelSecurity

    keys = curve_keys(tmp_path / "keys", ["web", "late"])
    (keys.allowed / "late.key").rename(keys.allowed / ".late.key")  # disabled by hiding it
    ctx = zmq.Context()
    sec = ChannelSecurity(ctx, str(keys.folder / "server" / "server.key_secret"),
                          str(keys.allowed))
    try:
        assert set(sec.auth.certs["*"]) == set(sec.auth.names)
        assert sorted(sec.auth.names.values()) == ["web"]
        (keys.allowed / ".late.key").rename(keys.allowed / "late.key")
        assert sec.reload() == 2
        assert set(sec.auth.certs["*"]) == set(sec.auth.names)
    finally:
        sec.stop()
        ctx.destroy(linger=0)


def test_a_fifo_in_the_keys_folder_is_refused_not_a_hang(tmp_path: Path) -> None:
    """Opening a FIFO named ``x.key`` blocks until a writer comes: SIGHUP's
    reload runs on the main thread, the one that also waits for SIGTERM, so
    the service could then only be stopped with kill -9."""
    import os
    import threading

    from actors.security import SecurityError, load_clients

    keys = curve_keys(tmp_path / "keys", ["web"])
    fifo = keys.allowed / "pipe.key"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            load_clients(keys.allowed)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # let the blocked open return before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
        raise AssertionError("load_clients blocked on a FIFO")
    assert isinstance(outcome[0], SecurityError) and "pipe.key" in str(outcome[0])


@pytest.mark.parametrize("text", ['data = ["a", "b"]\n', "data = {x = 1}\n", "data = 5\n",
                                  'metrics_host = ["0.0.0.0"]\n'])
def test_a_text_setting_of_another_toml_type_is_refused(
        tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data = ["a", "b"]`` opened a store in a folder named "['a', 'b']"."""
    from actors.settings import load_config
    from oms.config import ConfigError

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "oms.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="must be text"):
        load_config(str(cfg), env={})
