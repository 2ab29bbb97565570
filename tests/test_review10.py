"""Hostile review 10: what the earlier reviews left out, each finding a
failing test first (real sockets, real LMDB, real subprocesses where a
crash is tested; no mocks of our own components, no sleeps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import Driver, ok_domain, retail_order

from oms.process import ProcessError, parse_process

# -- 1. a step name that its command ids read back as something else ---------------------


def _one_step(name: str) -> str:
    return f'''
[process]
order_type = "retail"
failure_policy = "compensate"
[defaults]
timeout_s = 5.0
retry = {{ max_attempts = 1 }}
[steps."{name}"]
system = "billing"
op = "create_invoice"
args = {{ total = "$order.total_minor" }}
'''


# "ship#1" reads back as step "ship", generation 1; "ship:undo" as the undo of
# "ship"; "notify:0" as CRM note 0; "a[i1]" is the key of item i1's step "a";
# "~x" a long key's digest; "a.b" cannot be named in ``$steps.a.b.FIELD``.
ODD_NAMES = ["ship#1", "ship:undo", "notify:0", "a[i1]", "~x", "a.b", "", "x" * 65]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_step_name_its_command_ids_cannot_carry_is_refused_at_load(name: str) -> None:
    """Before: accepted; the order's step sent its command and every reply
    to it (and its timeout) was read as another command's, stale: the
    order stayed ``inProgress`` forever, its step ``running``."""
    with pytest.raises(ProcessError, match="step name is 1 to 64"):
        parse_process(_one_step(name), "odd.toml")


@pytest.mark.parametrize("name", ["ship", "Ship_2", "_x", "a-b", "x" * 64])
def test_plain_step_names_still_load_and_their_replies_reach_them(name: str) -> None:
    proc = parse_process(_one_step(name), "odd.toml")
    driver = Driver(proc, retail_order(), ok_domain())
    driver.start()
    assert str(driver.order.state) == "completed"
    assert str(driver.order.steps[name].status) == "done"


def test_the_service_does_not_start_with_such_a_step_name(make_service: Any,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "procs"
    folder.mkdir()
    (folder / "odd.toml").write_text(_one_step("ship#1"))
    with pytest.raises(ProcessError, match=r"steps\.ship#1"):
        make_service(processes=str(folder))
