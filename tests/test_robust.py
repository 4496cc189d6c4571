"""Robust aggregation (server/robust.py): the rules resist one bad department; the norm bound holds."""

import math
import time

import numpy as np
import pytest
from flower_messages import Grid, reply
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fedsilo.server.central_dp import ClientLevelDP, coordinator_ledger
from fedsilo.server.robust import (
    DepartmentKrum, DepartmentMedian, DepartmentTrimmedMean, TooFewUpdates, department_strategy, least_updates,
)
from fedsilo.server.strategy import DepartmentFedAvg
from fedsilo.shared.config import RunSettings

pytestmark = pytest.mark.usefixtures("serverapp_identity")

RULES = {"fedavg": DepartmentFedAvg, "trimmed-mean": DepartmentTrimmedMean, "median": DepartmentMedian,
         "krum": DepartmentKrum}
ROBUST = ("trimmed-mean", "median", "krum")
SHAPE = (3, 4)


def _settings(**config):
    return RunSettings.from_run_config({key.replace("_", "-"): value for key, value in config.items()})


def _strategy(rule, n=5, **config):
    return department_strategy(_settings(aggregation=rule, **config), min_train_nodes=n, min_available_nodes=n)


def _round(strategy, updates, global_value=None, sizes=None, extra=()):
    """One round: ``updates`` name -> weights (None: a refusal); returns the aggregate as an array."""
    names = list(updates) + [name for name, _ in extra]
    base = np.zeros(SHAPE, dtype=np.float32) if global_value is None else global_value
    requests = list(strategy.configure_train(1, ArrayRecord({"w": Array(base)}), ConfigRecord(),
                                             Grid(range(1, len(names) + 1))))
    replies = []
    for request, name in zip(requests, names):
        weights = updates.get(name) if name in updates else dict(extra)[name]
        status = "refused" if weights is None else "trained"
        replies.append(reply(request, name, weights, n=(sizes or {}).get(name, 10), status=status))
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else arrays["w"].numpy()


def _honest(rng, count=4, center=1.0, spread=0.1):
    return {f"h{i}": (center + spread * rng.standard_normal(SHAPE)).astype(np.float32) for i in range(count)}


# ----------------------------------------------------------------------------- (a) a huge scaled update


@pytest.mark.parametrize("rule", ROBUST)
def test_a_robust_rule_ignores_one_huge_scaled_update_that_drags_fedavg_away(rule):
    rng = np.random.default_rng(1)
    honest = _honest(rng)
    low, high = np.min(list(honest.values()), axis=0), np.max(list(honest.values()), axis=0)
    attack = {**honest, "evil": np.full(SHAPE, 1000.0, dtype=np.float32)}
    fedavg = _round(_strategy("fedavg"), dict(attack))
    robust = _round(_strategy(rule), dict(attack))
    assert np.all(fedavg > 100)  # one of five at 1000 moves the mean by ~200
    assert np.all((robust >= low - 1e-6) & (robust <= high + 1e-6)), "left the honest updates' range"
    if rule == "krum":  # Krum returns one update as it is: an honest one
        assert any(np.array_equal(robust, h) for h in honest.values())


@pytest.mark.parametrize("rule", ROBUST)
def test_a_robust_rule_gives_no_weight_to_the_num_examples_a_department_claims(rule):
    rng = np.random.default_rng(2)
    attack = {**_honest(rng), "evil": np.full(SHAPE, -50.0, dtype=np.float32)}
    modest = _round(_strategy(rule), dict(attack), sizes={"evil": 10})
    boastful = _round(_strategy(rule), dict(attack), sizes={"evil": 10**9})
    np.testing.assert_array_equal(modest, boastful)
    fedavg_modest = _round(_strategy("fedavg"), dict(attack), sizes={"evil": 10})
    fedavg_boastful = _round(_strategy("fedavg"), dict(attack), sizes={"evil": 10**9})
    assert np.all(fedavg_boastful < fedavg_modest - 30)  # FedAvg believes it: almost the liar's update


# ----------------------------------------------------------------------------- (b) a sign-flipped update


@pytest.mark.parametrize("rule", ROBUST)
def test_a_sign_flipped_update_pulls_fedavg_back_but_not_a_robust_rule(rule):
    rng = np.random.default_rng(3)
    glob = (0.3 * rng.standard_normal(SHAPE)).astype(np.float32)
    direction = rng.standard_normal(SHAPE)
    deltas = {f"h{i}": direction + 0.05 * rng.standard_normal(SHAPE) for i in range(4)}
    updates = {name: (glob + d).astype(np.float32) for name, d in deltas.items()}
    updates["evil"] = (glob - deltas["h0"]).astype(np.float32)  # its honest delta, sign-flipped

    def progress(aggregate):  # how far along the honest direction the round moved, 1 = fully
        return float(np.sum((aggregate - glob) * direction) / np.sum(direction * direction))

    fedavg = progress(_round(_strategy("fedavg"), dict(updates), global_value=glob))
    robust = progress(_round(_strategy(rule), dict(updates), global_value=glob))
    assert fedavg < 0.7  # (4 - 1) / 5 of the way
    assert robust > 0.9


