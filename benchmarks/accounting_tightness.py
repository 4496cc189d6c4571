"""Accounting tightness: ε of the same runs from PRV, RDP and PLD, and what one ε costs.

Record-level: the department mechanisms of a typical ``fedsilo simulate
--target-epsilon`` run (digits, 10 departments, ``dirichlet:0.5``, seed 42),
planned exactly as a department plans them (:func:`~fedsilo.client.budget_guard.plan_round`),
each composed over the planned rounds with every accountant fedsilo has.
Client-level: the coordinator's Poisson-sampled Gaussian over departments for a
grid of (σ, q, rounds), with dp-accounting's PLD (fedsilo's default there), RDP
(Opacus and dp-accounting) and Opacus' PRV.  Then the seconds one ε call takes,
against the training time of one department round.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism

from . import accounting_summary as summary
from .accounting_summary import DEPARTMENT_DEFAULT, DEPARTMENT_ORDER
from .common import BenchResult, rerendered

NAME = "accounting"
PLOT = "accounting_epsilon_vs_rounds.png"
DATASET, DEPARTMENTS, PARTITION, SEED = "digits", 10, "dirichlet:0.5", 42
DELTA = 1e-5
ROUNDS = 20
TARGETS = (1.0, 3.0, 8.0)
QUICK_TARGETS = (3.0,)
CURVE_TARGET = 3.0  # the department mechanism of the ε-vs-rounds plot and the timings
CENTRAL_DELTA = 1e-3
CENTRAL_SIGMAS = (0.8, 1.0, 1.5)
CENTRAL_QS = (1.0, 0.5, 0.1)
CENTRAL_ROUNDS = (20, 100)
TOLERANCE = 0.01  # "tightest within 1 %"
FINE_EPS_ERROR = 1e-3  # a 10× finer PRV than Opacus' default eps_error 0.01
SMALL_FRACTION = 0.10  # ε computation counts as small at ≤ 10 % of a round's wall time
CENTRAL_DEFAULT = "pld"  # server/central_dp.py


# --------------------------------------------------------------------------- ε


def dpacc_rdp_epsilon(history: list[Mechanism], delta: float) -> float:
    """ε of a history with dp-accounting's RDP accountant (independent of Opacus)."""
    import logging

    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    # It logs (absl) each fractional order whose series does not converge and drops
    # that order: the bound stays sound, only possibly less tight.  Keep the log quiet.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        acc = rdp_privacy_accountant.RdpAccountant()
        for sigma, q, steps in accounting.merge_history(history):
            gaussian = dp_accounting.GaussianDpEvent(sigma)
            acc.compose(gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian), int(steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def epsilon_with(name: str, history: list[Mechanism], delta: float) -> float:
    """ε by accountant name; PLD without fedsilo's fallback to RDP (a failure is an error here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "pld":
            return accounting.pld_epsilon(accounting.merge_history(history), delta)
        if name == "rdp_dpacc":
            return dpacc_rdp_epsilon(history, delta)
        return accounting.epsilon(history, delta, name)


def prv_epsilon(history: list[Mechanism], delta: float, eps_error: float) -> float:
    """Opacus' PRV upper bound with a chosen ``eps_error`` (fedsilo uses Opacus' default, 0.01)."""
    import numpy as np
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = accounting.merge_history(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def all_epsilons(history: list[Mechanism], delta: float, names: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in names:
        try:
            value = epsilon_with(name, history, delta)
            out[name] = value if math.isfinite(value) else None
        except Exception:  # an accountant that cannot handle the setting: recorded as missing
            out[name] = None
    return out


def tightness(rows: list[dict[str, Any]], default: str, others: tuple[str, ...], tol: float = TOLERANCE) -> dict[str, Any]:
    """How the default accountant compares with the others over ``rows`` (each with an ``eps`` dict).

    ``ok`` when, in every row, the default's ε ≤ (1 + tol) × the smallest other ε.
    """
    ratios = {o: [] for o in others}
    worst, violations = 0.0, []
    for row in rows:
        eps = row["eps"]
        if eps.get(default) is None:
            violations.append(row)
            continue
        present = [eps[o] for o in others if eps.get(o) is not None]
        for o in others:
            if eps.get(o):
                ratios[o].append(eps[default] / eps[o])
        if present:
            ratio = eps[default] / min(present)
            worst = max(worst, ratio)
            if ratio > 1 + tol:
                violations.append(row)
    return {
        "ok": not violations,
        "worst_default_over_tightest_other": worst,
        "default_over": {o: (min(r), max(r)) for o, r in ratios.items() if r},
        "violations": len(violations),
        "rows": len(rows),
    }


# --------------------------------------------------------------------------- record level


def department_plans(targets: tuple[float, ...]) -> tuple[list[int], list[dict[str, Any]]]:
    """Department sizes and each department's planned mechanism per target ε, as a run plans them."""
    from fedsilo.client import budget_guard
    from fedsilo.client.policy import Terms
    from fedsilo.shared.config import RUN_CONFIG_DEFAULTS, RunSettings
    from fedsilo.shared.data import federation_data

    parts, _ = federation_data(DATASET, "label", (), DEPARTMENTS, PARTITION, SEED)
    sizes = [len(p) for p in parts]
    budget_guard._noise_for_target.cache_clear()  # time the planning as a fresh department pays it
    plans = []
    for target in targets:
        settings = RunSettings.from_run_config({
            **RUN_CONFIG_DEFAULTS, "num-server-rounds": ROUNDS, "dataset": DATASET, "partition": PARTITION,
            "seed": SEED, "target-epsilon": target, "delta": DELTA, "max-epsilon": max(10.0, target),
        })
        for dept, n in enumerate(sizes):
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                terms = Terms(True, max(10.0, target), DELTA, "pld")
                mechanism = budget_guard.plan_round(settings, terms, n)
            plans.append({
                "target": target, "department": dept, "examples": n, "mechanism": mechanism,
                "plan_seconds": time.perf_counter() - started,
            })
    return sizes, plans


