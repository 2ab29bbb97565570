"""``actors.throttle.LogThrottle`` alone, on a clock the test moves by hand:
a burst of a kind logged one by one with its context, the rest counted in
one summary a window (when the kind's next line comes after the window, or
at a later tick, ``flush``), kinds independent, levels kept, nothing lost."""

from __future__ import annotations

import logging

import pytest

from actors.throttle import LogThrottle

NAME = "throttle-test"


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def caplog_all(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=NAME)
    return caplog


def throttle(clock: Clock, burst: int = 10) -> LogThrottle:
    return LogThrottle(logging.getLogger(NAME), 1.0, burst, clock=clock,
                       extra={"system": "billing"})


def timeout(log: LogThrottle, i: int, op: str = "capture_payment") -> None:
    log.report(("timeout", op), "no reply from billing to %s (%d)", op, i,
               summary=f"timeouts from billing to {op}",
               extra={"order_id": f"O{i}", "command_id": f"O{i}:{op}"})


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NAME]


def test_a_burst_is_logged_one_by_one_with_its_context_and_the_rest_counted(
        caplog_all: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock)
    for i in range(25):
        timeout(log, i)
    records = [r for r in caplog_all.records if r.name == NAME]
    assert [r.getMessage() for r in records] == [
        f"no reply from billing to capture_payment ({i})" for i in range(10)]
    assert [(r.order_id, r.command_id, r.levelno) for r in records] == [  # type: ignore[attr-defined]
        (f"O{i}", f"O{i}:capture_payment", logging.WARNING) for i in range(10)]
    assert log.due == clock.now + 1.0  # the summary is due at the window's end
    log.flush()  # before the end: nothing yet
    assert len(lines(caplog_all)) == 10


def test_the_summary_leaves_with_the_next_line_after_the_window(
        caplog_all: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock)
    for i in range(25):
        timeout(log, i)
    clock.now += 1.0
    timeout(log, 25)
    assert lines(caplog_all)[10:] == [
        "15 more timeouts from billing to capture_payment in the last 1.0 s",
        "no reply from billing to capture_payment (25)"]  # the next window's first
    summary = [r for r in caplog_all.records if r.name == NAME][10]
    assert (summary.levelno, summary.system) == (logging.WARNING, "billing")  # type: ignore[attr-defined]


def test_the_summary_leaves_on_a_later_tick_when_the_flood_stops(
        caplog_all: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock)
    for i in range(12):
        timeout(log, i)
        clock.now += 0.05  # the 12 within the window
    clock.now = 1000.999
    log.flush()
    assert len(lines(caplog_all)) == 10
    clock.now = 1001.0
    log.flush()
    assert lines(caplog_all)[10:] == [
        "2 more timeouts from billing to capture_payment in the last 1.0 s"]
    assert log.due is None
    clock.now += 5.0
    log.flush()  # once only
    timeout(log, 99)  # a new window: logged, no summary before it
    assert lines(caplog_all)[11:] == ["no reply from billing to capture_payment (99)"]


def test_windows_are_counted_apart(caplog_all: pytest.LogCaptureFixture) -> None:
    """A flood over three windows: each window's summary has its own count,
    and every line is logged or counted once."""
    clock = Clock()
    log = throttle(clock)
    counts = (25, 13, 10)
    i = 0
    for n in counts:
        for _ in range(n):
            timeout(log, i)
            i += 1
        clock.now += 1.0
        log.flush()
    got = lines(caplog_all)
    summaries = [line for line in got if " more " in line]
    assert summaries == ["15 more timeouts from billing to capture_payment in the last 1.0 s",
                         "3 more timeouts from billing to capture_payment in the last 1.0 s"]
    assert len(got) - len(summaries) + 15 + 3 == sum(counts)


def test_kinds_are_independent(caplog_all: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock)
    for i in range(30):
        timeout(log, i, "capture_payment")
    for i in range(3):
        timeout(log, i, "create_invoice")  # not held back by the other kind's flood
    for i in range(30, 40):
        timeout(log, i, "create_invoice")
    clock.now += 1.0
    log.flush()
    got = lines(caplog_all)
    assert sum("capture_payment (" in line for line in got) == 10
    assert sum("create_invoice (" in line for line in got) == 10
    assert got[-2:] == ["20 more timeouts from billing to capture_payment in the last 1.0 s",
                        "3 more timeouts from billing to create_invoice in the last 1.0 s"]


def test_a_kind_keeps_its_level_and_a_level_turned_off_costs_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock, burst=2)
    caplog.set_level(logging.INFO, logger=NAME)
    for i in range(5):
        log.report("declined", "O%d declined", i, level=logging.INFO, summary="declines")
    clock.now += 1.0
    log.flush()
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == NAME] == [
        (logging.INFO, "O0 declined"), (logging.INFO, "O1 declined"),
        (logging.INFO, "3 more declines in the last 1.0 s")]
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=NAME)
    for i in range(50):
        log.report("declined", "O%d declined", i, level=logging.INFO, summary="declines")
    clock.now += 5.0
    log.flush(ending=True)
    assert not caplog.records and log.due is None  # not logged, not counted, nothing due


def test_a_late_summary_says_when_its_window_ended(caplog_all: pytest.LogCaptureFixture) -> None:
    """An owner that did not tick for a while (or none that ticks): the
    summary still leaves with the kind's next line, and says when."""
    clock = Clock()
    log = throttle(clock, burst=1)
    for i in range(4):
        timeout(log, i)
    clock.now += 10.0
    timeout(log, 4)
    assert lines(caplog_all)[1:] == [
        "3 more timeouts from billing to capture_payment in 1.0 s, ending 9.0 s ago",
        "no reply from billing to capture_payment (4)"]


def test_ending_flushes_every_count_even_of_a_window_not_ended(
        caplog_all: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = throttle(clock, burst=1)
    for i in range(3):
        timeout(log, i, "capture_payment")
        timeout(log, i, "create_invoice")
    clock.now += 0.5
    log.flush()
    assert len(lines(caplog_all)) == 2
    log.flush(ending=True)  # the owner stops
    assert sorted(lines(caplog_all)[2:]) == [
        "2 more timeouts from billing to capture_payment in the last 1.0 s",
        "2 more timeouts from billing to create_invoice in the last 1.0 s"]
    assert log.due is None
