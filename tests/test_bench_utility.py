"""The privacy–utility benchmark's own machinery: the recipe's accounting, the baselines, the result.

No accuracy thresholds and no timings: these check that what the benchmark
*claims* about ε is what an independent Opacus accountant says, and that its
result has the shape the report expects.  The real ``fedsilo simulate`` runs are
covered by the end-to-end tests; here they are replaced by a synthetic run
directory (summary + signed ledgers) that the benchmark reads the same way.
"""

from __future__ import annotations

import json
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant

from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.data import federation_data, load_dataset, train_test_split
from fedsilo.shared.ledger import PrivacyLedger
from fedsilo.shared.signing import Signer
from fedsilo.benchmarks import utility
from fedsilo.benchmarks.report import render

DELTA = 1e-5


def _independent(steps: list[tuple[float, float, int]]) -> float:
    """ε from dp-accounting's PLD fed one round at a time (fedsilo's accountant, built without fedsilo)."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, n in steps:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return float(acc.get_epsilon(DELTA))


def _opacus_prv(steps: list[tuple[float, float, int]]) -> float:
    """ε from a fresh Opacus PRV accountant fed one step at a time: what the recipe's engine reports."""
    acc = PRVAccountant()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=DELTA))


@pytest.fixture(scope="module")
def small():
    """Two small digits departments (≈100 examples each) and a small test set: fast rounds."""
    parts, test = federation_data("digits", "label", (), 2, "iid", 42)
    return [p.subset(np.arange(96 + 17 * i)) for i, p in enumerate(parts)], test.subset(np.arange(120))


@pytest.fixture(scope="module")
def recipe_three_rounds(small):
    parts, test = small
    return utility.run_recipe(parts, test, 8.0, 3, seed=0)


def test_recipe_reports_one_round_but_releases_all(small, recipe_three_rounds):
    parts, _ = small
    r = recipe_three_rounds
    sigma = r["noise_multiplier"]
    for i, part in enumerate(parts):
        batches = math.ceil(len(part) / utility.RECIPE_HP.batch_size)
        assert r["steps_per_department"][i] == 3 * batches  # one epoch of Poisson batches per round
        one_round = _opacus_prv([(sigma, 1 / batches, batches)])
        all_rounds = _independent([(sigma, 1 / batches, batches)] * 3)
        assert r["reported_epsilon_per_department"][i] == pytest.approx(one_round, rel=1e-6)
        assert r["honest_epsilon_per_department"][i] == pytest.approx(all_rounds, rel=1e-6)
        assert all_rounds > 1.3 * one_round  # composition over 3 rounds is not free
    assert r["honest_epsilon"] == max(r["honest_epsilon_per_department"])
    assert r["reported_epsilon"] < r["honest_epsilon"] <= 8.0 + 1e-9


def test_recipe_sigma_is_sized_for_the_smallest_department():
    sizes = [44, 213]
    sigma = utility.recipe_sigma(sizes, 32, 20, 3.0)
    eps = {n: _independent([(m.noise_multiplier, m.sample_rate, m.steps) for m in
                            utility.recipe_history(n, 32, sigma, 20)]) for n in sizes}
    assert eps[44] <= 3.0 and eps[44] > 2.9  # the binding department sits at the target
    assert eps[213] < eps[44] - 0.5  # the larger one is over-noised by the single σ


def test_recipe_one_round_reports_its_honest_epsilon(small):
    parts, test = small
    r = utility.run_recipe(parts, test, 3.0, 1, seed=0)
    # One round: the recipe's own report (Opacus PRV) and the honest ε (PLD) see the same history.
    assert r["reported_epsilon"] == pytest.approx(r["honest_epsilon"], rel=0.01)
    assert r["honest_epsilon"] <= 3.0


def test_centralized_epsilon_within_target(small):
    parts, test = small
    train = utility.pooled(parts)
    r = utility.run_centralized(train, test, 3.0, 2, seed=0)
    batches = math.ceil(len(train) / utility.FEDSILO_HP.batch_size)
    assert r["steps"] == 2 * batches and r["num_examples"] == len(train)
    assert r["sample_rate"] == pytest.approx(1 / batches)
    independent = _independent([(r["noise_multiplier"], 1 / batches, 2 * batches)])
    assert r["epsilon"] == pytest.approx(independent, rel=1e-6)
    assert independent <= 3.0


def test_centralized_no_dp_baseline_trains_at_fedsilos_learning_rate(small):
    parts, test = small
    train = utility.pooled(parts)
    plain = utility.run_centralized(train, test, None, 5, seed=0)
    assert plain["accuracy"] > 0.6  # it trained: chance is 0.1


def test_pooled_data_is_exactly_the_departments_examples():
    parts, _ = federation_data("digits", "label", (), 10, "dirichlet:0.5", 42)
    train, _ = train_test_split(load_dataset("digits"))
    pooled = utility.pooled(parts)
    assert len(pooled) == sum(len(p) for p in parts) == len(train)

    def rows(d):
        table = np.concatenate([d.x, d.y[:, None].astype(np.float32)], axis=1)
        return table[np.lexsort(table.T[::-1])]

    assert np.array_equal(rows(pooled), rows(train))


