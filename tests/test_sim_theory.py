"""The simulator against queueing theory (loadtest/sim/theory.py), CI sizes.

Seeded and small (2e4 jobs, one seed); tolerances widened from the spread we
measured across seeds at this size (see loadtest.sim.theory.SCALES). The
full-size runs: ``dp-router simulate --theory-checks``.
"""

from __future__ import annotations

import pytest

from loadtest.sim import theory as sim_theory

CI = sim_theory.SCALES["ci"]


@pytest.mark.parametrize("group", sorted(sim_theory.GROUPS))
def test_theory_group(group: str) -> None:
    results = sim_theory.GROUPS[group](CI)
    assert results
    failed = [c for c in results if not c.ok]
    assert not failed, sim_theory.format_checks(failed)


def test_closed_forms_match_the_documented_values() -> None:
    """The closed forms themselves, against tabulated values: E_N/M/1, Erlang C,
    Mitzenmacher's supermarket model, the balls-into-bins fluid limit at t = 1
    (s_1 = tanh 1 for d = 2)."""
    assert sim_theory.round_robin_sojourn(8, 0.9) == pytest.approx(5.781, abs=1e-3)
    assert sim_theory.round_robin_sojourn(8, 0.8) == pytest.approx(2.980, abs=1e-3)
    assert sim_theory.round_robin_sojourn(4, 0.8) == pytest.approx(3.267, abs=1e-3)
    assert sim_theory.erlang_c_sojourn(8, 0.8) == pytest.approx(1.286, abs=1e-3)
    assert sim_theory.erlang_c_sojourn(8, 0.9) == pytest.approx(1.877, abs=1e-3)
    assert sim_theory.erlang_c_sojourn(2, 0.8) == pytest.approx(2.778, abs=1e-3)
    table = {(0.5, 2): 1.2657, (0.7, 3): 1.3568, (0.9, 2): 2.6141, (0.99, 3): 3.8578}
    for (lam, d), want in table.items():
        assert sim_theory.supermarket_sojourn(lam, d) == pytest.approx(want, abs=1e-4)
    f2 = sim_theory.balls_fluid(2)
    assert f2[1] == pytest.approx(0.7616, abs=1e-4)  # tanh 1
    assert f2[2] == pytest.approx(0.2295, abs=1e-4)
    assert sim_theory.balls_fluid(1)[3] == pytest.approx(0.0803, abs=1e-4)
