"""The dp-cost and accounting benchmarks: their measurements, ratios and targets (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsilo.shared.accounting import Mechanism
from fedsilo.benchmarks import accounting_tightness as acct
from fedsilo.benchmarks import dp_cost
from fedsilo.benchmarks.report import render


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- dp-cost


def test_one_configuration_in_a_fresh_process_returns_sane_json():
    record = dp_cost.run_child("mlp-digits", "ghost", examples=128, reps=1, timeout=300)
    assert record["ok"], record.get("error")
    assert (record["config"], record["variant"], record["examples"]) == ("mlp-digits", "ghost", 128)
    assert record["steps"] == math.ceil(128 / dp_cost.BATCH_SIZE)  # the planned mechanism's steps, one epoch
    assert len(record["seconds"]) == 1 and record["median_s"] > 0
    assert record["setup_s"] is not None and record["setup_s"] > 0
    assert record["torch_threads"] == dp_cost.THREADS
    assert record["model"] == "MLP" and record["parameters"] == 64 * 128 + 128 + 128 * 10 + 10
    # Memory: positive, ordered, and the loading peak is not charged to training.
    assert 0 < record["rss_after_imports"] <= record["rss_loading_peak"]
    assert record["rss_before_training"] <= record["rss_peak"]
    assert record["ghost_norm_layers"] == ["Linear"] and record["materialized_layers"] == []
    assert record["default_mode"] == "bk"  # what fedsilo's auto mode runs for an MLP: book-keeping
    json.dumps(record, allow_nan=False)


def test_ghost_on_the_cnn_records_its_ghost_norm_layers_and_the_default_it_runs(keep_threads):
    record = dp_cost.measure_one("cnn-mnist5k", "ghost", examples=32, reps=1)
    assert record["ok"], record.get("error")
    assert record["model"] == "SmallCNN"
    assert record["ghost_norm_layers"] == ["Conv2d", "GroupNorm", "Linear"] and record["materialized_layers"] == []
    assert record["default_mode"] == "bk"  # book-keeping covers the convolutions and GroupNorm too


def test_a_failing_variant_is_recorded_not_raised(keep_threads):
    record = dp_cost.measure_one("mlp-digits", "no-such-mode", examples=64, reps=1)
    assert record["ok"] is False
    assert "no-such-mode" in record["error"] or "Error" in record["error"]
    assert "rss_peak" in record  # memory is still reported


def test_a_child_that_runs_too_long_becomes_a_failed_record():
    record = dp_cost.run_child("mlp-digits", "plain", examples=64, reps=1, timeout=0.05)
    assert record["ok"] is False and "timed out" in record["error"]


def _rec(config, variant, median, steps=10, **extra):
    return {
        "config": config, "variant": variant, "ok": True, "examples": 640, "steps": steps, "seconds": [median],
        "median_s": median, "setup_s": None if variant == "plain" else 0.001, "device": "cpu", "torch_threads": 1,
        "rss_after_imports": 300 * 2**20, "rss_loading_peak": 400 * 2**20, "rss_before_training": 350 * 2**20,
        "rss_peak": 380 * 2**20, "peak_reset": True, "cuda_peak_allocated": None, **extra,
    }


def _stub_records():
    mlp = dict(ghost_norm_layers=["Linear"], materialized_layers=[], default_mode="bk")
    cnn = dict(ghost_norm_layers=["Linear"], materialized_layers=["Conv2d", "GroupNorm"], default_mode="hooks")
    return [
        _rec("mlp-digits", "plain", 0.10, **mlp),
        _rec("mlp-digits", "bk", 0.14, **mlp),
        _rec("mlp-digits", "ghost", 0.25, **mlp),
        _rec("mlp-digits", "hooks", 1.00, **mlp),
        {"config": "mlp-digits", "variant": "functorch", "ok": False, "error": "RuntimeError: boom | with a pipe"},
        _rec("mlp-digits", "ew", 0.15, **mlp),
        _rec("cnn-mnist5k", "plain", 1.0, **cnn),
        _rec("cnn-mnist5k", "ghost", 2.4, **cnn),
        _rec("cnn-mnist5k", "hooks", 1.8, **cnn),
    ]


def test_ratios_are_each_variant_over_plain_of_the_same_model():
    records = _stub_records()
    ratios = dp_cost.add_ratios(records)
    assert ratios["mlp-digits"] == pytest.approx({"plain": 1.0, "bk": 1.4, "ghost": 2.5, "hooks": 10.0, "ew": 1.5})
    assert ratios["cnn-mnist5k"] == pytest.approx({"plain": 1.0, "ghost": 2.4, "hooks": 1.8})
    assert next(r for r in records if r["variant"] == "functorch")["ratio"] is None


def test_targets_judge_the_default_path_of_each_model_against_its_own_ratio():
    records = _stub_records()
    dp_cost.add_ratios(records)
    targets = {t.target.split(": ", 1)[1]: t for t in dp_cost.targets_for(records)}
    mlp = targets[dp_cost.CONFIGS["mlp-digits"].label]
    cnn = targets[dp_cost.CONFIGS["cnn-mnist5k"].label]
    assert mlp.met is True and mlp.measured.startswith("1.40×") and "(auto → bk) ≤ 1.5×" in mlp.target
    assert "book-keeping" in mlp.note and "fastest other mode: ew 1.50×" in mlp.note
    # The CNN's default is hooks: judged on hooks, not on ghost, against its 1.5×.
    assert cnn.met is False and cnn.measured.startswith("1.80×") and "(auto → hooks) ≤ 1.5×" in cnn.target
    assert "Conv2d, GroupNorm" in cnn.note and "auto mode runs hooks" in cnn.note and "2.40×" in cnn.note
    assert "What would close it" in cnn.note and "book-keeping rules for Conv2d, GroupNorm" in cnn.note
    # A model whose default run failed is "not measured", not met or missed.
    records = [r for r in _stub_records() if r["config"] == "mlp-digits" and r["variant"] != "bk"]
    records.append({"config": "mlp-digits", "variant": "bk", "ok": False, "error": "ValueError: x"})
    dp_cost.add_ratios(records)
    (only,) = dp_cost.targets_for(records)
    assert only.met is None and "bk failed" in only.measured


def test_result_saves_renders_and_plots(tmp_path):
    result = dp_cost.build_result(_stub_records(), tmp_path, quick=True, reps=1, jobs=2)
    result.save(tmp_path)  # strict JSON: no NaN anywhere
    assert (tmp_path / dp_cost.PLOT).stat().st_size > 1000
    time_table = result.tables[0]
    assert len(time_table.rows) == 9
    failed = next(row for row in time_table.rows if row[1] == "functorch")
    assert failed[-1].startswith("failed: RuntimeError") and "|" not in failed[-1]  # no broken Markdown row
    text = render(tmp_path).read_text()
    assert "DP-SGD cost" in text and "dp_cost.png" in text
    # The saved result re-renders from its raw records alone: the same text, tables and targets.
    again = dp_cost.rerender(tmp_path / "dp-cost.json", draw_plots=False)
    assert (again.text, again.tables, again.targets) == (result.text, result.tables, result.targets)


def test_run_starts_one_process_per_model_and_variant(tmp_path, monkeypatch):
    calls = []

    def fake_child(config, variant, examples, reps, timeout):
        calls.append((config, variant, examples, reps))
        return _rec(config, variant, 0.1 if variant == "plain" else 0.3, examples=examples)

    monkeypatch.setattr(dp_cost, "run_child", fake_child)
    dp_cost.run(tmp_path, quick=True)
    quick_models = [c for c, spec in dp_cost.CONFIGS.items() if spec.in_quick]
    assert sorted(calls) == sorted(
        (c, v, dp_cost.CONFIGS[c].quick_examples, 2) for c in quick_models for v in dp_cost.VARIANTS
    )
    calls.clear()
    dp_cost.run(tmp_path, quick=False)
    assert {c for c, *_ in calls} == set(dp_cost.CONFIGS)  # the 512-wide MLP too
    assert len(calls) == sum(len(spec.variants or dp_cost.VARIANTS) for spec in dp_cost.CONFIGS.values())
    assert {v for c, v, *_ in calls if c == "lora-reviews"} == {"plain", "bk", "ghost"}  # a transformer: the fast modes


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    "mechanism, rounds, delta",
    [(Mechanism(3.789, 1 / 3, 3), 20, 1e-5), (Mechanism(1.0, 0.1, 1), 20, 1e-3), (Mechanism(1.5, 1.0, 1), 20, 1e-3)],
)
def test_prv_and_pld_are_tighter_than_rdp_and_agree(mechanism, rounds, delta):
    eps = acct.all_epsilons([mechanism] * rounds, delta, ("prv", "rdp", "pld", "rdp_dpacc"))
    assert all(v is not None and v > 0 for v in eps.values()), eps
    assert eps["prv"] <= eps["rdp"]
    assert eps["pld"] <= eps["rdp"] and eps["pld"] <= eps["rdp_dpacc"]
    assert eps["pld"] == pytest.approx(eps["prv"], rel=0.02)


def test_tightness_allows_one_percent_and_flags_more():
    rows = [{"eps": {"prv": 1.00, "rdp": 1.08, "pld": 0.995}}, {"eps": {"prv": 3.0, "rdp": 3.3, "pld": 2.99}}]
    t = acct.tightness(rows, "prv", ("rdp", "pld"))
    assert t["ok"] and t["violations"] == 0 and t["rows"] == 2
    assert t["worst_default_over_tightest_other"] == pytest.approx(1.0 / 0.995)
    assert t["default_over"]["rdp"] == pytest.approx((3.0 / 3.3, 1.0 / 1.08))  # (min, max)
    rows.append({"eps": {"prv": 1.0, "rdp": 1.1, "pld": 0.98}})  # PRV 2 % above PLD
    assert not acct.tightness(rows, "prv", ("rdp", "pld"))["ok"]
    rows = [{"eps": {"prv": None, "rdp": 1.1, "pld": 0.98}}]  # the default failed: never "tightest"
    assert not acct.tightness(rows, "prv", ("rdp", "pld"))["ok"]


def test_department_plans_follow_plan_round(monkeypatch):
    from fedsilo.client import budget_guard

    def fake_noise(prior, target, delta, q, steps, accountant):
        return 1.0 + target

    fake_noise.cache_clear = lambda: None
    monkeypatch.setattr(budget_guard, "_noise_for_target", fake_noise)
    sizes, plans = acct.department_plans((1.0, 3.0))
    assert len(sizes) == acct.DEPARTMENTS and len(plans) == 2 * acct.DEPARTMENTS
    for plan in plans:
        batches = math.ceil(plan["examples"] / 64)
        m = plan["mechanism"]
        assert (m.noise_multiplier, m.sample_rate, m.steps) == (1.0 + plan["target"], 1.0 / batches, batches)


def test_accounting_run_end_to_end(tmp_path, monkeypatch):
    from fedsilo.client import budget_guard

    def fake_noise(prior, target, delta, q, steps, accountant):
        return 2.0 + target  # planning σ by binary search is slow; the rest is real

    fake_noise.cache_clear = lambda: None
    monkeypatch.setattr(budget_guard, "_noise_for_target", fake_noise)
    monkeypatch.setattr(acct, "round_training_seconds", lambda examples, mechanism, reps: 0.05)
    result = acct.run(tmp_path, quick=True)
    result.save(tmp_path)
    assert (tmp_path / acct.PLOT).stat().st_size > 1000
    for row in result.raw["record_level"]:
        eps = row["epsilon"]
        assert eps["prv"] <= eps["rdp"] and eps["pld"] <= eps["rdp"]
    for row in result.raw["client_level"]:
        assert row["eps"]["pld"] <= min(row["eps"]["rdp"], row["eps"]["rdp_dpacc"])
    timing = result.raw["seconds_per_call"]
    assert set(timing) == {"prv", "rdp", "pld"} and all(set(t) == {"1", "20", "100"} for t in timing.values())
    names = [t.target for t in result.targets]
    assert len(names) == 3 and any("client level" in n for n in names)
    # The measured ratios read default/other, so the default (PLD) shows ≤ 1 against RDP.
    import re

    pld_over_rdp = re.search(r"PLD/RDP ([0-9.]+)", result.targets[0].measured)
    assert pld_over_rdp and float(pld_over_rdp.group(1)) < 1
    fraction = result.raw["epsilon_fraction_of_round"]
    assert result.targets[2].met == (fraction <= acct.SMALL_FRACTION)
    curve = result.raw["curve"]["prv"]
    assert [r for r, _ in curve] == [1, 5, 10, 20] and all(a[1] < b[1] for a, b in zip(curve, curve[1:]))
    # The saved result re-renders from its raw numbers alone, without computing an ε.
    monkeypatch.setattr(acct, "epsilon_with", lambda *a: pytest.fail("a re-render computed an ε"))
    again = acct.rerender(tmp_path / "accounting.json")
    assert (again.text, again.tables, again.targets) == (result.text, result.tables, result.targets)
