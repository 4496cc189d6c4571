"""The secure-aggregation benchmark's presenter: gaps, their SE, the target's verdict and the cost table's rows.

Synthetic numbers only: nothing trains or simulates here.
"""

from __future__ import annotations

import math

import pytest

from fedsilo.benchmarks import secure_aggregation_summary as present


def _pooled(accuracy: float, sigma: float) -> dict:
    return {"accuracy": accuracy, "loss": 0.5, "noise_multiplier": sigma, "sample_rate": 0.1, "steps": 20,
            "epsilon": 6.5, "seconds": 0.2}


def _costs(upload: int, setup_bytes: int | None) -> dict:
    return {"rounds": 20, "round_seconds": [9.0, 1.0, 1.2], "median_round_seconds": 1.1, "model_bytes": 100,
            "upload_bytes": upload, "download_bytes": 120, "protocol_download_bytes": 20,
            "setup_bytes": setup_bytes, "setup_seconds": None if setup_bytes is None else 3.0,
            "vector_length": None if setup_bytes is None else 65, "modulus_bits": None if setup_bytes is None else 38,
            "threshold": 6, "wall_time_s": 30.0, "accuracy": 0.8}


def _cell(ddp_acc: float, pooled_acc: float) -> dict:
    ddp = {"accuracy": ddp_acc, "max_epsilon": 8.0, "noise_multiplier": 1.0, "sum_noise_multiplier": math.sqrt(10 / 6),
           "participants": 10, "threshold": 6, "colluders": 0, "kind": "skellam", "ledger_accountant": "rdp-skellam",
           "costs": _costs(300, 5000)}
    return {"ddp": ddp, "same_sigma": _pooled(pooled_acc, 1.0), "sum_noise": _pooled(pooled_acc - 0.02, 1.29),
            "pld_sigma": _pooled(pooled_acc + 0.01, 0.8), "local": None}


def _raw(gap_at_top: float) -> dict:
    setup = {"datasets": ["digits"], "epochs": [2], "departments": 10, "epsilons": [3.0, 8.0], "local_rounds": 5,
             "cost": True, "local": True, "batch_size": 128, "learning_rate": 2.0, "momentum": 0.5,
             "max_grad_norm": 1.0, "partition": "dirichlet:0.5", "seed": 42, "cost_dataset": "digits",
             "timeout_s": 60.0}
    rec = {"department_sizes": [40, 200], "num_train": 1000, "num_test": 400, "num_classes": 10, "model": "MLP",
           "model_bytes": 100, "sample_rate": 0.1, "steps": 20, "epochs": 2,
           "cells": {"eps3": _cell(0.70, 0.75), "eps8": _cell(0.90 - gap_at_top, 0.90)}}
    cost = {"dataset": "digits", "epsilon": 8.0, "ddp": rec["cells"]["eps8"]["ddp"]["costs"],
            "plain": _costs(100, None), "secagg": None}
    return {"setup": setup, "delta": 1e-5, "accountant": "pld", "datasets": {"digits": rec}, "cost": cost}


def test_gap_is_pooled_minus_distributed_with_the_binomial_se_of_two_runs():
    cell = _cell(0.80, 0.85)
    assert present.gap_points(cell) == pytest.approx(5.0)
    expected = 100 * math.hypot(math.sqrt(0.8 * 0.2 / 400), math.sqrt(0.85 * 0.15 / 400))
    assert present.gap_se(cell, 400) == pytest.approx(expected)


@pytest.mark.parametrize("gap, met", [(0.9, True), (1.1, False)])
def test_the_target_is_judged_against_pooled_dp_sgd_at_the_same_epsilon_at_the_largest_epsilon_only(gap, met):
    # The pooled run at its own PLD σ is 1 point above the one at the Skellam plan's σ (see _cell).
    (target,) = present.summarize(_raw((gap - 1) / 100), gap_target=1.0)["targets"]
    assert target.met is met  # ε = 3's 6-point gap does not decide it
    assert "ε = 8" in target.target and "At ε = 3 the gap is +6.0" in target.note
    assert f"gap {gap:+.1f} points" in " ".join(target.measured.split())
    assert ("What would close it" in target.note) is (not met)


def test_cost_table_leaves_out_a_mode_that_did_not_run_and_plain_has_no_setup():
    tables = present.summarize(_raw(0.01), gap_target=1.0)["tables"]
    utility, cost = tables
    assert [row[0] for row in cost.rows] == ["plain FedAvg (local DP)", "--distributed-dp"]
    plain, ddp = cost.rows
    assert plain[5:8] == ["—", "—", "—"] and ddp[7] == "65 × 38 bits"
    assert [row[0] for row in utility.rows] == ["ε = 3", "ε = 8"] and utility.rows[1][-1] == "—"
