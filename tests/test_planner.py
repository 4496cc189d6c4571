"""The settings planner: the σ a run would use, and the ε it would spend round by round."""

import json

import pytest
from typer.testing import CliRunner

from fedsilo.cli import app
from fedsilo.client.budget_guard import plan_round
from fedsilo.client.department import SIMULATED_DEFAULT_POLICY
from fedsilo.client.policy import Terms
from fedsilo.client.planner import PlanError, plan_privacy, shown_rounds
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import RunSettings

DELTA = 1e-5


@pytest.fixture(scope="module")
def target_plan():
    return plan_privacy(300, 32, rounds=8, delta=DELTA, target_epsilon=3.0, local_epochs=2)


def test_planned_noise_spends_the_target(target_plan):
    m = Mechanism(target_plan.noise_multiplier, target_plan.sample_rate, target_plan.steps_per_round)
    spent = accounting.epsilon([m] * 8, DELTA)
    assert 0.98 * 3.0 <= spent <= 3.0
    assert target_plan.final_epsilon == pytest.approx(spent, rel=1e-9)


def test_planned_noise_is_the_noise_a_run_uses(target_plan):
    settings = RunSettings.from_run_config(
        {"target-epsilon": 3.0, "delta": DELTA, "num-server-rounds": 8, "batch-size": 32,
         "local-epochs": 2, "max-epsilon": 3.0}
    )
    m = plan_round(settings, Terms(True, 3.0, DELTA, "pld"), 300)
    assert (target_plan.noise_multiplier, target_plan.sample_rate, target_plan.steps_per_round) == (
        m.noise_multiplier, m.sample_rate, m.steps)
    assert m.steps == 2 * 10 and m.sample_rate == pytest.approx(1 / 10)


def test_curve_grows_and_ends_at_the_final_epsilon(target_plan):
    rounds = [r for r, _ in target_plan.curve]
    eps = [e for _, e in target_plan.curve]
    assert rounds == list(range(1, 9))
    assert all(a < b for a, b in zip(eps, eps[1:]))
    m = Mechanism(target_plan.noise_multiplier, target_plan.sample_rate, target_plan.steps_per_round)
    assert eps[2] == pytest.approx(accounting.epsilon([m] * 3, DELTA), rel=1e-9)
    assert target_plan.exhausted_round is None


def test_long_runs_show_a_subset_ending_at_the_last_round():
    assert shown_rounds(20) == list(range(1, 21))
    assert shown_rounds(100) == list(range(1, 21)) + list(range(25, 101, 5))
    assert shown_rounds(1000)[20:23] == [50, 100, 150] and shown_rounds(1000)[-1] == 1000
    assert shown_rounds(1003)[-2:] == [1000, 1003]


def test_noise_multiplier_mode_and_budget_exhaustion():
    # 200 rounds show 1..20, 30, 40, …: the budget runs out between two shown rounds
    plan = plan_privacy(200, 20, rounds=200, delta=DELTA, noise_multiplier=2.0, max_epsilon=5.6, accountant="rdp")
    m = Mechanism(2.0, 0.1, 10)
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) == (2.0, 0.1, 10)
    assert plan.final_epsilon == pytest.approx(accounting.epsilon([m] * 200, DELTA, "rdp"), rel=1e-9)
    # the guard refuses round r: r - 1 rounds fit in the budget, r rounds do not
    r = plan.exhausted_round
    assert r == 44
    assert accounting.epsilon([m] * (r - 1), DELTA, "rdp") <= 5.6 < accounting.epsilon([m] * r, DELTA, "rdp")
    assert "train 43 of 200" in plan.advice
    # a budget that lasts
    assert plan_privacy(200, 20, rounds=3, delta=DELTA, noise_multiplier=1.0, max_epsilon=50.0).exhausted_round is None


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(target_epsilon=0.0), "target-epsilon"),
        (dict(target_epsilon=1.0, noise_multiplier=1.0), "target-epsilon"),
        (dict(), "target-epsilon"),
        (dict(noise_multiplier=1.0, delta=1.0), "delta"),
        (dict(noise_multiplier=1.0, dataset_size=0), "dataset-size"),
        (dict(noise_multiplier=1.0, batch_size=0), "batch-size"),
        (dict(noise_multiplier=1.0, rounds=0), "rounds"),
        (dict(noise_multiplier=1.0, accountant="gdp"), "accountant"),
    ],
)
def test_bad_input_names_the_setting(kwargs, option):
    args = dict(dataset_size=100, batch_size=10, rounds=3, delta=DELTA) | kwargs
    with pytest.raises(PlanError) as err:
        plan_privacy(**args)
    assert err.value.option == option and isinstance(err.value, ValueError)


