"""The budget guard: a dry run before composing, and a refusal before training."""

import pytest

from fedsilo.client.budget_guard import BudgetExhaustedError, BudgetGuard, plan_round
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import ConfigError, RunSettings


def test_guard_refuses_the_round_that_would_pass_the_budget():
    m = Mechanism(1.0, 0.1, 30)
    guard = BudgetGuard(max_epsilon=2.0, delta=1e-5)
    history: list[Mechanism] = []
    while True:
        decision = guard.would_exceed(history, m)
        if not decision.allowed:
            break
        history.append(m)
    # everything accepted stays within the budget; the refused round would not have
    assert accounting.epsilon(history, 1e-5) <= 2.0
    assert accounting.epsilon([*history, m], 1e-5) > 2.0
    assert decision.epsilon_before == pytest.approx(accounting.epsilon(history, 1e-5))
    assert "max-epsilon 2" in decision.reason
    with pytest.raises(BudgetExhaustedError, match="past max-epsilon"):
        guard.spend(history, m)


def test_guard_validates_its_arguments():
    with pytest.raises(ValueError, match="max_epsilon"):
        BudgetGuard(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        BudgetGuard(1.0, 2.0)
    with pytest.raises(ValueError, match="accountant"):
        BudgetGuard(1.0, 1e-5, "gdp")


def test_target_epsilon_plans_noise_for_all_rounds():
    settings = RunSettings.from_run_config({"target-epsilon": 3.0, "num-server-rounds": 5, "max-epsilon": 3.0, "batch-size": 32})
    m = plan_round(settings, num_examples=200)
    assert m.steps == 7 and m.sample_rate == pytest.approx(1 / 7)
    assert accounting.epsilon([m] * 5, 1e-5) <= 3.0
    assert accounting.epsilon([m] * 6, 1e-5) > 3.0


def test_settings_reject_bad_values_with_their_names():
    with pytest.raises(ConfigError, match="delta"):
        RunSettings.from_run_config({"delta": 1.5})
    with pytest.raises(ConfigError, match="target-epsilon .* above max-epsilon"):
        RunSettings.from_run_config({"target-epsilon": 9.0, "max-epsilon": 8.0})
    with pytest.raises(ConfigError, match="'batch-size'"):
        RunSettings.from_run_config({"batch-size": "many"})


def test_identical_histories_are_computed_once_per_process(monkeypatch):
    from fedsilo.shared import budget

    budget._merged_epsilon.cache_clear()
    calls = []
    real = accounting.epsilon
    monkeypatch.setattr(accounting, "epsilon", lambda h, d, a: calls.append(1) or real(h, d, a))
    guard = BudgetGuard(8.0, 1e-5)
    m = Mechanism(1.1, 0.25, 4)
    first = guard.would_exceed([m, m], m)  # two calls: before and after
    # Another department with the same mechanism, or the same history in another order:
    again = guard.would_exceed([m, m], m)
    assert len(calls) == 2 and again == first
    assert first.epsilon_after == real([m] * 3, 1e-5, "pld")
    # Three rounds of m were already answered ("after" above); with a new mechanism
    # only the new history is computed.
    guard.would_exceed([m, m, m], Mechanism(1.2, 0.25, 4))
    assert len(calls) == 3
