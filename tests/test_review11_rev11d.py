"""Review 11 (rev11d): starting, stopping, configuring and reloading ``oms serve``."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import main


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


@pytest.mark.parametrize("make", ["not_utf8", "a_folder"])
def test_an_unreadable_process_definition_is_one_line_and_exit_2(
        tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    procs = tmp_path / "procs"
    procs.mkdir()
    if make == "not_utf8":
        (procs / "bad.toml").write_bytes(b"\xff\xfe = 1\n")  # was a UnicodeDecodeError traceback
    else:
        (procs / "bad.toml").mkdir()
    assert main(["serve", "--processes", str(procs), "--data", str(tmp_path / "d"),
                 "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "oms serve: " in err and "bad.toml" in err and "Traceback" not in err, err