def test_cli_json_matches_the_planner(target_plan):
    result = CliRunner().invoke(
        app,
        ["plan", "--target-epsilon", "3", "--rounds", "8", "--dataset-size", "300",
         "--batch-size", "32", "--local-epochs", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["noise_multiplier"] == target_plan.noise_multiplier
    assert out["sample_rate"] == target_plan.sample_rate and out["steps_per_round"] == 20
    assert out["delta"] == DELTA and out["accountant"] == SIMULATED_DEFAULT_POLICY.accountants[0] == "pld"
    assert out["curve"] == [{"round": r, "epsilon": e} for r, e in target_plan.curve]


def test_cli_table_shows_sigma_and_budget():
    result = CliRunner().invoke(
        app, ["plan", "--noise-multiplier", "1", "--rounds", "30", "--dataset-size", "200",
              "--batch-size", "20", "--accountant", "rdp", "--max-epsilon", "4"],
    )
    assert result.exit_code == 0, result.output
    assert "σ = 1" in result.output and "refused" in result.output


@pytest.mark.parametrize(
    "args,option",
    [
        (["--target-epsilon", "0"], "--target-epsilon"),
        (["--target-epsilon", "-1"], "--target-epsilon"),
        (["--target-epsilon", "3", "--delta", "1.5"], "--delta"),
        (["--target-epsilon", "3", "--batch-size", "0"], "--batch-size"),
        (["--target-epsilon", "3", "--rounds", "0"], "--rounds"),
        (["--noise-multiplier", "1", "--target-epsilon", "3"], "--noise-multiplier"),
        ([], "--target-epsilon"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_option(args, option):
    base = {"--rounds": "5", "--dataset-size": "100"}
    for flag in ("--rounds", "--dataset-size"):
        if flag in args:
            base.pop(flag)
    argv = ["plan", *[x for kv in base.items() for x in kv], *args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert option in result.output and "error" in result.output


# --- distributed DP: `fedsilo plan --distributed-dp` -------------------------------------------------------------

def test_distributed_plan_is_the_sigma_and_rounds_a_simulation_plans():
    """The planner's σ, q and rounds are those `simulate --distributed-dp` (plan_distributed) fills in."""
    import dataclasses

    from fedsilo.client.distributed_planner import plan_distributed_privacy
    from fedsilo.shared.distributed_dp import DEFAULT_EPOCHS, plan_distributed

    planned = plan_distributed_privacy(1437, 128, None, DELTA, 9354, target_epsilon=8.0)
    assert planned.sample_rate == pytest.approx(128 / 1437) and planned.steps_per_round == 1
    assert planned.rounds == 34 and planned.rounds * planned.sample_rate >= DEFAULT_EPOCHS  # ceil(3 / q)
    settings = RunSettings.from_run_config({"distributed-dp": True, "batch-size": 128, "noise-multiplier": 0.0})
    run = plan_distributed(settings, {"parameters": (9354,)}, 8.0, DELTA, pooled_records=1437, rounds_given=False)
    assert (run.num_server_rounds, run.sample_rate, run.noise_multiplier) == (
        planned.rounds, planned.sample_rate, planned.noise_multiplier)
    assert 0.98 * 8.0 <= planned.final_epsilon <= 8.0
    assert [e for _, e in planned.curve] == sorted(e for _, e in planned.curve)
    # Gaussian noise in the clear reaches the same ε with less σ; the analysis of the discrete one costs more.
    assert 0.5 * planned.noise_multiplier < planned.gaussian_noise_multiplier < planned.noise_multiplier
    given = plan_distributed(dataclasses.replace(settings, num_server_rounds=10), {"parameters": (9354,)}, 8.0,
                             DELTA, pooled_records=1437)
    assert given.num_server_rounds == 10 and given.noise_multiplier < planned.noise_multiplier  # fewer steps, less σ


def test_distributed_plan_cli_json_and_its_refusals():
    runner = CliRunner()
    out = runner.invoke(app, ["plan", "--distributed-dp", "--dataset-size", "1437", "--parameters", "9354",
                              "--sample-rate", "0.1", "--rounds", "5", "--noise-multiplier", "1.0",
                              "--max-epsilon", "2", "--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["accountant"] == accounting.MIXED_ACCOUNTANT and plan["sample_rate"] == 0.1 and plan["rounds"] == 5
    assert plan["noise_multiplier"] == 1.0 and plan["gaussian_noise_multiplier"] < 1.0
    curve = [p["epsilon"] for p in plan["curve"]]
    assert plan["exhausted_round"] == next(i + 1 for i, e in enumerate(curve) if e > 2)  # the first round past it
    for args, option in ((["--target-epsilon", "8"], "--parameters"),
                         (["--target-epsilon", "8", "--parameters", "10", "--sample-rate", "1.5"], "--sample-rate")):
        bad = runner.invoke(app, ["plan", "--distributed-dp", "--dataset-size", "100", *args])
        assert bad.exit_code == 2 and option in bad.output, bad.output
    local = runner.invoke(app, ["plan", "--dataset-size", "100", "--rounds", "3", "--target-epsilon", "8",
                                "--parameters", "10"])
    assert local.exit_code == 2 and "--parameters applies only with --distributed-dp" in local.output, local.output
