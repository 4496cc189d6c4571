"""Robust aggregation: held-out accuracy when one of five departments attacks.

Five departments hold IID parts of one embedded dataset and train with real
DP-SGD (:func:`~fedsilo.client.trainer.train_dp`, the mechanism planned from the
size a department reports, as its budget guard plans it).  Every round the
coordinator's strategy — :func:`fedsilo.server.robust.department_strategy`,
what the ServerApp builds from ``--aggregation`` / ``--max-update-norm`` — sends
the train messages, each department answers with a reply shaped as the
ClientApp's (``arrays``, ``metrics`` with ``num-examples`` and ε, ``department``
status), and the strategy aggregates.  One department (the first) is the
attacker: it trains honestly, then sends

* ``none`` — its honest update;
* ``scaled`` — ``w_global − 10·Δ`` (its delta Δ, flipped and scaled ×10);
* ``sign-flip`` — ``w_global − Δ``.

Rules: ``fedavg``, ``trimmed-mean`` (β 0.2), ``median``, ``krum`` (f = 1), and
``fedavg+bound`` (FedAvg with ``max-update-norm``).  The loop runs in-process
(no Flower runtime, no ledgers): what is measured is the aggregation rule on
DP-trained updates, not the transport.  DP noise is drawn from OS entropy
(unseeded, as in fedsilo); the data split and the model's initialization are
seeded.  Each cell is repeated; the table shows the mean and the range.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsilo.client.policy import size_bucket
from fedsilo.client.trainer import plan_mechanism, train_dp
from fedsilo.server.robust import department_strategy
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS, RunSettings
from fedsilo.shared.data import Dataset, simulated_federation
from fedsilo.shared.metrics import score
from fedsilo.shared.models import build_model
from fedsilo.shared.protocol import ARRAYS_KEY, METRICS_KEY, STATUS_KEY, STATUS_TRAINED

from .common import BenchResult, Table, Target, machine

NAME = "robustness"
PLOT = "robustness.png"
RULES = ("fedavg", "trimmed-mean", "median", "krum", "fedavg+bound")
ROBUST = ("trimmed-mean", "median", "krum")
ATTACKS = ("none", "scaled", "sign-flip")
DELTA = 1e-5
ACCOUNTANT = "pld"
MARGIN_POINTS = 20.0  # the target: every robust rule this far above FedAvg under the scaled attack
COST_POINTS = 3.0  # ... and at most this far below it when nobody attacks


@dataclass(frozen=True)
class Setup:
    """One run of the benchmark."""

    rounds: int
    repeats: int
    attacks: tuple[str, ...] = ATTACKS
    rules: tuple[str, ...] = RULES
    dataset: str = "digits"
    departments: int = 5
    partition: str = "iid"
    seed: int = 42  # data split and model initialization (DP noise is unseeded)
    model: str = "mlp"
    scale: float = 10.0  # the scaled attack sends w_global − scale·Δ
    # σ 1.5: whole-history ε ≈ 8.6 at δ 1e-5 after the full run's 20 rounds (q 0.25, 4 steps a round).
    noise_multiplier: float = 1.5
    max_grad_norm: float = float(RUN_CONFIG_DEFAULTS["max-grad-norm"])
    batch_size: int = int(RUN_CONFIG_DEFAULTS["batch-size"])
    local_epochs: int = int(RUN_CONFIG_DEFAULTS["local-epochs"])
    learning_rate: float = float(RUN_CONFIG_DEFAULTS["learning-rate"])
    momentum: float = float(RUN_CONFIG_DEFAULTS["momentum"])
    trim_fraction: float = 0.2
    byzantine: int = 1
    # B of fedavg+bound: set a little above the honest updates' norm (≈ 3.3 at σ 1.5, noise-dominated;
    # measured, the details table shows it), so that honest updates pass and an inflated one is cut.
    max_update_norm: float = 4.0


FULL = Setup(rounds=20, repeats=5)
QUICK = Setup(rounds=3, repeats=1, attacks=("none", "scaled"))
SMOKE = Setup(rounds=2, repeats=1, attacks=("none", "scaled"))  # the test suite's


def _log(text: str) -> None:
    print(f"  [robustness] {text}", flush=True)


# --------------------------------------------------------------------------- the federation loop


class _Grid:
    """The node ids a strategy's ``configure_train`` samples from."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def server_identity():
    """Flower stamps messages with the running task's identity; outside a ServerApp there is none: lend one."""
    from fedsilo.shared.flower_internals import lend_task_identity

    return lend_task_identity()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """One torch thread (as a simulated department runs), Flower's per-round INFO lines and warnings off."""
    flwr_logger = logging.getLogger("flwr")
    level, threads = flwr_logger.level, torch.get_num_threads()
    flwr_logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        flwr_logger.setLevel(level)
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: Mechanism, rounds: int) -> float:
    """Whole-history ε after ``rounds`` identical rounds (what the department's ledger would say)."""
    return accounting.epsilon([mechanism] * rounds, DELTA, ACCOUNTANT)


