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
from fedsilo.shared.accounting import ACCOUNTANTS, Mechanism

from .common import BenchResult, Table, Target

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
DEPARTMENT_DEFAULT = ACCOUNTANTS[0]  # a department policy's default accountant
# The department default first, then the others it is compared with.
DEPARTMENT_ORDER = (DEPARTMENT_DEFAULT, *(a for a in ("pld", "prv", "rdp") if a != DEPARTMENT_DEFAULT))
CENTRAL_DEFAULT = "pld"  # server/central_dp.py
LABELS = {
    "prv": "PRV (Opacus)",
    "rdp": "RDP (Opacus)",
    "pld": "PLD (dp-accounting)",
    "rdp_dpacc": "RDP (dp-accounting)",
}


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


# --------------------------------------------------------------------------- plot


def plot_curve(curve: dict[str, list[tuple[int, float]]], mechanism: Mechanism, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, style in (("prv", "-o"), ("rdp", "--s"), ("pld", ":^")):
        points = [(r, e) for r, e in curve.get(name, []) if e is not None]
        if points:
            ax.plot(*zip(*points), style, markersize=3.5, label=LABELS[name] + (" — department default" if name == DEPARTMENT_DEFAULT else ""))
    ax.axhline(target, color="grey", lw=0.8)
    ax.axvline(ROUNDS, color="grey", lw=0.8, ls="--")
    ax.annotate(f"planned: ε={target:g} after {ROUNDS} rounds", (ROUNDS, target), xytext=(4, -14),
                textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("rounds")
    ax.set_ylabel(f"whole-history ε at δ={DELTA:g}")
    ax.set_title(
        f"One digits department: σ={mechanism.noise_multiplier:.3g}, q={mechanism.sample_rate:.3g}, "
        f"{mechanism.steps} steps/round", fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the benchmark


def _e(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _r(lo: float, hi: float) -> str:
    return f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f}–{hi:.3f}"


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio_range(rows: list[dict[str, Any]], num: str, den: str) -> tuple[float, float] | None:
    vals = [r["eps"][num] / r["eps"][den] for r in rows if r["eps"].get(num) and r["eps"].get(den)]
    return (min(vals), max(vals)) if vals else None


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
    plot_curve(curve, mechanism, CURVE_TARGET, out / PLOT)

    # ---- tables
    target_rows = []
    for target in targets:
        rows = [r for r in records if r["target"] == target]
        sigmas = [r["mechanism"].noise_multiplier for r in rows]
        cells = [f"{target:g}", str(len(rows)), _r(min(sigmas), max(sigmas))]
        for name in DEPARTMENT_ORDER:
            vals = [r["eps"][name] for r in rows if r["eps"][name] is not None]
            cells.append(f"{_e(max(vals))} / {_e(statistics.median(vals))}" if vals else "–")
        for num in DEPARTMENT_ORDER[1:]:
            rr = _ratio_range(rows, num, DEPARTMENT_DEFAULT)
            cells.append(_r(*rr) if rr else "–")
        target_rows.append(cells)
    dept_rows = [
        [str(r["department"]), str(r["examples"]), f"{r['mechanism'].sample_rate:.3g}", str(r["mechanism"].steps),
         f"{r['mechanism'].noise_multiplier:.3f}", *(_e(r["eps"][name]) for name in DEPARTMENT_ORDER)]
        for r in records if r["target"] == CURVE_TARGET
    ]
    central_rows = []
    for r in central:
        eps = r["eps"]
        others = [eps[o] for o in ("prv", "rdp", "rdp_dpacc") if eps.get(o) is not None]
        central_rows.append([
            f"{r['sigma']:g}", f"{r['q']:g}", str(r["rounds"]), _e(eps["pld"]), _e(eps["prv"]), _e(eps["rdp"]),
            _e(eps["rdp_dpacc"]), f"{eps['pld'] / min(others):.4f}" if eps.get("pld") and others else "–",
        ])
    time_columns = ["accountant", *(f"R={r}" for r in rounds_list)]
    if not quick:
        time_columns.append(f"R={ROUNDS}, all rounds distinct")
    time_rows = [
        [LABELS[name] + (" — department default" if name == DEPARTMENT_DEFAULT else ""),
         *(_t(timing[name][str(r)]) for r in rounds_list),
         *([_t(timing[name][f"{ROUNDS}-distinct"])] if not quick else [])]
        for name in ("prv", "rdp", "pld")
    ]

    # ---- targets
    def over(t: dict[str, Any], name: str) -> str:
        lo, hi = t["default_over"].get(name, (float("nan"), float("nan")))
        return f"{_r(lo, hi)}"

    default = LABELS[DEPARTMENT_DEFAULT].split(" (")[0]
    dept_target = Target(
        f"fedsilo's default accountant is the tightest sound one computed (≤ the others within 1 %): departments, {default}",
        ", ".join(f"{default}/{LABELS[o].split(' (')[0]} {over(dept_tight, o)}" for o in DEPARTMENT_ORDER[1:])
        + f" over {dept_tight['rows']} department runs (targets ε={', '.join(f'{t:g}' for t in targets)}); worst "
        f"{default}/tightest other {dept_tight['worst_default_over_tightest_other']:.4f}; "
        f"{dept_tight['violations']} of {dept_tight['rows']} over 1 %",
        dept_tight["ok"],
        "dp-accounting's PLD (pessimistic discretization, an upper bound) and Opacus' PRV (certified upper bound, "
        "eps_error 0.01) agree to about 0.01 in ε; RDP is looser by the ratio shown. "
        f"The loosest PRV (target ε={fine_prv['target']:g}, department {fine_prv['department']}: "
        f"{fine_prv['prv_default']:.4f} vs PLD {fine_prv['pld']:.4f}) with eps_error {FINE_EPS_ERROR:g} gives "
        f"{fine_prv['prv']:.4f} ({_t(fine_prv['seconds'])} for that call): the gap is PRV's error term. "
        + ("" if dept_tight["ok"] else
           f"What would close it: a finer discretization for {default} (slower per call), or the tighter accountant "
           "as the default."),
    )
    central_target = Target(
        "fedsilo's default accountant is the tightest sound one computed (≤ the others within 1 %): client level, PLD",
        f"PLD/PRV {over(central_tight, 'prv')}, PLD/RDP (Opacus) {over(central_tight, 'rdp')}, PLD/RDP "
        f"(dp-accounting) {over(central_tight, 'rdp_dpacc')} over {central_tight['rows']} (σ, q, rounds) settings; "
        f"{central_tight['violations']} over 1 %",
        central_tight["ok"],
        "dp-accounting's PLD with pessimistic discretization (interval 1e-3) is a sound upper bound; Opacus' PRV "
        "upper bound is ~0.01 above it, RDP's conversion several % above.",
    )
    per_call = timing[DEPARTMENT_DEFAULT][str(ROUNDS)]
    fraction = per_call / (per_call + train_s)
    fastest = min(("prv", "rdp", "pld"), key=lambda n: timing[n][str(ROUNDS)])
    ref_text = ""
    if reference:
        from .dp_cost import CONFIGS

        ref_text = " For larger rounds (dp-cost's epochs in fedsilo's default mode): " + "; ".join(
            f"{CONFIGS[c].label if c in CONFIGS else c}, {v['examples']} examples: {_t(v['seconds'])} per epoch, "
            f"so one {default} call is "
            f"{100 * per_call / (per_call + v['seconds']):.0f} % of it"
            for c, v in reference.items()
        ) + "."
    time_target = Target(
        f"ε computation is a small fraction (≤ {SMALL_FRACTION:.0%}) of a department round: once per round, not per batch",
        f"{_t(per_call)} per {default} call ({ROUNDS}-round history) vs {_t(train_s)} of local training in a median digits "
        f"department round ({median_plan['examples']} examples, {mechanism.steps} steps): {fraction:.0%} of the round",
        fraction <= SMALL_FRACTION,
        f"fedsilo calls the accountant once per round per department (the ε before comes from the ledger), never per "
        f"batch — per batch would be {mechanism.steps}× this. A fresh department's first round also plans σ for "
        f"the target (calibration over ε): up to {max(plan_s):.1f} s, cached afterwards. "
        "Within one process the budget guard remembers ε per merged history, so simulated departments that share "
        "a sample rate and σ share one call (see the scale benchmark's accounting share); a deployed department "
        "computes its own, once per round. "
        + (
            f"Digits departments are tiny, so the fixed cost of an ε call dominates their bare training time. What "
            f"would close it: rounds of one run are identical mechanisms, so the guard could read ε after round r "
            f"from the plan's curve (computed once); or use {LABELS[fastest]}, "
            f"{timing[DEPARTMENT_DEFAULT][str(ROUNDS)] / timing[fastest][str(ROUNDS)]:.0f}× faster per call here."
            if fraction > SMALL_FRACTION and fastest != DEPARTMENT_DEFAULT else
            "Digits departments are tiny, so the fixed cost of an ε call dominates their bare training time; what "
            "would close it: reading ε after round r from the plan's curve of the identical planned rounds "
            "(computed once) instead of one call per round."
            if fraction > SMALL_FRACTION else ""
        )
        + ref_text,
    )

    text = (
        f"Record level: the department mechanisms of a typical run — {DATASET}, {DEPARTMENTS} departments, "
        f"{PARTITION}, seed {SEED} ({min(sizes)}–{max(sizes)} training examples each), batch 64, 1 local epoch, "
        f"{ROUNDS} rounds, δ={DELTA:g} — planned with fedsilo's `plan_round` for `--target-epsilon` "
        f"{', '.join(f'{t:g}' for t in targets)} (σ from the default accountant, "
        f"{LABELS[DEPARTMENT_DEFAULT]}, as `fedsilo simulate` does), then the ε of each "
        f"department's whole {ROUNDS}-round history from dp-accounting's PLD (pessimistic, interval 1e-3), Opacus' "
        "PRV (certified upper bound) and Opacus' RDP, all through `fedsilo.shared.accounting`. Client level: "
        f"Poisson-sampled Gaussian (1 release per round) at δ={CENTRAL_DELTA:g} for each (σ, q, rounds), with PLD, "
        "Opacus' PRV and RDP, and dp-accounting's RdpAccountant (which drops, with a log line, fractional orders "
        "whose series does not converge; still a sound bound). Cost: median wall seconds per ε call "
        f"({1 if quick else reps} call(s) after a warm-up) for the median-size department's mechanism at ε={CURVE_TARGET:g} "
        f"(σ={mechanism.noise_multiplier:.3f}, q={mechanism.sample_rate:.3g}, {mechanism.steps} steps a round) "
        f"over R identical rounds (merged into one term, as fedsilo's ledger history is)"
        + ("" if quick else f" and over {ROUNDS} rounds that all differ slightly (no merging: the worst case)")
        + f"; compared with that department's local DP-SGD round (`train_dp`, default mode, one thread, median of {reps} after a warm-up)."
        + (" Quick mode: one ε target, 2 client-level settings, fewer repetitions and curve points." if quick else "")
    )
    return BenchResult(
        name=NAME,
        title="Accounting tightness: ε from PRV vs RDP vs PLD, and the cost of computing it",
        quick=quick,
        text=text,
        tables=[
            Table(
                f"Record level: ε after {ROUNDS} rounds per department (max / median over {DEPARTMENTS} departments)",
                ["target ε", "departments", "σ",
                 *(name.upper() + (" (default)" if name == DEPARTMENT_DEFAULT else "") for name in DEPARTMENT_ORDER),
                 *(f"{o.upper()}/{DEPARTMENT_DEFAULT.upper()}" for o in DEPARTMENT_ORDER[1:])],
                target_rows,
            ),
            Table(f"Record level, per department, target ε={CURVE_TARGET:g}",
                  ["department", "examples", "q", "steps/round", "σ", *(n.upper() for n in DEPARTMENT_ORDER)], dept_rows),
            Table(
                f"Client level: ε at δ={CENTRAL_DELTA:g}",
                ["σ", "q", "rounds", "PLD (default)", "PRV (Opacus)", "RDP (Opacus)", "RDP (dp-accounting)",
                 "PLD / tightest other"],
                central_rows,
            ),
            Table(
                f"Seconds per ε call, department history of R rounds (median of {1 if quick else reps}); "
                f"local training of that department's round: {_t(train_s)}",
                time_columns, time_rows,
            ),
        ],
        plots=[PLOT],
        targets=[dept_target, central_target, time_target],
        raw={
            "settings": {
                "dataset": DATASET, "departments": DEPARTMENTS, "partition": PARTITION, "seed": SEED,
                "delta": DELTA, "rounds": ROUNDS, "targets": list(targets), "central_delta": CENTRAL_DELTA,
                "tolerance": TOLERANCE, "small_fraction": SMALL_FRACTION, "reps": reps,
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
        },
    )
