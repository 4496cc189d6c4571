"""The budget guard: a dry run before composing, and a refusal before training."""

import pytest

from fedsilo.client.budget_guard import PlanError, plan_round
from fedsilo.client.policy import Terms
from fedsilo.shared.budget import BudgetExhaustedError, BudgetGuard
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


TERMS = Terms(private=True, max_epsilon=3.0, delta=1e-5, accountant="pld")


def test_target_epsilon_plans_noise_for_all_rounds():
    settings = RunSettings.from_run_config({"target-epsilon": 3.0, "num-server-rounds": 5, "batch-size": 32})
    m = plan_round(settings, TERMS, size=200)
    assert m.steps == 7 and m.sample_rate == pytest.approx(1 / 7)
    assert accounting.epsilon([m] * 5, 1e-5) <= 3.0
    assert accounting.epsilon([m] * 6, 1e-5) > 3.0


def test_target_epsilon_on_a_resumed_ledger_plans_what_is_left_of_the_whole_history():
    settings = RunSettings.from_run_config({"target-epsilon": 3.0, "num-server-rounds": 5, "batch-size": 32})
    fresh = plan_round(settings, TERMS, size=200)
    spent = [Mechanism(3.0, 1 / 7, 7)] * 3  # an earlier run
    before = accounting.epsilon(spent, 1e-5)
    assert 0 < before < 3.0
    resumed = plan_round(settings, TERMS, size=200, prior=spent)
    assert resumed.noise_multiplier > fresh.noise_multiplier  # less is left: more noise
    assert accounting.epsilon([*spent, *[resumed] * 5], 1e-5) <= 3.0 + 1e-9
    # and not wastefully more noise than needed
    looser = Mechanism(resumed.noise_multiplier * 0.99, resumed.sample_rate, resumed.steps)
    assert accounting.epsilon([*spent, *[looser] * 5], 1e-5) > 3.0
    # The target is capped at the department's budget, and a spent history is refused with the numbers.
    capped = plan_round(RunSettings.from_run_config({"target-epsilon": 9.0, "num-server-rounds": 5, "batch-size": 32}),
                        TERMS, size=200)
    assert capped.noise_multiplier == pytest.approx(fresh.noise_multiplier)
    with pytest.raises(PlanError, match=r"target-epsilon 3 over 5 rounds cannot be planned: the history already holds ε="):
        plan_round(settings, TERMS, size=200, prior=[Mechanism(0.5, 1 / 7, 7)] * 20)


def test_settings_reject_bad_values_with_their_names():
    with pytest.raises(ConfigError, match="delta"):
        RunSettings.from_run_config({"delta": 1.5})
    with pytest.raises(ConfigError, match="target-epsilon .* above max-epsilon"):  # a run's own asks must agree
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