def settings_for(rule: str, setup: Setup) -> RunSettings:
    """The run config a coordinator would be started with for ``rule``."""
    config: dict[str, Any] = {
        "aggregation": "fedavg" if rule == "fedavg+bound" else rule,
        "trim-fraction": setup.trim_fraction,
        "byzantine": setup.byzantine,
        "max-update-norm": setup.max_update_norm if rule == "fedavg+bound" else 0.0,
        "min-departments": setup.departments,
    }
    return RunSettings.from_run_config(config)


def department_reply(request: Message, name: str, state: dict[str, torch.Tensor], mechanism: Mechanism,
                     reported_size: int, epsilon: float, steps: int) -> Message:
    """A train reply as fedsilo's ClientApp and budget guard send it (without the signed ledger head)."""
    metrics = MetricRecord(
        {
            "num-examples": int(reported_size),
            "epsilon": float(epsilon),
            "max-epsilon": float("inf"),
            "delta": DELTA,
            "steps": int(steps),
            "noise-multiplier": mechanism.noise_multiplier,
            "sample-rate": mechanism.sample_rate,
        }
    )
    status = ConfigRecord({"name": name, "status": STATUS_TRAINED, "reason": ""})
    return Message(RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: metrics, STATUS_KEY: status}),
                   reply_to=request)


def attacked(global_state: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], attack: str,
             scale: float) -> dict[str, torch.Tensor]:
    """The attacker's update from its honestly trained weights."""
    if attack == "none":
        return trained
    factor = {"scaled": -scale, "sign-flip": -1.0}[attack]
    return {k: (global_state[k] + factor * (trained[k] - global_state[k])).contiguous() for k in trained}


def _norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum((state[k].double() - reference[k].double()) ** 2)) for k in state))


