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

from . import robustness_summary as summary
from .common import BenchResult, machine, rerendered
from .prose import prose
from .robustness_summary import _pct

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


def run(out: Path, quick: bool, setup: Setup | None = None, smoke: bool = False) -> BenchResult:
    """The benchmark; ``setup`` overrides the quick/full sizes (tests); ``smoke``: :data:`SMOKE`, in quick mode."""
    quick = quick or smoke
    setup = setup or (SMOKE if smoke else QUICK if quick else FULL)
    data = bench(setup)
    return build_result(data, setup, quick, Path(out))


def build_result(data: dict[str, Any], setup: Setup, quick: bool, out: Path, draw_plots: bool = True) -> BenchResult:
    """Tables, targets, text and (unless not ``draw_plots``) the plot from the measured cells."""
    out.mkdir(parents=True, exist_ok=True)
    if draw_plots:
        summary.plot(data, setup, out / PLOT)
    return BenchResult(
        name=NAME,
        title=prose(summary.TEMPLATE, "title"),
        quick=quick,
        text=summary.text(data, setup, quick, DELTA, ACCOUNTANT),
        tables=summary.tables(data, setup),
        plots=[PLOT],
        targets=summary.targets(data, setup, ROBUST, MARGIN_POINTS, COST_POINTS),
        raw={"setup": asdict(setup), "delta": DELTA, "accountant": ACCOUNTANT, **data},
    )


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``robustness.json`` (text, tables, targets; the plot unless not ``draw_plots``) without re-running anything."""
    def rebuild(saved: dict[str, Any]) -> BenchResult:
        raw = dict(saved["raw"])
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("setup").items()})
        data = {k: raw[k] for k in ("department_sizes", "num_test", "num_classes", "cells")}
        data["machine"] = raw.get("machine") or saved.get("machine")
        return build_result(data, setup, saved["quick"], Path(path).parent, draw_plots)

    return rerendered(path, rebuild)


__all__ = ["FULL", "QUICK", "Setup", "attacked", "department_reply", "run", "run_cell"]