# ----------------------------------------------------------------------------- (c) the norm bound


def test_the_norm_bound_scales_a_large_update_to_exactly_the_bound_and_reports_it():
    rng = np.random.default_rng(4)
    glob = {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    big = {"w": np.full((2, 3), 3.0), "b": np.full(3, -4.0)}  # norm sqrt(6·9 + 3·16) over both layers
    small = {"w": np.full((2, 3), 0.1), "b": np.zeros(3)}
    big_norm = math.sqrt(sum(float(np.sum(d**2)) for d in big.values()))
    strategy = department_strategy(_settings(max_update_norm=2.0), min_train_nodes=1, min_available_nodes=1)
    requests = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in glob.items()}), ConfigRecord(),
                                             Grid([1, 2])))

    def update(delta):
        return ArrayRecord({k: Array((glob[k] + delta[k]).astype(np.float32)) for k in glob})

    replies = [reply(requests[0], "big", n=10), reply(requests[1], "small", n=10)]
    for msg, delta in zip(replies, (big, small)):
        msg.content["arrays"] = update(delta)
    accepted = strategy.classify(1, replies)
    assert strategy.last_report.clipped == {"big": pytest.approx(big_norm)}
    sent = {m.content["department"]["name"]: m.content["arrays"] for m in accepted}
    bounded = {k: sent["big"][k].numpy().astype(np.float64) - glob[k] for k in glob}
    assert math.sqrt(sum(float(np.sum(d**2)) for d in bounded.values())) == pytest.approx(2.0, rel=1e-5)
    for k in glob:  # the same direction, scaled
        np.testing.assert_allclose(bounded[k], big[k] * 2.0 / big_norm, rtol=1e-4, atol=1e-5)
        assert sent["big"][k].numpy().dtype == np.float32
        np.testing.assert_array_equal(sent["small"][k].numpy(), (glob[k] + small[k]).astype(np.float32))


@pytest.mark.parametrize("rule", ROBUST)
def test_the_norm_bound_applies_before_a_robust_rule(rule):
    rng = np.random.default_rng(5)
    honest = _honest(rng, center=0.0, spread=0.01)
    strategy = _strategy(rule, max_update_norm=0.05)
    _round(strategy, {**honest, "evil": np.full(SHAPE, 9.0, dtype=np.float32)})
    assert set(strategy.last_report.clipped) >= {"evil"}
    assert strategy.last_report.clipped["evil"] == pytest.approx(9.0 * math.sqrt(np.prod(SHAPE)), rel=1e-6)


