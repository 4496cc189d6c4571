"""Privacy–utility: final accuracy at whole-history ε = 1, 3, 8 and without DP.

Three ways to train on the same non-IID departments of one dataset:

* **fedsilo** — the real ``fedsilo simulate`` CLI in a subprocess (Flower's
  Simulation Engine, budget guard, ledgers); accuracy from ``summary.json``, ε
  from the departments' ledgers (whole history, fedsilo's default accountant at δ = 1e-5).
* **centralized DP-SGD** — the departments' training examples pooled in one
  place (the same examples, concatenated), the same model and initialization,
  fedsilo's own :func:`~fedsilo.client.trainer.train_dp` for ``rounds × local
  epochs`` epochs (as many passes over every example as the federation makes),
  σ from :func:`~fedsilo.shared.accounting.noise_for_target` for all those steps.
* **the recipe** of Flower's published Opacus example (``adap/flower``,
  ``examples/opacus``): every round each client builds a new ``PrivacyEngine()``
  and calls ``make_private`` with a fixed noise multiplier, trains one epoch with
  SGD(lr=0.001, momentum=0.9) at batch 32, and reports
  ``privacy_engine.get_epsilon(delta)`` — which covers that round only.  It runs
  here in-process with plain example-weighted FedAvg (no Flower): what is
  compared is its training recipe and its privacy accounting, not the transport.
  Its σ is chosen so that the *honest* ε — one accountant over every round's
  steps, max over departments — equals the target, so both systems are compared
  at equal real privacy.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fedsilo.client.trainer import plan_mechanism, train_dp, train_plain
from fedsilo.client.department import SIMULATED_DEFAULT_POLICY
from fedsilo.shared import accounting
from fedsilo.shared.accounting import ACCOUNTANTS, Mechanism
from fedsilo.shared.config import RUN_CONFIG_DEFAULTS
from fedsilo.shared.data import Dataset, federation_data
from fedsilo.shared.ledger import read_ledgers
from fedsilo.shared.runs import resolve_run_dir
from fedsilo.shared.models import build_model, evaluate, to_tensor_dataset
from fedsilo.shared.summary_format import read_summary

from . import utility_summary as summary
from .common import BenchResult, rerendered
from .utility_summary import _eps, _key, _pct

DELTA = SIMULATED_DEFAULT_POLICY.delta  # a simulated department's δ
ACCOUNTANT = ACCOUNTANTS[0]  # what a department runs with by default
GAP_POINTS = 3.0  # the target: fedsilo within 3 points of centralized DP-SGD at ε = 8
PLOT = "utility.png"


@dataclass(frozen=True)
class Setup:
    """One run of the benchmark: which datasets, how many departments, rounds and ε."""

    datasets: tuple[str, ...]
    departments: int
    rounds: int
    epsilons: tuple[float, ...]
    partition: str = "dirichlet:0.5"
    seed: int = 42
    local_epochs: int = int(RUN_CONFIG_DEFAULTS["local-epochs"])
    timeout_s: float = 3600.0  # per fedsilo subprocess

    @property
    def central_epochs(self) -> int:
        """Passes over the pooled data: as many as every example gets in the federation."""
        return self.rounds * self.local_epochs


FULL = Setup(datasets=("digits", "mnist5k"), departments=10, rounds=20, epsilons=(1.0, 3.0, 8.0))
QUICK = Setup(datasets=("digits",), departments=3, rounds=3, epsilons=(8.0,), timeout_s=600.0)
# The test suite's: every part runs (fedsilo, centralized, the recipe), at the smallest useful size.
SMOKE = Setup(datasets=("digits",), departments=2, rounds=2, epsilons=(8.0,), timeout_s=600.0)


@dataclass(frozen=True)
class Hyper:
    """The optimizer side of a training recipe."""

    learning_rate: float
    momentum: float
    batch_size: int
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "hooks"  # Opacus' default, as the example uses
    # Without DP, clip the batch gradient to max_grad_norm (fedsilo's --no-dp does;
    # the example's plain training does not).
    clip_plain: bool = False


# fedsilo's defaults (shared/config.py): what fedsilo and the centralized baseline run.
FEDSILO_HP = Hyper(
    learning_rate=float(RUN_CONFIG_DEFAULTS["learning-rate"]),
    momentum=float(RUN_CONFIG_DEFAULTS["momentum"]),
    batch_size=int(RUN_CONFIG_DEFAULTS["batch-size"]),
    max_grad_norm=float(RUN_CONFIG_DEFAULTS["max-grad-norm"]),
    grad_sample_mode=str(RUN_CONFIG_DEFAULTS["grad-sample-mode"]),
    clip_plain=True,
)
# Flower's Opacus example (examples/opacus: client_app.py, task.py, pyproject.toml):
# SGD(lr=0.001, momentum=0.9), DataLoader(batch_size=32, shuffle=True), one local
# epoch, max-grad-norm = 1.0, target-delta = 1e-5, PrivacyEngine(secure_mode=False)
# with Opacus' default accountant and make_private's defaults (Poisson sampling, hooks).
RECIPE_HP = Hyper(learning_rate=0.001, momentum=0.9, batch_size=32, max_grad_norm=1.0)
# The same recipe (fresh engine per round, one σ for all) with fedsilo's optimizer
# settings: separates what the optimizer settings cost from what the accounting costs.
RECIPE_FEDSILO_HP = Hyper(
    FEDSILO_HP.learning_rate, FEDSILO_HP.momentum, FEDSILO_HP.batch_size, FEDSILO_HP.max_grad_norm,
    clip_plain=True,
)


def _log(text: str) -> None:
    print(f"  [utility] {text}", flush=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the accountants' numerical chatter: PRV's log(1 - q) at q = 1, RDP's alpha range."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        yield


def pooled(parts: list[Dataset]) -> Dataset:
    """All departments' training examples in one dataset (the same examples, concatenated)."""
    first = parts[0]
    return Dataset(
        first.name,
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        first.input_shape,
        first.classes,
        first.kind,
    )