def _fake_run_dir(run_dir, epsilon, sizes):
    """What `fedsilo simulate` leaves behind: summary.json and signed ledgers."""
    run_dir.mkdir(parents=True)
    signer = Signer(ec.generate_private_key(ec.SECP384R1()))
    rounds = 3
    for i, n in enumerate(sizes):
        if epsilon is None:
            break
        ledger = PrivacyLedger(run_dir / "ledgers" / f"dept-{i:02d}.jsonl", f"dept-{i:02d}", signer)
        m = Mechanism(1.0 + i, 1 / math.ceil(n / 64), math.ceil(n / 64))
        for rnd in range(1, rounds + 1):
            eps = utility.accounting.epsilon([m] * rnd, DELTA)
            ledger.append(run_id="1", round=rnd, mechanism=m, max_grad_norm=1.0, delta=DELTA,
                          accountant=utility.ACCOUNTANT, epsilon=eps, num_examples=n)
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "completed", "final_accuracy": 0.5, "initial": {"accuracy": 0.1},
        "rounds": [{"round": r, "accuracy": 0.1 * r} for r in range(1, rounds + 1)], "wall_time_s": 1.0,
    }))


def test_read_fedsilo_run_takes_the_worst_department(tmp_path):
    _fake_run_dir(tmp_path / "run", 8.0, [100, 300])
    r = utility.read_fedsilo_run(tmp_path / "run")
    assert set(r["departments"]) == {"dept-00", "dept-01"}
    worst = r["departments"]["dept-00"]  # σ 1.0 at the higher sample rate
    assert worst["steps"] == 3 * 2 and worst["rounds"] == 3
    assert r["max_epsilon"] == pytest.approx(worst["epsilon"])
    assert r["max_epsilon_rederived"] == pytest.approx(r["max_epsilon"], rel=1e-9)
    assert r["accuracy"] == 0.5 and r["curve"] == pytest.approx([0.1, 0.2, 0.3])


def test_quick_result_structure(tmp_path, monkeypatch):
    """Quick mode end to end, with the fedsilo subprocess replaced by a synthetic run."""
    calls = []

    def fake_fedsilo(dataset, setup, epsilon, base):
        cmd = utility.fedsilo_command(dataset, setup, epsilon, base / "x")
        calls.append(cmd)
        run_dir = base / f"{dataset}-{utility._key(epsilon)}"
        parts, _ = federation_data(dataset, "label", (), setup.departments, setup.partition, setup.seed)
        _fake_run_dir(run_dir, epsilon, [len(p) for p in parts])
        return {**utility.read_fedsilo_run(run_dir), "seconds": 0.0, "command": cmd[1:], "run_dir": str(run_dir)}

    monkeypatch.setattr(utility, "run_fedsilo", fake_fedsilo)
    result = utility.run(tmp_path, quick=True)
    result.seconds = 1.0
    saved = json.loads(result.save(tmp_path).read_text())

    setup = utility.QUICK
    assert [c[c.index("--departments") + 1] for c in calls] == [str(setup.departments)] * 2
    assert any("--no-dp" in c for c in calls) and any("--target-epsilon" in c for c in calls)
    assert saved["name"] == "utility" and saved["quick"] is True
    assert saved["plots"] == [utility.PLOT]
    assert (tmp_path / utility.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = saved["raw"]["datasets"]
    assert list(data) == list(setup.datasets) == ["digits"]
    keys = [utility._key(e) for e in setup.epsilons] + ["no-dp"]
    for system in ("fedsilo", "centralized", "recipe", "recipe_fedsilo_hp"):
        assert list(data["digits"][system]) == keys
    for k in keys[:-1]:
        assert data["digits"]["recipe"][k]["honest_epsilon"] > data["digits"]["recipe"][k]["reported_epsilon"]
        assert data["digits"]["centralized"][k]["epsilon"] <= float(k[3:])
    assert data["digits"]["centralized"]["no-dp"]["epsilon"] is None
    assert data["digits"]["centralized"]["eps8"]["epochs"] == setup.rounds * setup.local_epochs
    table = saved["tables"][0]
    assert table["columns"][:8] == ["setting", "fedsilo acc", "fedsilo max ε", "centralized acc",
                                    "centralized ε", "recipe acc", "recipe reported ε", "recipe honest ε"]
    assert [row[0] for row in table["rows"]] == ["ε = 8", "no DP"]
    # One gap target per dataset, one recipe target per (dataset, ε); every one measured.
    assert len(saved["targets"]) == len(setup.datasets) * (1 + len(setup.epsilons))
    assert all(t["met"] in (True, False) and t["measured"] for t in saved["targets"])
    md = render(tmp_path).read_text()
    assert "Privacy–utility" in md and "utility.png" in md
    # The saved result re-renders to the same targets without re-running anything.
    again = utility.rerender(tmp_path / "utility.json", draw_plots=False)
    assert [t.measured for t in again.targets] == [t["measured"] for t in saved["targets"]]
    assert (again.text, again.tables, again.targets) == (result.text, result.tables, result.targets)
