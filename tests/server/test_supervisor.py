"""The engine's restart budget: a sliding window of starts."""

from __future__ import annotations

from server.supervisor import RestartBudget


def test_restarts_are_counted_in_a_sliding_window() -> None:
    budget = RestartBudget(max_restarts=2, window_s=600)
    assert budget.take(0.0) and budget.take(10.0)
    assert not budget.take(20.0)  # a death during a restart asks again and is refused the same way
    assert budget.take(601.0)  # the first has left the window
    assert budget.num_used == 2