def record_level(plans: list[dict[str, Any]], rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """ε of each planned department's ``rounds``-round history with PRV, RDP and PLD (identical plans computed once)."""
    cache: dict[Mechanism, dict[str, float | None]] = {}
    rows = []
    for plan in plans:
        m = plan["mechanism"]
        if m not in cache:
            cache[m] = all_epsilons([m] * rounds, DELTA, ("prv", "rdp", "pld"))
        rows.append({**plan, "eps": cache[m]})
    return rows


# --------------------------------------------------------------------------- client level


def client_level(sigmas, qs, rounds_list) -> list[dict[str, Any]]:
    rows = []
    for sigma in sigmas:
        for q in qs:
            for rounds in rounds_list:
                history = [Mechanism(sigma, q, 1)] * rounds
                rows.append({
                    "sigma": sigma, "q": q, "rounds": rounds,
                    "eps": all_epsilons(history, CENTRAL_DELTA, ("pld", "prv", "rdp", "rdp_dpacc")),
                })
    return rows


# --------------------------------------------------------------------------- cost


def seconds_per_call(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_accountants(mechanism: Mechanism, rounds_list: tuple[int, ...], reps: int, distinct: int | None) -> dict[str, dict[str, float]]:
    """Seconds per ε call for a department history of R identical rounds (and, optionally, of distinct ones)."""
    timing: dict[str, dict[str, float]] = {}
    for name in ("prv", "rdp", "pld"):
        timing[name] = {}
        for rounds in rounds_list:
            history = [mechanism] * rounds
            timing[name][str(rounds)] = seconds_per_call(lambda: epsilon_with(name, history, DELTA), reps)
        if distinct:
            # Rounds that differ (σ changed, data grew) do not merge: every one is its own term.
            history = [
                Mechanism(mechanism.noise_multiplier * (1 + 0.001 * i), mechanism.sample_rate, mechanism.steps)
                for i in range(distinct)
            ]
            timing[name][f"{distinct}-distinct"] = seconds_per_call(
                lambda: epsilon_with(name, history, DELTA), max(1, reps // 2)
            )
    return timing


def round_training_seconds(examples, mechanism: Mechanism, reps: int) -> float:
    """Wall time of one department round of local DP-SGD (fedsilo's defaults: auto mode, i.e. ghost for this MLP, lr 0.5, C=1), one thread."""
    import torch

    from fedsilo.client.trainer import train_dp
    from fedsilo.shared.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as dp-cost: one core per department
    try:
        def one() -> None:
            model = build_model("auto", examples.input_shape, examples.num_classes, examples.kind)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_dp(model, examples, mechanism, max_grad_norm=1.0, learning_rate=0.5, device=torch.device("cpu"))

        return seconds_per_call(one, reps)
    finally:
        torch.set_num_threads(threads)


def dp_cost_reference(out: Path) -> dict[str, Any] | None:
    """dp-cost's epochs in fedsilo's default mode (if its JSON is in ``out``), to relate an ε call to bigger rounds."""
    import json

    path = Path(out) / "dp-cost.json"
    if not path.exists():
        return None
    try:
        records = json.loads(path.read_text())["raw"]["records"]
    except (ValueError, KeyError):
        return None
    return {
        r["config"]: {"examples": r["examples"], "seconds": r["median_s"], "steps": r["steps"]}
        for r in records
        if r.get("variant") == r.get("default_mode", "ghost") and r.get("ok")
    } or None


# --------------------------------------------------------------------------- the benchmark


def run(out: Path, quick: bool, smoke: bool = False) -> BenchResult:
    """The benchmark; ``smoke`` (the test suite's) is quick mode: it computes, it starts no process."""
    quick = quick or smoke
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = QUICK_TARGETS if quick else TARGETS
    reps = 2 if quick else 5

    # Record level: plan as a run plans, then ε of the planned 20-round history.
    sizes, plans = department_plans(targets)
    records = record_level(plans)
    dept_tight = tightness(records, DEPARTMENT_DEFAULT, DEPARTMENT_ORDER[1:])
    # The loosest PRV row again with a 10× finer eps_error: is the gap to PLD PRV's error term?
    worst = max(records, key=lambda r: r["eps"]["prv"] / min(r["eps"]["rdp"], r["eps"]["pld"]))
    started = time.perf_counter()
    fine = prv_epsilon([worst["mechanism"]] * ROUNDS, DELTA, FINE_EPS_ERROR)
    fine_prv = {
        "target": worst["target"], "department": worst["department"], "eps_error": FINE_EPS_ERROR,
        "prv": fine, "prv_default": worst["eps"]["prv"], "pld": worst["eps"]["pld"],
        "seconds": time.perf_counter() - started,
    }

    # Client level.
    central = client_level(
        (1.0,) if quick else CENTRAL_SIGMAS, (1.0, 0.1) if quick else CENTRAL_QS, (20,) if quick else CENTRAL_ROUNDS
    )
    central_tight = tightness(central, CENTRAL_DEFAULT, ("prv", "rdp", "rdp_dpacc"))

    # Cost: the median-size department's mechanism at the curve target.
    from fedsilo.shared.data import federation_data

    at_target = sorted((p for p in plans if p["target"] == CURVE_TARGET), key=lambda p: p["examples"])
    median_plan = at_target[len(at_target) // 2]
    mechanism = median_plan["mechanism"]
    rounds_list = (1, 20, 100)
    timing = time_accountants(mechanism, rounds_list, 1 if quick else reps, None if quick else ROUNDS)
    parts, _ = federation_data(DATASET, "label", (), DEPARTMENTS, PARTITION, SEED)
    train_s = round_training_seconds(parts[median_plan["department"]], mechanism, reps)
    plan_s = [p["plan_seconds"] for p in plans]
    reference = dp_cost_reference(out)

    # ε vs rounds for that mechanism.
    curve_rounds = [1, 5, 10, 20] if quick else [*range(1, ROUNDS + 1), 30, 40, 60, 80, 100]
    curve: dict[str, list[tuple[int, float | None]]] = {"prv": [], "rdp": [], "pld": []}
    for rounds in curve_rounds:
        eps = all_epsilons([mechanism] * rounds, DELTA, ("prv", "rdp", "pld"))
        for name in curve:
            curve[name].append((rounds, eps[name]))
    per_call = timing[DEPARTMENT_DEFAULT][str(ROUNDS)]
    fraction = per_call / (per_call + train_s)
    raw = {
        "settings": {
            "dataset": DATASET, "departments": DEPARTMENTS, "partition": PARTITION, "seed": SEED,
            "delta": DELTA, "rounds": ROUNDS, "targets": list(targets), "central_delta": CENTRAL_DELTA,
            "tolerance": TOLERANCE, "small_fraction": SMALL_FRACTION, "reps": reps, "curve_target": CURVE_TARGET,
        },
        "department_sizes": sizes,
        "record_level": [
            {"target": r["target"], "department": r["department"], "examples": r["examples"],
             "noise_multiplier": r["mechanism"].noise_multiplier, "sample_rate": r["mechanism"].sample_rate,
             "steps_per_round": r["mechanism"].steps, "plan_seconds": r["plan_seconds"], "epsilon": r["eps"]}
            for r in records
        ],
        "record_level_tightness": dept_tight,
        "prv_fine_eps_error": fine_prv,
        "client_level": central,
        "client_level_tightness": central_tight,
        "timing_mechanism": {"department": median_plan["department"], "examples": median_plan["examples"],
                             "noise_multiplier": mechanism.noise_multiplier,
                             "sample_rate": mechanism.sample_rate, "steps_per_round": mechanism.steps},
        "seconds_per_call": timing,
        "round_training_seconds": train_s,
        "epsilon_fraction_of_round": fraction,
        "plan_seconds_max": max(plan_s),
        "dp_cost_reference": reference,
        "curve": {name: [[r, e] for r, e in pts] for name, pts in curve.items()},
    }
    summary.plot_curve(raw, out / PLOT)
    return BenchResult(name=NAME, quick=quick, plots=[PLOT], raw=raw, **summary.summarize(raw, quick, _dp_cost_labels()))


def _dp_cost_labels() -> dict[str, str]:
    from .dp_cost import labels

    return labels()


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``accounting.json`` (title, text, tables, targets; the plot unless not ``draw_plots``) from its raw data."""
    def rebuild(saved: dict[str, Any]) -> BenchResult:
        raw = saved["raw"]
        # Results saved before the setting was recorded ran at today's value.
        raw["settings"] = {"curve_target": CURVE_TARGET, **raw["settings"]}
        if draw_plots:
            summary.plot_curve(raw, Path(path).parent / PLOT)
        return BenchResult(name=NAME, quick=saved["quick"], plots=saved["plots"], raw=raw,
                           **summary.summarize(raw, saved["quick"], _dp_cost_labels()))

    return rerendered(path, rebuild)