def test_the_norm_bound_holds_under_client_level_dp(tmp_path):
    class NoNoise:
        def normal(self, loc, scale, size):
            return np.zeros(size)

    settings = _settings(central_dp=True, max_update_norm=2.0)
    inner = department_strategy(settings, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    central = ClientLevelDP(inner, noise_multiplier=1.0, clipping_norm=10.0, sample_rate=1.0, delta=1e-3,
                            max_epsilon=100.0, ledger=coordinator_ledger(tmp_path / "central"), run_id="1")
    central._noise = NoNoise()
    (request,) = central.configure_train(1, ArrayRecord({"w": Array(np.ones((2, 2), dtype=np.float32))}),
                                         ConfigRecord(), Grid([1]))
    arrays, _ = central.aggregate_train(1, [reply(request, "a", np.full((2, 2), 6.0, dtype=np.float32))])
    moved = arrays["w"].numpy() - 1.0  # the delta of norm 10 bounded to 2, below the clip of 10, no noise
    assert float(np.linalg.norm(moved)) == pytest.approx(2.0, rel=1e-5)
    assert central.last_report.clipped == {"a": pytest.approx(10.0)}


# ----------------------------------------------------------------------------- (d) only accepted updates


@pytest.mark.parametrize("rule", ROBUST)
def test_refused_and_rejected_replies_never_reach_the_robust_rule(rule, monkeypatch):
    flower = {"trimmed-mean": FedTrimmedAvg, "median": FedMedian, "krum": Krum}[rule]
    seen = []
    original = flower.aggregate_train

    def spy(self, server_round, replies):
        seen.extend(m.content["department"]["name"] for m in replies)
        return original(self, server_round, replies)

    monkeypatch.setattr(flower, "aggregate_train", spy)
    rng = np.random.default_rng(6)
    honest = _honest(rng, count=5)
    extra = [("refuser", None), ("nan", np.full(SHAPE, np.nan, dtype=np.float32)),
             ("misshaped", np.ones((4, 4), dtype=np.float32))]
    strategy = _strategy(rule)
    result = _round(strategy, honest, extra=extra)
    assert sorted(seen) == sorted(honest)
    assert np.all(np.isfinite(result))
    report = strategy.last_report
    assert set(report.refused) == {"refuser"} and set(report.rejected) == {"nan", "misshaped"}


@pytest.mark.parametrize("rule", ROBUST)
def test_a_round_left_with_too_few_updates_for_the_rule_is_not_aggregated(rule):
    strategy = _strategy(rule, byzantine=1)
    need = strategy.least_updates
    rng = np.random.default_rng(7)
    honest = _honest(rng, count=need - 1)
    refusals = [(f"r{i}", None) for i in range(6 - len(honest))]
    with pytest.raises(TooFewUpdates, match=rf"needs at least {need} accepted updates, got {need - 1}"):
        _round(strategy, honest, extra=refusals)
    assert sorted(strategy.last_report.trained) == sorted(honest)  # who did what is still known


# ----------------------------------------------------------------------------- (e) bad settings


def test_least_updates_is_where_each_rule_starts_to_tolerate_f_attackers():
    for f in range(4):
        assert least_updates("krum", f) == 2 * f + 3
        assert least_updates("median", f) == 2 * f + 1
        for beta in (0.05, 0.1, 0.2, 0.25, 0.3, 0.45):
            n, cut = least_updates("trimmed-mean", f, beta), max(f, 1)
            assert int(beta * n) >= cut > int(beta * (n - 1)), (f, beta, n)


@pytest.mark.parametrize(
    ("config", "n", "named"),
    [
        ({"aggregation": "krum", "byzantine": 1}, 4, ["krum", "byzantine = 1", "min-departments", "5"]),
        ({"aggregation": "krum", "byzantine": 2}, 6, ["byzantine = 2", "min-departments to 7"]),
        ({"aggregation": "median", "byzantine": 2}, 4, ["median", "min-departments to 5"]),
        ({"aggregation": "trimmed-mean", "trim_fraction": 0.2}, 4, ["trim-fraction = 0.2", "min-departments to 5"]),
        ({"aggregation": "trimmed-mean", "trim_fraction": 0.0}, 10, ["trim-fraction 0", "fedavg"]),
        ({"aggregation": "median", "central_dp": True}, 5, ["median", "--central-dp", "sum"]),
        ({"aggregation": "krum", "central_dp": True}, 5, ["krum", "--central-dp"]),
    ],
)
def test_a_setting_that_makes_no_sense_is_a_value_error_naming_it(config, n, named):
    config = dict(config)
    with pytest.raises(ValueError) as err:
        _strategy(config.pop("aggregation"), n=n, **config)
    for text in named:
        assert text in str(err.value)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "2"])
def test_a_bad_max_update_norm_is_named(value):
    with pytest.raises(ValueError, match="max-update-norm"):
        DepartmentFedAvg(max_update_norm=value)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_byzantine_is_named(value):
    with pytest.raises(ValueError, match="byzantine"):
        DepartmentKrum(byzantine=value, min_train_nodes=9)


@pytest.mark.parametrize("value", [-0.1, 0.5, 0.7])
def test_a_bad_trim_fraction_is_named(value):
    with pytest.raises(ValueError, match="trim-fraction"):
        DepartmentTrimmedMean(trim_fraction=value, min_train_nodes=20)


@pytest.mark.parametrize("rule", list(RULES))
def test_department_strategy_builds_each_rule_as_a_department_fedavg(rule):
    strategy = _strategy(rule, max_update_norm=3.0, byzantine=1)
    assert type(strategy) is RULES[rule] and isinstance(strategy, DepartmentFedAvg)
    assert strategy.max_update_norm == 3.0 and strategy.heads is None and strategy.asked == []
    central = department_strategy(_settings(aggregation="fedavg", central_dp=True, max_update_norm=3.0),
                                  fraction_train=1.0)
    assert type(central) is DepartmentFedAvg and central.max_update_norm == 3.0


# ----------------------------------------------------------------------------- end to end, real DP-SGD


def test_five_dp_departments_one_attacking_robust_rules_beat_fedavg():
    """5 departments train digits with DP-SGD; one sends w_global − 10·Δ; each rule runs its own federation."""
    from fedsilo.benchmarks.robustness import Setup, run_cell

    setup = Setup(rounds=6, repeats=1, noise_multiplier=1.0)
    started = time.perf_counter()
    cells = {rule: run_cell(rule, "scaled", setup) for rule in ("fedavg", *ROBUST)}
    assert time.perf_counter() - started < 120
    final = {rule: cell["accuracy"][-1] for rule, cell in cells.items()}
    attacker = cells["fedavg"]["attacker"]
    for cell in cells.values():  # the attack is what it says: ten times an honest update's norm
        assert min(cell["attacker_norm"]) > 5 * max(cell["honest_norm"])
        assert math.isfinite(cell["epsilon"]) and cell["epsilon"] > 0
    for rule in ROBUST:
        assert final[rule] > final["fedavg"] + 0.25, final
    assert attacker not in cells["krum"]["krum_selected"]
