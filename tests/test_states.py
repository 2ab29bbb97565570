"""The one transition table."""

from __future__ import annotations

import pytest

from oms.states import TERMINAL, TRANSITIONS, Ev, IllegalTransition, OrderState, next_state


def test_terminal_states_have_no_way_out() -> None:
    for (state, _event) in TRANSITIONS:
        assert state not in TERMINAL


@pytest.mark.parametrize("state", sorted(TERMINAL))
@pytest.mark.parametrize("event", list(Ev))
def test_illegal_transitions_raise(state: OrderState, event: Ev) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_every_state_is_reachable_from_acknowledged() -> None:
    seen, frontier = {OrderState.ACKNOWLEDGED}, [OrderState.ACKNOWLEDGED]
    while frontier:
        state = frontier.pop()
        for (src, _ev), dst in TRANSITIONS.items():
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == set(OrderState)


def test_cancel_is_not_possible_once_terminal() -> None:
    assert next_state(OrderState.IN_PROGRESS, Ev.CANCEL) == OrderState.ASSESSING_CANCELLATION
    with pytest.raises(IllegalTransition):
        next_state(OrderState.COMPLETED, Ev.CANCEL)