def run_cell(rule: str, attack: str, setup: Setup, parts: tuple[Dataset, ...] | None = None,
             test: Dataset | None = None) -> dict[str, Any]:
    """One federation: ``setup.rounds`` rounds under ``rule`` with department 0 mounting ``attack``.

    Returns the held-out accuracy after every round, the honest and attacker update
    norms, which departments were clipped and (Krum) whose update was selected.
    """
    if parts is None or test is None:
        federation = simulated_federation(setup.dataset, num_departments=setup.departments, scheme=setup.partition,
                                          seed=setup.seed)
        parts, test = federation.parts, federation.test
    names = [p.name for p in parts]
    attacker = names[0]
    template = build_model(setup.model, test.input_shape, test.num_classes, test.kind, seed=setup.seed)
    model = copy.deepcopy(template)
    with _quiet():
        strategy = department_strategy(settings_for(rule, setup), fraction_train=1.0,
                                       min_train_nodes=setup.departments, min_available_nodes=setup.departments)
    node_ids = list(range(1, setup.departments + 1))
    strategy.node_names = dict(zip(node_ids, names))
    by_node = dict(zip(node_ids, parts))
    plans = {p.name: plan_mechanism(size_bucket(len(p)), setup.batch_size, setup.local_epochs,
                                    setup.noise_multiplier) for p in parts}
    arrays = ArrayRecord(model.state_dict())
    record: dict[str, Any] = {"accuracy": [], "loss": [], "honest_norm": [], "attacker_norm": [], "clipped": [],
                              "krum_selected": [], "seconds": 0.0}
    started = time.perf_counter()
    with _quiet(), server_identity():
        for rnd in range(1, setup.rounds + 1):
            requests = list(strategy.configure_train(rnd, arrays, ConfigRecord(), _Grid(node_ids)))
            global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            replies, sent = [], {}
            honest = []
            for request in requests:
                part = by_node[request.metadata.dst_node_id]
                local = copy.deepcopy(template)
                local.load_state_dict(request.content[ARRAYS_KEY].to_torch_state_dict())
                mechanism = plans[part.name]
                result = train_dp(local, part, mechanism, max_grad_norm=setup.max_grad_norm,
                                  learning_rate=setup.learning_rate, momentum=setup.momentum,
                                  grad_sample_mode="auto", device=torch.device("cpu"))
                state = {k: v.detach().cpu() for k, v in local.state_dict().items()}
                if part.name == attacker:
                    state = attacked(global_state, state, attack, setup.scale)
                    record["attacker_norm"].append(_norm(state, global_state))
                else:
                    honest.append(_norm(state, global_state))
                sent[part.name] = state
                replies.append(department_reply(request, part.name, state, mechanism, size_bucket(len(part)),
                                                _epsilon(mechanism, rnd), result.steps))
            record["honest_norm"].append(statistics.median(honest))
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            report = strategy.last_report
            record["clipped"].append(sorted(report.clipped))
            if rule == "krum":
                chosen = new_arrays.to_torch_state_dict()
                record["krum_selected"].append(next(
                    (n for n, s in sent.items() if all(torch.equal(chosen[k], s[k]) for k in s)), "?"))
            arrays = new_arrays
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = score(model, test)
            record["accuracy"].append(float(metrics["accuracy"]))
            loss = float(metrics["loss"])
            record["loss"].append(loss if math.isfinite(loss) else None)  # a diverged model's loss is not JSON
    record["seconds"] = round(time.perf_counter() - started, 2)
    record["attacker"] = attacker
    record["epsilon"] = max(_epsilon(plans[n], setup.rounds) for n in names)
    record["mechanisms"] = {n: asdict(m) for n, m in plans.items()}
    return record


# --------------------------------------------------------------------------- the benchmark


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _summary(cells: list[dict[str, Any]]) -> dict[str, float]:
    finals = [c["accuracy"][-1] for c in cells]
    return {"mean": statistics.fmean(finals), "min": min(finals), "max": max(finals)}