def _fresh_model(test: Dataset, seed: int) -> torch.nn.Module:
    """The model fedsilo's coordinator starts from: ``auto`` for the dataset, seeded."""
    return build_model(str(RUN_CONFIG_DEFAULTS["model"]), test.input_shape, test.num_classes, test.kind, seed=seed)


# --------------------------------------------------------------------------- fedsilo


def fedsilo_command(dataset: str, setup: Setup, epsilon: float | None, run_dir: Path) -> list[str]:
    """The ``fedsilo simulate`` command line of one benchmark cell."""
    cmd = [
        sys.executable, "-m", "fedsilo", "simulate",
        "--departments", str(setup.departments),
        "--rounds", str(setup.rounds),
        "--dataset", dataset,
        "--partition", setup.partition,
        "--seed", str(setup.seed),
        "--local-epochs", str(setup.local_epochs),
        "--out", str(run_dir),
    ]
    if epsilon is None:
        cmd.append("--no-dp")
    else:
        cmd += ["--target-epsilon", f"{epsilon:g}", "--max-epsilon", f"{epsilon:g}", "--delta", f"{DELTA:g}"]
    return cmd


def _rederive(history: list[Mechanism]) -> float:
    with _quiet():
        return accounting.epsilon(history, DELTA, ACCOUNTANT)


def read_fedsilo_run(run_dir: Path) -> dict[str, Any]:
    """Final accuracy from ``summary.json``; ε, σ and q of every department from its ledger.

    ``max_epsilon`` is the largest whole-history ε any ledger recorded;
    ``max_epsilon_rederived`` recomputes it from the recorded mechanisms with the
    same accountant, as a check on the ledger.
    """
    run_dir = resolve_run_dir(run_dir)  # the output folder's latest run
    summary = read_summary(run_dir)
    ledgers = read_ledgers(run_dir / "ledgers") if (run_dir / "ledgers").exists() else {}
    departments = {}
    for name, ledger in sorted(ledgers.items()):
        entries = ledger.entries
        if not entries:
            continue
        departments[name] = {
            "epsilon": entries[-1].epsilon,
            "epsilon_rederived": _rederive(ledger.history),
            "rounds": len(entries),
            "steps": sum(e.steps for e in entries),
            "noise_multiplier": entries[-1].noise_multiplier,
            "sample_rate": entries[-1].sample_rate,
            "num_examples": entries[-1].num_examples,
        }
    return {
        "status": summary.status,
        "accuracy": summary.final_accuracy,
        "loss": summary.final_loss,
        "initial_accuracy": summary.initial.get("accuracy"),
        "rounds_completed": len(summary.rounds),
        "curve": [r.accuracy for r in summary.rounds],
        "max_epsilon": max((d["epsilon"] for d in departments.values()), default=None),
        "max_epsilon_rederived": max((d["epsilon_rederived"] for d in departments.values()), default=None),
        "departments": departments,
        "wall_time_s": summary.wall_time_s,
    }


