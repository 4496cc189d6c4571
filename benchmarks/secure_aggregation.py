"""Secure aggregation and distributed DP: accuracy against pooled DP-SGD, and what a round costs.

Utility, on the same non-IID departments of one dataset, at whole-history ε = 1, 3, 8:

* **distributed DP** — the real ``fedsilo simulate --distributed-dp`` CLI in a
  subprocess: each round is one DP-SGD step over the union of the departments'
  data at q = 1 / ⌈batches⌉ (``--sample-rate``, the same q the pooled run samples
  at), σ planned by the Skellam analysis for the whole run; accuracy from
  ``summary.json``, σ, μ and the session from the ledgers;
* **centralized DP-SGD at the same q, σ and steps** — the pooled training data,
  the same model, initialization, lr and momentum, fedsilo's own
  :func:`~fedsilo.client.trainer.train_dp` (Gaussian noise of the same σ), in-process:
  what is left of the gap is quantization and distribution;
* the same centralized run at the noise the secure sum really carries (all
  ``n`` departments add ``μ/(t − c)``, so the sum holds ``n/(t − c)`` times the
  μ the analysis needs), and at its own PLD-planned σ for the same ε (the honest
  cost of the Skellam analysis);
* **local DP** — fedsilo's default (every department DP-SGD on its own data,
  FedAvg, no secure aggregation): the utility benchmark's own cell
  (:func:`~fedsilo.benchmarks.utility.run_fedsilo`).

Cost, simulated, 10 departments on one dataset: per-round seconds (median from
round 2) and bytes per department per round of plain FedAvg (the local-DP cell),
``--secure-aggregation`` (the same command with it), and ``--distributed-dp`` (the
ε = 8 cell); the session set-up's seconds and bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedsilo.client.trainer import train_dp
from fedsilo.shared import accounting
from fedsilo.shared.accounting import Mechanism
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import federation_data
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.models import evaluate
from fedsilo.shared.runs import resolve_run_dir
from fedsilo.shared.summary_format import read_summary

from . import secure_aggregation_summary as summary
from . import utility
from .common import BenchResult, rerendered
from .utility_summary import _eps, _key, _pct

DELTA = utility.DELTA
ACCOUNTANT = utility.ACCOUNTANT  # the Gaussian baselines' accountant (PLD)
GAP_POINTS = 1.0  # issue 21's target: distributed DP within 1 point of centralized DP-SGD at the same ε = 8
PLOT = "secagg.png"
NAME = "secagg"


@dataclass(frozen=True)
class Setup:
    """One run of the benchmark.

    ``epochs[i]`` is the passes over the pooled data for ``datasets[i]``: the
    distributed-DP run has ``epochs × batches`` rounds (one step each), ``batches =
    round(pooled / batch_size)``, so that the pooled baseline (whole Poisson epochs
    of ``batches`` steps at q = 1/batches) takes exactly as many steps.
    """

    datasets: tuple[str, ...]
    epochs: tuple[int, ...]
    departments: int
    epsilons: tuple[float, ...]
    local_rounds: int  # rounds of the local-DP cell (the utility benchmark's)
    cost: bool = True  # run the plain and secure-aggregation cost cells
    local: bool = True  # run the local-DP cells
    batch_size: int = 128
    learning_rate: float = 2.0
    momentum: float = 0.5
    max_grad_norm: float = float(RUN_CONFIG_DEFAULTS["max-grad-norm"])
    partition: str = "dirichlet:0.5"
    seed: int = 42
    cost_dataset: str = "digits"
    timeout_s: float = 3600.0  # per fedsilo subprocess

    def utility_setup(self, dataset: str) -> utility.Setup:
        """The utility benchmark's sizes for this benchmark's local-DP cell of ``dataset``."""
        return utility.Setup(datasets=(dataset,), departments=self.departments, rounds=self.local_rounds,
                             epsilons=self.epsilons, partition=self.partition, seed=self.seed,
                             timeout_s=self.timeout_s)


FULL = Setup(datasets=("digits", "mnist5k"), epochs=(5, 4), departments=10, epsilons=(1.0, 3.0, 8.0),
             local_rounds=20)
QUICK = Setup(datasets=("digits",), epochs=(2,), departments=10, epsilons=(8.0,), local_rounds=5, timeout_s=900.0)
# The test suite's: one distributed-DP simulation (3 departments, 2 rounds: 2 batches of 1 epoch) and the
# in-process baselines; no local-DP or cost cells.
SMOKE = Setup(datasets=("digits",), epochs=(1,), departments=3, epsilons=(8.0,), local_rounds=2, cost=False,
              local=False, batch_size=720, timeout_s=600.0)


def _log(text: str) -> None:
    print(f"  [secagg] {text}", flush=True)


def batches(pooled_records: int, batch_size: int) -> int:
    """Poisson batches per epoch of the pooled run, hence q = 1 / batches for both."""
    return max(1, round(pooled_records / batch_size))


# --------------------------------------------------------------------------- fedsilo simulate


def ddp_command(dataset: str, setup: Setup, epsilon: float, rounds: int, sample_rate: float, run_dir: Path) -> list[str]:
    """The ``fedsilo simulate --distributed-dp`` command line of one cell."""
    return [
        sys.executable, "-m", "fedsilo", "simulate",
        "--departments", str(setup.departments),
        "--rounds", str(rounds),
        "--dataset", dataset,
        "--partition", setup.partition,
        "--seed", str(setup.seed),
        "--distributed-dp",
        "--target-epsilon", f"{epsilon:g}", "--max-epsilon", f"{epsilon:g}", "--delta", f"{DELTA:g}",
        "--batch-size", str(setup.batch_size),
        "--sample-rate", repr(sample_rate),
        "--learning-rate", f"{setup.learning_rate:g}",
        "--momentum", f"{setup.momentum:g}",
        "--max-grad-norm", f"{setup.max_grad_norm:g}",
        "--out", str(run_dir),
    ]


def simulate(cmd: list[str], run_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one ``fedsilo simulate`` into an empty ``run_dir`` (ledgers there would be resumed); its results."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.with_suffix(".log")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not (resolve_run_dir(run_dir) / "summary.json").exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited {done.returncode}; log {log_path}:\n{tail}")
    result = utility.read_fedsilo_run(run_dir)
    result.update(seconds=round(seconds, 1), command=cmd[1:], run_dir=str(run_dir))
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def round_costs(run_dir: Path | str, model_bytes: int) -> dict[str, Any]:
    """Per-round seconds and bytes per department of a finished run, medians over rounds ≥ 2.

    Upload: a plain round sends the model's arrays; a secure round sends its masked
    input (and the other answers of the protocol) instead — ``bytes_sent``. Download:
    every mode receives the global model's arrays; a secure round also receives the
    protocol's requests — ``bytes_received``.
    """
    s = read_summary(resolve_run_dir(Path(run_dir)))
    later = [r for r in s.rounds if r.round >= 2] or list(s.rounds)
    secure = [r.secagg for r in later if r.secagg is not None]
    up = [b for f in secure for b in f.bytes_sent.values()]
    down = [b for f in secure for b in f.bytes_received.values()]
    setup = s.secure_aggregation[0] if s.secure_aggregation else None
    return {
        "rounds": len(s.rounds),
        "round_seconds": [r.seconds for r in s.rounds],
        "median_round_seconds": _median([r.seconds for r in later]),
        "model_bytes": model_bytes,
        "upload_bytes": _median(up) if secure else model_bytes,
        "download_bytes": model_bytes + (_median(down) or 0) if secure else model_bytes,
        "protocol_download_bytes": _median(down) if secure else 0,
        "setup_bytes": setup.setup_bytes if setup else None,
        "setup_seconds": setup.setup_seconds if setup else None,
        "vector_length": setup.vector_length if setup else None,
        "modulus_bits": setup.modulus_bits if setup else None,
        "threshold": setup.threshold if setup else None,
        "wall_time_s": s.wall_time_s,
        "accuracy": s.final_accuracy,
    }


def ddp_ledger_facts(run_dir: Path | str) -> dict[str, Any]:
    """The distributed-DP mechanism as the ledgers recorded it (they agree; the first is read).

    ``sum_noise_multiplier``: the noise in the sum when every participant adds its
    share ``μ/(t − c)``, as a multiple of C in gradient units: ``√(n μ/(t − c)) / (γ C)``.
    """
    ledgers = read_ledgers(resolve_run_dir(Path(run_dir)) / "ledgers")
    entry = next(ledger.entries[-1] for _, ledger in sorted(ledgers.items()) if ledger.entries)
    honest = entry.threshold - entry.colluders
    return {
        "kind": entry.kind,
        "ledger_accountant": entry.accountant,
        "noise_multiplier": entry.noise_multiplier,
        "sample_rate": entry.sample_rate,
        "participants": entry.participants,
        "threshold": entry.threshold,
        "colluders": entry.colluders,
        "mu": entry.mu,
        "l2": entry.l2,
        "granularity": entry.granularity,
        "dimension": entry.dimension,
        "sum_noise_multiplier": math.sqrt(entry.participants * entry.mu / honest) / (entry.granularity * entry.max_grad_norm),
    }


# --------------------------------------------------------------------------- pooled DP-SGD


def run_pooled(train, test, sigma: float, sample_rate: float, steps: int, setup: Setup) -> dict[str, Any]:
    """DP-SGD on the pooled data at ``sigma``, ``sample_rate`` and ``steps``: Gaussian noise, fedsilo's trainer."""
    model = utility._fresh_model(test, setup.seed)
    mechanism = Mechanism(sigma, sample_rate, steps)
    started = time.perf_counter()
    result = train_dp(model, train, mechanism, max_grad_norm=setup.max_grad_norm, learning_rate=setup.learning_rate,
                      momentum=setup.momentum, grad_sample_mode=str(RUN_CONFIG_DEFAULTS["grad-sample-mode"]))
    loss, acc = evaluate(model, test)
    with utility._quiet():
        eps = accounting.epsilon([mechanism], DELTA, ACCOUNTANT)
    return {"accuracy": acc, "loss": loss, "noise_multiplier": sigma, "sample_rate": sample_rate,
            "steps": result.steps, "epsilon": eps, "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------- the benchmark


def bench_dataset(dataset: str, epochs: int, setup: Setup, out: Path) -> dict[str, Any]:
    """Every utility cell of one dataset: distributed DP, the pooled baselines and local DP at each ε."""
    parts, test = federation_data(dataset, "label", (), setup.departments, setup.partition, setup.seed)
    train = utility.pooled(parts)
    k = batches(len(train), setup.batch_size)
    q, steps = 1.0 / k, epochs * k
    model = utility._fresh_model(test, setup.seed)
    record: dict[str, Any] = {
        "department_sizes": [len(p) for p in parts], "num_train": len(train), "num_test": len(test),
        "num_classes": test.num_classes, "model": type(model).__name__,
        "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "sample_rate": q, "steps": steps, "epochs": epochs, "cells": {},
    }
    for eps in setup.epsilons:
        key = _key(eps)
        _log(f"{dataset} {key}: fedsilo simulate --distributed-dp ({setup.departments} departments × {steps} rounds) …")
        run_dir = out / NAME / f"{dataset}-{key}-ddp"
        ddp = simulate(ddp_command(dataset, setup, eps, steps, q, run_dir), run_dir, setup.timeout_s)
        ddp.pop("departments", None)  # ten identical ledgers: their facts once, below
        ddp.update(ddp_ledger_facts(run_dir), costs=round_costs(run_dir, record["model_bytes"]))
        _log(f"{dataset} {key}: distributed DP {_pct(ddp['accuracy'])}, ε {_eps(ddp['max_epsilon'])}, "
             f"σ {ddp['noise_multiplier']:.3f} (sum {ddp['sum_noise_multiplier']:.3f}), {ddp['seconds']:.0f} s")
        with utility._quiet():
            pld_sigma = accounting.noise_for_target(eps, DELTA, q, steps, ACCOUNTANT)
        cell = {
            "ddp": ddp,
            "same_sigma": run_pooled(train, test, ddp["noise_multiplier"], q, steps, setup),
            "sum_noise": run_pooled(train, test, ddp["sum_noise_multiplier"], q, steps, setup),
            "pld_sigma": run_pooled(train, test, pld_sigma, q, steps, setup),
            "local": None,
        }
        _log(f"{dataset} {key}: pooled at σ {_pct(cell['same_sigma']['accuracy'])}, at the sum's noise "
             f"{_pct(cell['sum_noise']['accuracy'])}, at PLD σ {pld_sigma:.3f} {_pct(cell['pld_sigma']['accuracy'])}")
        if setup.local:
            cell["local"] = utility.run_fedsilo(dataset, setup.utility_setup(dataset), eps, out / NAME / "local")
            cell["local"]["costs"] = round_costs(cell["local"]["run_dir"], record["model_bytes"])
            _log(f"{dataset} {key}: local DP {_pct(cell['local']['accuracy'])}, max ε "
                 f"{_eps(cell['local']['max_epsilon'])}, {cell['local']['seconds']:.0f} s")
        record["cells"][key] = cell
    return record


def bench_cost(setup: Setup, results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Plain FedAvg (the local-DP cell), the same with ``--secure-aggregation``, and distributed DP, at the largest ε."""
    rec = results[setup.cost_dataset]
    top = _key(max(setup.epsilons))
    cost: dict[str, Any] = {"dataset": setup.cost_dataset, "epsilon": max(setup.epsilons),
                            "ddp": rec["cells"][top]["ddp"]["costs"], "plain": None, "secagg": None}
    if setup.cost and rec["cells"][top]["local"] is not None:
        cost["plain"] = rec["cells"][top]["local"]["costs"]
        usetup = setup.utility_setup(setup.cost_dataset)
        run_dir = out / NAME / f"{setup.cost_dataset}-{top}-secagg"
        cmd = [*utility.fedsilo_command(setup.cost_dataset, usetup, max(setup.epsilons), run_dir), "--secure-aggregation"]
        _log(f"{setup.cost_dataset} {top}: fedsilo simulate --secure-aggregation ({usetup.rounds} rounds) …")
        secagg = simulate(cmd, run_dir, setup.timeout_s)
        cost["secagg"] = {**round_costs(run_dir, rec["model_bytes"]), "seconds": secagg["seconds"],
                          "max_epsilon": secagg["max_epsilon"]}
        _log(f"secure aggregation: {cost['secagg']['median_round_seconds']:.2f} s/round vs plain "
             f"{cost['plain']['median_round_seconds']:.2f}, accuracy {_pct(secagg['accuracy'])}")
    return cost


def run(out: Path, quick: bool, setup: Setup | None = None, smoke: bool = False) -> BenchResult:
    """The benchmark; ``setup`` overrides the quick/full sizes (tests); ``smoke``: :data:`SMOKE`, in quick mode."""
    quick = quick or smoke
    setup = setup or (SMOKE if smoke else QUICK if quick else FULL)
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every simulated department trains (see utility.run)
    try:
        results = {d: bench_dataset(d, e, setup, out) for d, e in zip(setup.datasets, setup.epochs)}
        cost = bench_cost(setup, results, out)
    finally:
        torch.set_num_threads(threads)
    return build_result(results, cost, setup, quick, out)


def build_result(results: dict[str, Any], cost: dict[str, Any], setup: Setup, quick: bool, out: Path,
                 draw_plots: bool = True) -> BenchResult:
    """Tables, targets, text and the plot from measured numbers (also re-renders a saved run)."""
    raw = {"setup": asdict(setup), "delta": DELTA, "accountant": ACCOUNTANT, "datasets": results, "cost": cost}
    if draw_plots:
        summary.plot(raw, Path(out) / PLOT)
    return BenchResult(name=NAME, quick=quick, plots=[PLOT], raw=raw, **summary.summarize(raw, GAP_POINTS))


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``secagg.json`` (title, text, tables, targets; the plot unless not ``draw_plots``)."""
    def rebuild(saved: dict[str, Any]) -> BenchResult:
        raw = saved["raw"]
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["setup"].items()})
        return build_result(raw["datasets"], raw["cost"], setup, saved["quick"], Path(path).parent, draw_plots)

    return rerendered(path, rebuild)
