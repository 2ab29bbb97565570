"""Hostile review 10: what the earlier reviews left out, each finding a
failing test first (real sockets, real LMDB, real subprocesses where a
crash is tested; no mocks of our own components, no sleeps)."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import SimThread
from helpers import Driver, ok_domain, poll_until, retail_order
from test_failure_rule import _timers

from gateways.client import Client
from oms.errors import DomainError
from oms.messages import CommandResult, Operate
from oms.process import ProcessError, parse_process
from oms.process_check import MAX_DURATION_S

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
# "~x" a long key's digest.
ODD_NAMES = ["ship#1", "ship:undo", "notify:0", "a[i1]", "x]", "~x", "", "x" * 201]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_step_name_its_command_ids_cannot_carry_is_refused_at_load(name: str) -> None:
    """Before: accepted; the order's step sent its command and every reply
    to it (and its timeout) was read as another command's, stale: the
    order stayed ``inProgress`` forever, its step ``running``."""
    with pytest.raises(ProcessError, match="step name is 1 to 200"):
        parse_process(_one_step(name), "odd.toml")


@pytest.mark.parametrize("name", ["ship", "Ship_2", "a-b", "ship.v2", "réserve 1", "x~",
                                  "x" * 200])
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


# -- 2. a definition's hold that poses as the service's own, or cannot match --------------


def _held_when(hold: str) -> str:
    return f'''
[process]
order_type = "retail"
failure_policy = "compensate"
[steps.reserve]
system = "warehouse"
op = "reserve_stock"
args = {{ items = "$order.stock_items" }}
hold_when = {hold}
'''


BACKORDERED = CommandResult("", True, {"status": "backordered"})
HOLD = 'field = "status", equals = "backordered", until_event = "stock_reserved"'


@pytest.mark.parametrize("hold, where", [
    # held "internal_error" by the definition: the fallout block said the service
    # failed, offered a retry that was accepted and did nothing, and the order no
    # longer counted as in flight (admission); "fallout": a hold with no failure
    (f'{{ {HOLD}, reason = "internal_error" }}', "reason"),
    (f'{{ {HOLD}, reason = "fallout" }}', "reason"),
    (f'{{ {HOLD}, reason = "compensating" }}', "reason"),
    (f'{{ {HOLD}, reason = "" }}', "reason"),
    (f'{{ {HOLD}, reason = 5 }}', "reason"),
    # an array or a table: the check against the service's own reasons raised TypeError
    (f'{{ {HOLD}, reason = ["r"] }}', "reason"),
    (f'{{ {HOLD}, reason = {{ a = 1 }} }}', "reason"),
    # a list as the field: every order of the type raised (internal_error)
    ('{ field = ["status"], equals = "backordered", reason = "r", until_event = "e" }', "field"),
    # an event name no event can carry: held until an operator skips it
    ('{ field = "status", equals = "backordered", reason = "r", until_event = 7 }', "until_event"),
    ('{ field = "status", equals = "backordered", reason = "r", until_event = "" }', "until_event"),
])
def test_a_hold_the_service_could_not_tell_from_its_own_is_refused_at_load(
        hold: str, where: str) -> None:
    with pytest.raises(ProcessError, match=rf"hold_when\.{where}: "):
        parse_process(_held_when(hold), "odd.toml")


def test_a_definitions_own_hold_still_holds_and_its_skip_ends_it() -> None:
    proc = parse_process(_held_when(f'{{ {HOLD}, reason = "awaiting_parts" }}'), "odd.toml")
    driver = Driver(proc, retail_order(), ok_domain({"reserve_stock": BACKORDERED}))
    driver.start()
    assert (str(driver.order.state), driver.order.state_reason) == ("held", "awaiting_parts")
    driver.feed(Operate("skip", None, "ops", "by hand", None))
    assert str(driver.order.state) == "completed"


# -- 3. durations past what a timer takes, and retries past attempt 1,025 ------------------


def _retail_with(old: str, new: str, folder: Path) -> str:
    folder.mkdir()
    text = resources.files("oms.processes").joinpath("retail.toml").read_text()
    assert old in text
    (folder / "retail.toml").write_text(text.replace(old, new))
    return str(folder)


WAIT = 'wait_event = { name = "shipment_delivered", system = "shipping" }'


def test_a_wait_longer_than_a_timer_takes_is_refused_not_failed_at_once(
        make_service: Any, tmp_path: Path) -> None:
    """Before: a ``wait_event.timeout_s`` of 400 days was accepted; the timers
    refuse a deadline over 366 days out as bad and fire it after a second,
    so every order failed ``event_timeout`` a second into its wait (its
    payment refunded, its shipment cancelled). Now the definition is refused
    at start, as any duration over 366 days (and inf or nan) is."""
    folder = _retail_with(WAIT, WAIT.replace(" }", ", timeout_s = 34560000 }"), tmp_path / "p")
    with pytest.raises(ProcessError, match=r"await_delivery\.wait_event\.timeout_s: must be "
                                           r"at most 31622400 seconds"):
        make_service(processes=folder)
    for key in ("timeout_s = inf", "timeout_s = nan", "expected_s = 31622401",
                "retry = { backoff_cap_s = 1e308 }"):
        text = _one_step("ship").replace('op = "create_invoice"', f'op = "x"\n{key}')
        with pytest.raises(ProcessError, match="at most 31622400"):
            parse_process(text, "odd.toml")


def test_the_longest_wait_a_definition_may_give_is_armed_as_asked(
        make_service: Any, sim_config: Any, eps: Any, tmp_path: Path) -> None:
    sim_config.delivery_s = 3600.0  # the wait outlasts the test
    sim = SimThread(sim_config)
    try:
        folder = _retail_with(WAIT, WAIT.replace(" }", f", timeout_s = {MAX_DURATION_S:.0f} }}"),
                              tmp_path / "p")
        svc = make_service(processes=folder)
        with Client(eps.intake, timeout=20) as client:
            oid = client.submit(retail_order("year"))["order_id"]
            poll_until(lambda: any(s["name"] == "await_delivery" and s["status"] == "running"
                                   for s in client.get(oid)["order"]["steps"]))
        poll_until(lambda: len(svc.timers) >= 1)
        assert not svc.registry.get_sample_value("oms_timer_bad_deadlines_total")
    finally:
        sim.stop()
    timers, _fired, metrics = _timers()
    try:  # the farthest deadline, read a moment later on the timers' own clock
        timers.schedule(time.time() + MAX_DURATION_S, "o-year", ("wait", "s", 1))
        poll_until(lambda: len(timers) == 1)
        assert metrics.bad_deadlines._value.get() == 0
    finally:
        timers.stop()


def test_retries_past_attempt_1025_back_off_at_the_cap_not_raise() -> None:
    """Before: ``base * 2 ** (attempt - 1)`` raised OverflowError at attempt
    1,026 (an int too large for a float): with ``max_attempts`` over 1,025
    the order was held as ``internal_error`` at that retry, and again at each
    operator retry."""
    proc = parse_process(_one_step("ship").replace(
        "retry = { max_attempts = 1 }",
        "retry = { max_attempts = 1100, backoff_base_s = 0.01, backoff_cap_s = 0.01 }"), "t")
    down = CommandResult("", False, None, DomainError("unavailable", "down", True))
    driver = Driver(proc, retail_order(), ok_domain({"create_invoice": down}))
    driver.start()
    driver.fire_timers()
    step = driver.order.steps["ship"]
    assert (step.attempts, str(step.status), str(driver.order.state)) == (1100, "failed", "failed")
    policy = proc.step("ship").retry
    assert policy.delay(5000, 0.5) == policy.delay(10, 0.5)  # the cap, as at attempt 10


# -- 4. a wait for an event from a system the service does not know ------------------------


@pytest.mark.parametrize("old, new", [
    (WAIT, WAIT.replace('"shipping"', '"shiping"')),
    ('until_event = "stock_reserved"', 'until_event = "stock_reserved", system = "stockroom"'),
])
def test_a_wait_for_an_unconfigured_systems_event_stops_the_start(
        make_service: Any, tmp_path: Path, old: str, new: str) -> None:
    """Before: the service started; such an event is refused at the domain
    events endpoint (only configured systems may push one), so every order
    waited for it forever. Now the start fails as for a step's command to
    a system with no endpoint."""
    from oms.config import ConfigError

    folder = _retail_with(old, new, tmp_path / "p")
    with pytest.raises(ConfigError, match=r"domain system\(s\): (shiping|stockroom)"):
        make_service(processes=folder)


def test_an_undo_with_an_empty_op_is_refused_at_load() -> None:
    """Before: accepted; the undo went out as op "" (refused by any domain
    system), so every compensation of that step ended in fallout."""
    text = _one_step("ship").replace('op = "create_invoice"',
                                     'op = "create_invoice"\ncompensate = { op = "" }')
    with pytest.raises(ProcessError, match=r"steps\.ship\.compensate\.op: required"):
        parse_process(text, "odd.toml")


@pytest.mark.parametrize("old, new, where", [
    ("timeout_s = 5.0", "timeout_s = 0", "defaults.timeout_s"),
    ('collect = ["reservation_id"]', 'collect = ["reservation_id"]\ntimeout_s = 0',
     "steps.reserve_stock.timeout_s"),
    ('op = "notify", ', 'op = "notify", timeout_s = 0, ', "process.notify.timeout_s"),
])
def test_a_command_timeout_of_0_is_refused_at_load(make_service: Any, tmp_path: Path,
                                                    old: str, new: str, where: str) -> None:
    """Before: accepted; each command timed out as it was sent, five in a row
    opened the system's circuit breaker, and each probe timed out too: every
    order using that system (of any type) stayed ``inProgress`` for good."""
    folder = _retail_with(old, new, tmp_path / "p")
    with pytest.raises(ProcessError, match=rf"{where}: must be a number > 0"):
        make_service(processes=folder)


def test_two_files_defining_one_order_type_stop_the_start(make_service: Any,
                                                          tmp_path: Path) -> None:
    """Before: the file sorted last won, silently (a ``retail-v2.toml`` beside
    ``retail.toml`` was never used)."""
    folder = tmp_path / "p"
    folder.mkdir()
    for name in ("retail.toml", "retail-v2.toml"):
        (folder / name).write_text(_one_step("ship"))
    with pytest.raises(ProcessError, match=r"'retail' is defined in .*retail-v2\.toml too"):
        make_service(processes=str(folder))