def run_fedsilo(dataset: str, setup: Setup, epsilon: float | None, base: Path) -> dict[str, Any]:
    """Run one ``fedsilo simulate`` in a subprocess; its run directory starts empty.

    A run directory with ledgers would *resume* them (ε continues from the recorded
    history), so an earlier benchmark's directory is removed first.
    """
    run_dir = base / f"{dataset}-{_key(epsilon)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = base / f"{dataset}-{_key(epsilon)}.log"
    base.mkdir(parents=True, exist_ok=True)
    cmd = fedsilo_command(dataset, setup, epsilon, run_dir)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=setup.timeout_s)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not (resolve_run_dir(run_dir) / "summary.json").exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited {done.returncode}; log {log_path}:\n{tail}")
    result = read_fedsilo_run(run_dir)
    result.update(seconds=round(seconds, 1), command=cmd[1:], run_dir=str(run_dir))
    return result


# --------------------------------------------------------------------------- centralized


def run_centralized(
    train: Dataset, test: Dataset, epsilon: float | None, epochs: int, seed: int, hp: Hyper = FEDSILO_HP
) -> dict[str, Any]:
    """DP-SGD (or plain SGD) on the pooled data with fedsilo's trainer and settings."""
    model = _fresh_model(test, seed)
    started = time.perf_counter()
    if epsilon is None:
        result = train_plain(
            model, train, epochs=epochs, batch_size=hp.batch_size, learning_rate=hp.learning_rate,
            max_grad_norm=hp.max_grad_norm if hp.clip_plain else None,
            momentum=hp.momentum, seed=seed,
        )
        mechanism, eps = None, None
    else:
        plan = plan_mechanism(len(train), hp.batch_size, epochs, 1.0)
        with _quiet():
            sigma = accounting.noise_for_target(epsilon, DELTA, plan.sample_rate, plan.steps, ACCOUNTANT)
        mechanism = Mechanism(sigma, plan.sample_rate, plan.steps)
        result = train_dp(
            model, train, mechanism, max_grad_norm=hp.max_grad_norm, learning_rate=hp.learning_rate,
            momentum=hp.momentum, grad_sample_mode=hp.grad_sample_mode,
        )
        with _quiet():
            eps = accounting.epsilon([mechanism], DELTA, ACCOUNTANT)
    loss, acc = evaluate(model, test)
    return {
        "accuracy": acc,
        "loss": loss,
        "epsilon": eps,
        "epochs": epochs,
        "steps": result.steps,
        "num_examples": len(train),
        "noise_multiplier": mechanism.noise_multiplier if mechanism else None,
        "sample_rate": mechanism.sample_rate if mechanism else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- the recipe


def recipe_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch of the example's DataLoader, hence Opacus' sample rate 1/batches."""
    return math.ceil(num_examples / batch_size)


def recipe_history(num_examples: int, batch_size: int, sigma: float, rounds: int, epochs: int = 1) -> list[Mechanism]:
    """What a department running the recipe for ``rounds`` rounds really released."""
    batches = recipe_batches(num_examples, batch_size)
    return [Mechanism(sigma, 1.0 / batches, epochs * batches)] * rounds


def recipe_sigma(sizes: list[int], batch_size: int, rounds: int, target: float, epochs: int = 1) -> float:
    """The one σ (the recipe has a single noise setting) whose honest ε, max over departments, is ``target``.

    At a given σ the department with the fewest batches (the highest sample rate)
    spends the most ε over the same number of epochs, so σ is sized for it; every
    other department is then checked (one accountant call each, not a search) and
    σ raised for any that would still exceed the target.
    """
    batches = sorted({recipe_batches(n, batch_size) for n in sizes})

    def search(b: int) -> float:
        return accounting.noise_for_target(target, DELTA, 1.0 / b, rounds * epochs * b, ACCOUNTANT)

    with _quiet():
        sigma = search(batches[0])
        for b in batches[1:]:
            if accounting.epsilon([Mechanism(sigma, 1.0 / b, rounds * epochs * b)], DELTA, ACCOUNTANT) > target:
                sigma = max(sigma, search(b))
    return sigma


def _average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype) for k in states[0]}


def recipe_local_round(
    global_state: dict[str, torch.Tensor], data: Dataset, test: Dataset, sigma: float | None, hp: Hyper, seed: int,
    reported_cache: dict | None = None,
) -> tuple[dict[str, torch.Tensor], float | None, list[tuple[float, float, int]]]:
    """One client round of the example: a new PrivacyEngine, make_private, one epoch.

    Returns the new weights, the ε the example prints (``get_epsilon`` of this
    round's engine) and that engine's accountant history (what it composed).
    ``get_epsilon`` is a pure function of that history and PRV takes ~0.5 s, so
    ``reported_cache`` (history -> ε) lets rounds with the same mechanism reuse it.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    model = _fresh_model(test, seed)
    model.load_state_dict(global_state)
    model.train()
    loader = DataLoader(to_tensor_dataset(data), batch_size=hp.batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.learning_rate, momentum=hp.momentum)
    criterion = torch.nn.CrossEntropyLoss()
    if sigma is None:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            if hp.clip_plain:
                torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(secure_mode=False)
        private, optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=hp.max_grad_norm, grad_sample_mode=hp.grad_sample_mode,
        )
    for xb, yb in dp_loader:
        optimizer.zero_grad()
        criterion(private(xb), yb).backward()
        optimizer.step()
    history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    cache = {} if reported_cache is None else reported_cache
    if tuple(history) not in cache:
        with _quiet():
            cache[tuple(history)] = float(engine.get_epsilon(delta=DELTA))
    reported = cache[tuple(history)]
    private._close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, reported, history


def run_recipe(
    parts: list[Dataset], test: Dataset, epsilon: float | None, rounds: int, seed: int, hp: Hyper = RECIPE_HP,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """FedAvg rounds of the recipe; its reported ε and its honest whole-history ε."""
    sizes = [len(p) for p in parts]
    sigma = None if epsilon is None else recipe_sigma(sizes, hp.batch_size, rounds, epsilon)
    model = _fresh_model(test, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    histories: list[list[Mechanism]] = [[] for _ in parts]
    reported: list[float | None] = [None] * len(parts)
    curve: list[float] = []
    cache: dict = {}
    started = time.perf_counter()
    for rnd in range(1, rounds + 1):
        states = []
        for i, part in enumerate(parts):
            new, eps, history = recipe_local_round(state, part, test, sigma, hp, seed, cache)
            states.append(new)
            reported[i] = eps  # the example prints it each round; the last one is what a run ends with
            histories[i] += [Mechanism(s, q, n) for s, q, n in history]
        state = _average(states, sizes)
        model.load_state_dict(state)
        curve.append(evaluate(model, test)[1])
        if progress:
            progress(rnd)
    loss, acc = evaluate(model, test)
    with _quiet():
        honest = [accounting.epsilon(h, DELTA, ACCOUNTANT) for h in histories] if sigma is not None else None
    return {
        "accuracy": acc,
        "loss": loss,
        "curve": curve,
        "noise_multiplier": sigma,
        "hyperparameters": asdict(hp),
        "reported_epsilon": max(reported) if sigma is not None else None,  # type: ignore[type-var]
        "reported_epsilon_per_department": reported if sigma is not None else None,
        "honest_epsilon": max(honest) if honest else None,
        "honest_epsilon_per_department": honest,
        "steps_per_department": [sum(m.steps for m in h) for h in histories] if sigma is not None else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------- the benchmark


def bench_dataset(dataset: str, setup: Setup, out: Path) -> dict[str, Any]:
    """Every cell of one dataset: fedsilo, centralized and the recipe at each ε and without DP."""
    parts, test = federation_data(dataset, "label", (), setup.departments, setup.partition, setup.seed)
    train = pooled(parts)
    settings: list[float | None] = [*setup.epsilons, None]
    record: dict[str, Any] = {
        "department_sizes": [len(p) for p in parts],
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": test.num_classes,
        "model": type(_fresh_model(test, setup.seed)).__name__,
        "fedsilo": {},
        "centralized": {},
        "recipe": {},
        "recipe_fedsilo_hp": {},
    }
    for eps in settings:
        key = _key(eps)
        _log(f"{dataset} {key}: fedsilo simulate ({setup.departments} departments × {setup.rounds} rounds) …")
        record["fedsilo"][key] = run_fedsilo(dataset, setup, eps, out / "utility")
        _log(f"{dataset} {key}: fedsilo {_pct(record['fedsilo'][key]['accuracy'])}, "
             f"max ε {_eps(record['fedsilo'][key]['max_epsilon'])}, {record['fedsilo'][key]['seconds']:.0f} s")
        record["centralized"][key] = run_centralized(train, test, eps, setup.central_epochs, setup.seed)
        _log(f"{dataset} {key}: centralized {_pct(record['centralized'][key]['accuracy'])}, "
             f"ε {_eps(record['centralized'][key]['epsilon'])}, {record['centralized'][key]['seconds']:.0f} s")
        record["recipe"][key] = run_recipe(parts, test, eps, setup.rounds, setup.seed, RECIPE_HP)
        record["recipe_fedsilo_hp"][key] = run_recipe(parts, test, eps, setup.rounds, setup.seed, RECIPE_FEDSILO_HP)
        _log(f"{dataset} {key}: recipe {_pct(record['recipe'][key]['accuracy'])} "
             f"(fedsilo's hyperparameters {_pct(record['recipe_fedsilo_hp'][key]['accuracy'])}), "
             f"reported ε {_eps(record['recipe'][key]['reported_epsilon'])}, "
             f"honest ε {_eps(record['recipe'][key]['honest_epsilon'])}")
    return record


def run(out: Path, quick: bool, setup: Setup | None = None, smoke: bool = False) -> BenchResult:
    """The benchmark; ``setup`` overrides the quick/full sizes (tests); ``smoke``: :data:`SMOKE`, in quick mode."""
    quick = quick or smoke
    setup = setup or (SMOKE if smoke else QUICK if quick else FULL)
    out = Path(out)
    # One intra-op thread for the in-process baselines, as every simulated department
    # runs (one Ray CPU, torch.set_num_threads(1)): on 2 shared cores two threads
    # oversubscribe and were measured ~7x slower on the CNN.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {dataset: bench_dataset(dataset, setup, out) for dataset in setup.datasets}
    finally:
        torch.set_num_threads(threads)
    return build_result(results, setup, quick, out)


def build_result(results: dict[str, Any], setup: Setup, quick: bool, out: Path, draw_plots: bool = True) -> BenchResult:
    """Tables, targets, text and the plot from measured ``results`` (also re-renders a saved run)."""
    raw = {
        "setup": {**asdict(setup), "central_epochs": setup.central_epochs},
        "delta": DELTA,
        "accountant": ACCOUNTANT,
        "fedsilo_hyperparameters": asdict(FEDSILO_HP),
        "recipe_hyperparameters": asdict(RECIPE_HP),
        "recipe_fedsilo_hyperparameters": asdict(RECIPE_FEDSILO_HP),
        "datasets": results,
    }
    if draw_plots:
        summary.plot(results, setup, DELTA, ACCOUNTANT, Path(out) / PLOT)
    return BenchResult(name="utility", quick=quick, plots=[PLOT], raw=raw, **summary.summarize(raw, setup, GAP_POINTS))


def rerender(path: Path, draw_plots: bool = True) -> BenchResult:
    """Rebuild a saved ``utility.json`` (title, text, tables, targets; the plot unless not ``draw_plots``) without re-running anything."""
    def rebuild(saved: dict[str, Any]) -> BenchResult:
        raw = saved["raw"]
        fields = {k: v for k, v in raw["setup"].items() if k != "central_epochs"}
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        return build_result(raw["datasets"], setup, saved["quick"], Path(path).parent, draw_plots)

    return rerendered(path, rebuild)