def _attacker(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    return next(runs[0]["attacker"] for by_attack in cells.values() for runs in by_attack.values() if runs)


def _cell_text(cells: list[dict[str, Any]]) -> str:
    s = _summary(cells)
    return _pct(s["mean"]) if len(cells) == 1 else f"{_pct(s['mean'])} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"


def bench(setup: Setup) -> dict[str, Any]:
    """Every (rule, attack) cell, ``setup.repeats`` times; the rules interleaved so machine load hits all alike."""
    federation = simulated_federation(setup.dataset, num_departments=setup.departments, scheme=setup.partition,
                                      seed=setup.seed)
    measured_on = machine()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {r: {a: [] for a in setup.attacks} for r in setup.rules}
    for repeat in range(setup.repeats):
        for attack in setup.attacks:
            for rule in setup.rules:
                cell = run_cell(rule, attack, setup, federation.parts, federation.test)
                results[rule][attack].append(cell)
                _log(f"repeat {repeat + 1}/{setup.repeats} {attack:9s} {rule:12s} final accuracy "
                     f"{_pct(cell['accuracy'][-1])} ({cell['seconds']:.1f} s)")
    return {
        "department_sizes": [len(p) for p in federation.parts],
        "num_test": len(federation.test),
        "num_classes": federation.test.num_classes,
        "machine": measured_on,
        "cells": results,
    }


def _tables(data: dict[str, Any], setup: Setup) -> list[Table]:
    cells = data["cells"]
    accuracy = Table(
        f"Final held-out accuracy after {setup.rounds} rounds: mean over {setup.repeats} run(s)"
        + (" (min–max)" if setup.repeats > 1 else "")
        + f"; {setup.departments} departments, one of them ({_attacker(cells)}) attacking",
        ["rule", *setup.attacks],
        [[rule, *(_cell_text(cells[rule][a]) for a in setup.attacks)] for rule in setup.rules],
    )
    rows = []
    for attack in setup.attacks:
        for rule in setup.rules:
            runs = cells[rule][attack]
            honest = [n for c in runs for n in c["honest_norm"]]
            attacker = [n for c in runs for n in c["attacker_norm"]]
            clipped = sum(len(r) for c in runs for r in c["clipped"])
            picked = [s for c in runs for s in c["krum_selected"]]
            rows.append([
                attack, rule,
                f"{statistics.median(honest):.2f}", f"{statistics.median(attacker):.2f}",
                f"{clipped} of {len(runs) * setup.rounds * setup.departments}" if rule == "fedavg+bound" else "—",
                (f"{sum(1 for s in picked if s == _attacker(cells))} of {len(picked)}" if rule == "krum" else "—"),
                f"{statistics.fmean(c['seconds'] for c in runs):.1f}",
            ])
    details = Table(
        "Update norms (median ‖w − w_global‖₂ over rounds and runs), the norm bound's clips, Krum's picks, time",
        ["attack", "rule", "honest norm", "attacker norm", f"updates clipped to B = {setup.max_update_norm:g}",
         f"Krum picked {_attacker(cells)} (the attacker; honest under 'none')", "s per run"],
        rows,
    )
    return [accuracy, details]


def _targets(data: dict[str, Any], setup: Setup) -> list[Target]:
    cells = data["cells"]
    targets = []
    if "scaled" in setup.attacks and "fedavg" in setup.rules:
        fedavg = _summary(cells["fedavg"]["scaled"])
        for rule in [r for r in ROBUST if r in setup.rules]:
            robust = _summary(cells[rule]["scaled"])
            gap = 100 * (robust["mean"] - fedavg["mean"])
            worst = 100 * (robust["min"] - fedavg["max"])
            met = worst >= MARGIN_POINTS
            targets.append(Target(
                f"{rule} ≥ {MARGIN_POINTS:g} points above FedAvg under the scaled attack (1 of {setup.departments})",
                f"{_pct(robust['mean'])} vs {_pct(fedavg['mean'])}: {gap:+.1f} points (worst run vs best: {worst:+.1f})",
                met,
                f"{setup.repeats} run(s) each, DP noise unseeded; judged on the worst {rule} run against the best "
                "FedAvg run." + ("" if met else " Missed: more rounds, or a rule whose guarantee covers more "
                                 "departments, would be needed."),
            ))
    if "none" in setup.attacks and "fedavg" in setup.rules:
        base = _summary(cells["fedavg"]["none"])
        for rule in [r for r in setup.rules if r != "fedavg"]:
            own = _summary(cells[rule]["none"])
            cost = 100 * (base["mean"] - own["mean"])
            met = cost <= COST_POINTS
            note = f"mean of {setup.repeats} run(s) each, DP noise unseeded: the price of the rule when nobody attacks."
            if rule == "krum":
                note += (" Krum keeps one department's update a round, so it averages neither the data nor the "
                         "DP noise of the others: it learns slower in the first rounds.")
            if rule in ("trimmed-mean", "median"):
                note += " Coordinate-wise rules discard honest values too (the extremes of DP-noisy updates)."
            if not met:
                note += " Missed: more rounds (the rules converge to the same level later) or more departments."
            targets.append(Target(
                f"{rule} within {COST_POINTS:g} points of FedAvg without an attack",
                f"{_pct(own['mean'])} vs {_pct(base['mean'])}: {cost:.1f} points lower",
                met,
                note,
            ))
    return targets


def plot(data: dict[str, Any], setup: Setup, path: Path) -> None:
    """Held-out accuracy per round, one panel per attack, one line per rule (mean over runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = data["cells"]
    fig, axes = plt.subplots(1, len(setup.attacks), figsize=(5.2 * len(setup.attacks), 4.4), squeeze=False,
                             sharey=True)
    colors = dict(zip(RULES, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    rounds = list(range(1, setup.rounds + 1))
    for ax, attack in zip(axes[0], setup.attacks):
        for rule in setup.rules:
            runs = cells[rule][attack]
            mean = [100 * statistics.fmean(c["accuracy"][i] for c in runs) for i in range(setup.rounds)]
            ax.plot(rounds, mean, marker="o", markersize=3, color=colors.get(rule), label=rule)
        ax.set_title(f"attack: {attack}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _text(data: dict[str, Any], setup: Setup, quick: bool) -> str:
    cells = data["cells"]
    eps = max(c["epsilon"] for r in cells.values() for runs in r.values() for c in runs)
    mech = next(runs[0] for by_attack in cells.values() for runs in by_attack.values() if runs)["mechanisms"]
    mech = next(iter(mech.values()))
    sizes = data["department_sizes"]
    m = data.get("machine") or {}
    return (
        f"{setup.departments} departments with IID parts of `{setup.dataset}` ({min(sizes)}–{max(sizes)} training "
        f"examples each, {data['num_test']} held-out), model `{setup.model}` (seed {setup.seed}), real DP-SGD at "
        f"σ {setup.noise_multiplier:g}, C {setup.max_grad_norm:g}, batch {setup.batch_size}, lr "
        f"{setup.learning_rate:g}, momentum {setup.momentum:g}, {setup.local_epochs} local epoch "
        f"(q {mech['sample_rate']:.2f}, {mech['steps']} steps a round, planned from the reported size bucket): "
        f"whole-history ε {eps:.2f} at δ {DELTA:g} ({ACCOUNTANT.upper()}) per department after {setup.rounds} rounds. "
        f"One department ({_attacker(cells)}) attacks: it trains "
        "honestly, then `scaled` sends w_global − "
        f"{setup.scale:g}·Δ (its honest delta flipped and scaled), `sign-flip` w_global − Δ. Rules are built by "
        "`fedsilo.server.robust.department_strategy` from the run config a coordinator would get "
        f"(`--aggregation`, `--trim-fraction {setup.trim_fraction:g}`, `--byzantine {setup.byzantine}`, "
        f"`--min-departments {setup.departments}`; `fedavg+bound` is FedAvg with `--max-update-norm "
        f"{setup.max_update_norm:g}`) and fed reply Messages shaped as the ClientApp's, in-process (no Flower "
        "runtime or ledgers: what is measured is the aggregation rule on DP-trained updates). "
        f"{setup.repeats} run(s) per cell; data split and initialization seeded ({setup.seed}), DP noise and "
        "Poisson sampling unseeded (OS entropy, as in fedsilo), so runs differ. "
        "The trimmed mean and the median drop the attacker at one end of each coordinate and honest values at "
        "the other, so an attack that always sits at one end still biases them a little; Krum keeps one whole "
        "update a round (no averaging of the DP noise); `fedavg+bound` limits how far the attacker moves each "
        "round, not its direction. "
        f"Measured on {m.get('cpu') or '?'} ({m.get('cores')} cores, GPU: {m.get('gpu') or 'none'}; torch "
        f"{m.get('torch')}), one torch thread; reproduce with `fedsilo bench run robustness"
        f"{' --quick' if quick else ''} --out DIR`."
    )


def run(out: Path, quick: bool, setup: Setup | None = None, smoke: bool = False) -> BenchResult:
    """The benchmark; ``setup`` overrides the quick/full sizes (tests); ``smoke``: :data:`SMOKE`, in quick mode."""
    quick = quick or smoke
    setup = setup or (SMOKE if smoke else QUICK if quick else FULL)
    data = bench(setup)
    return build_result(data, setup, quick, Path(out))


def build_result(data: dict[str, Any], setup: Setup, quick: bool, out: Path) -> BenchResult:
    out.mkdir(parents=True, exist_ok=True)
    plot(data, setup, out / PLOT)
    return BenchResult(
        name=NAME,
        title="Robust aggregation: accuracy with one attacking department",
        quick=quick,
        text=_text(data, setup, quick),
        tables=_tables(data, setup),
        plots=[PLOT],
        targets=_targets(data, setup),
        raw={"setup": asdict(setup), "delta": DELTA, "accountant": ACCOUNTANT, **data},
    )


def rerender(path: Path) -> BenchResult:
    """Rebuild a saved ``robustness.json`` (text, tables, targets, plot) without re-running anything."""
    saved = json.loads(Path(path).read_text())
    raw = dict(saved["raw"])
    setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("setup").items()})
    data = {k: raw[k] for k in ("department_sizes", "num_test", "num_classes", "cells")}
    data["machine"] = raw.get("machine") or saved.get("machine")
    result = build_result(data, setup, saved["quick"], Path(path).parent)
    result.seconds, result.load_before = saved.get("seconds", 0.0), saved.get("load_before")
    return result


__all__ = ["FULL", "QUICK", "Setup", "attacked", "department_reply", "run", "run_cell"]
