"""The baseline: the federation's work in a plain Python loop without Flower, on spawned worker processes.

Per round, for every department, what the ClientApp and its ``privacy_budget_mod`` do
(:func:`department_round`), then what the ServerApp does (FedAvg weighted by examples,
the evaluation on the held-out set); ``accounting.epsilon`` is timed by a wrapper in
every worker.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from ..common import Stopwatch, TreeMemory
from .config import DATASET, PARTITION, SEED

# Per worker process: accounting.epsilon calls timed by a wrapper (see _install_epsilon_timer).
_EPS = {"calls": 0, "nonempty_calls": 0, "seconds": 0.0}


def _install_epsilon_timer() -> None:
    """Wrap ``accounting.epsilon`` (the budget guard calls it through the module) to time every call."""
    from fedsilo.shared import accounting

    if getattr(accounting.epsilon, "_scale_timer", False):
        return
    original = accounting.epsilon

    def timed(history, delta, accountant="prv"):
        history = list(history)
        started = time.perf_counter()
        try:
            return original(history, delta, accountant)
        finally:
            _EPS["seconds"] += time.perf_counter() - started
            _EPS["calls"] += 1
            _EPS["nonempty_calls"] += bool(history)

    timed._scale_timer = True  # type: ignore[attr-defined]
    accounting.epsilon = timed


def _worker_init(dataset: str, departments: int) -> None:
    """A worker like a Ray ClientApp actor: one torch thread, the partitions loaded once."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    importlib.import_module("opacus")  # train_dp imports it lazily: load it before the clock runs

    from fedsilo.shared.data import federation_data

    _install_epsilon_timer()
    federation_data(dataset, "label", (), departments, PARTITION, SEED)


def plain_settings(dataset: str, departments: int, rounds: int, out: Path):
    from fedsilo.shared.config import RUN_CONFIG_DEFAULTS, RunSettings

    return RunSettings.from_run_config(
        {**RUN_CONFIG_DEFAULTS, "num-server-rounds": rounds, "dataset": dataset, "partition": PARTITION,
         "seed": SEED, "out": str(out)}
    )


def department_round(settings, pid: int, total: int, global_state: dict, run_id: str, rnd: int,
                     clock: dict[str, float]) -> tuple[dict | None, int]:
    """One department's round as the ClientApp runs it (budget_guard.privacy_budget_mod + app.train).

    Returns the trained weights (``None`` when the budget guard refuses) and the
    number of examples.  ``clock`` accumulates seconds per phase.
    """
    import torch

    from fedsilo.client.budget_guard import plan_round
    from fedsilo.client.department import department_from_context
    from fedsilo.client.policy import RunRequest
    from fedsilo.client.trainer import train_dp
    from fedsilo.shared.budget import BudgetGuard
    from fedsilo.shared.ledger import PrivacyLedger
    from fedsilo.shared.models import build_model, resolve_device

    t0 = time.perf_counter()
    department = department_from_context({"partition-id": pid, "num-partitions": total}, settings)
    ledger = PrivacyLedger(department.ledger_path, department.name, department.signer)
    terms, _ = department.policy.terms_for(RunRequest.from_settings(settings))
    size = department.policy.reported_size(department.data.num_records)
    mechanism = plan_round(settings, terms, size)
    t1 = time.perf_counter()
    guard = BudgetGuard(terms.max_epsilon, terms.delta, terms.accountant)
    last = ledger.entries[-1] if ledger.entries else None
    known = last.epsilon if last and last.delta == terms.delta and last.accountant == terms.accountant else None
    decision = guard.would_exceed(ledger.history, mechanism, epsilon_before=known)
    t2 = time.perf_counter()
    clock["setup"] += t1 - t0
    clock["guard"] += t2 - t1
    if not decision.allowed:
        return None, 0
    torch.set_num_threads(1)
    data = department.data
    model = build_model(settings.model, data.input_shape, data.num_classes, data.kind)
    model.load_state_dict(global_state)
    result = train_dp(
        model, data, mechanism, max_grad_norm=settings.max_grad_norm, learning_rate=settings.learning_rate,
        momentum=settings.momentum, grad_sample_mode=settings.grad_sample_mode,
        device=resolve_device(settings.device),
    )
    if result.steps != mechanism.steps:
        raise RuntimeError(f"trainer ran {result.steps} steps, the guard planned {mechanism.steps}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    t3 = time.perf_counter()
    ledger.append(
        run_id=run_id, round=rnd, mechanism=mechanism, max_grad_norm=settings.max_grad_norm,
        delta=terms.delta, accountant=terms.accountant, epsilon=decision.epsilon_after,
        num_examples=len(data), expected_seq=len(ledger.entries), budget=terms.max_epsilon, reported_size=size,
    )
    t4 = time.perf_counter()
    clock["training"] += t3 - t2
    clock["ledger"] += t4 - t3
    return state, size


def _chunk_round(args: tuple) -> dict[str, Any]:
    """Some departments' round in one worker: their example-weighted sum of weights, and the clocks."""
    import numpy as np
    import torch

    dataset, total, rounds, out, pids, global_np, run_id, rnd = args
    settings = plain_settings(dataset, total, rounds, Path(out))
    global_state = {k: torch.from_numpy(v) for k, v in global_np.items()}
    clock = {"setup": 0.0, "guard": 0.0, "training": 0.0, "ledger": 0.0}
    eps_before = dict(_EPS)
    weighted: dict[str, np.ndarray] = {}
    weight, trained, refused = 0, 0, 0
    started = time.perf_counter()
    for pid in pids:
        state, n = department_round(settings, pid, total, global_state, run_id, rnd, clock)
        if state is None:
            refused += 1
            continue
        trained += 1
        weight += n
        for k, v in state.items():
            contribution = v.double().numpy() * n
            weighted[k] = weighted[k] + contribution if k in weighted else contribution
    return {
        "weighted": weighted, "weight": weight, "trained": trained, "refused": refused,
        "seconds": time.perf_counter() - started, "clock": clock,
        "epsilon_calls": _EPS["calls"] - eps_before["calls"],
        "epsilon_nonempty_calls": _EPS["nonempty_calls"] - eps_before["nonempty_calls"],
        "epsilon_seconds": _EPS["seconds"] - eps_before["seconds"],
    }


def run_plain_loop(departments: int, rounds: int, workers: int, dataset: str = DATASET,
                   run_dir: Path | None = None) -> dict[str, Any]:
    """The federation's work without Flower, on ``workers`` spawned processes (1 = sequential).

    Ledgers go to ``run_dir/ledgers``, like a simulation's (a fresh temporary
    folder when ``run_dir`` is not given, removed afterwards).
    """
    import torch

    from fedsilo.shared.data import federation_data
    from fedsilo.shared.models import build_model, evaluate

    own_dir = run_dir is None
    root = Path(tempfile.mkdtemp(prefix="fedsilo-scale-plain-")) if own_dir else Path(run_dir)
    if not own_dir:
        shutil.rmtree(root / "ledgers", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    run_id = f"plain-{departments}-{workers}-{os.getpid()}"
    chunks = [list(range(w, departments, workers)) for w in range(workers)]
    chunks = [c for c in chunks if c]
    record: dict[str, Any] = {"departments": departments, "rounds": rounds, "workers": len(chunks),
                              "dataset": dataset}
    ctx = multiprocessing.get_context("spawn")
    memories: list[TreeMemory] = []
    pool = None
    record["load_before"] = os.getloadavg()[0]
    try:
        with Stopwatch() as setup:
            pool = ProcessPoolExecutor(len(chunks), mp_context=ctx, initializer=_worker_init,
                                       initargs=(dataset, departments))
            # Start and initialize every worker (imports, data) before the clock runs; they
            # inherit OMP_NUM_THREADS=1, as Ray sets it for a 1-CPU actor.
            with _environ(OMP_NUM_THREADS="1"):
                pids = set(f.result() for f in [pool.submit(_worker_ready, 0.5) for _ in chunks])
            _, test = federation_data(dataset, "label", (), departments, PARTITION, SEED)
            model = build_model("auto", test.input_shape, test.num_classes, test.kind, seed=SEED)
        record["setup_s"] = setup.seconds
        memories = [TreeMemory(pid) for pid in sorted(pids)]
        for m in memories:
            m.__enter__()
        seconds, trained, refused, accuracy = [], [], [], None
        clock = {"setup": 0.0, "guard": 0.0, "training": 0.0, "ledger": 0.0, "server": 0.0}
        eps_calls = eps_nonempty = 0
        eps_seconds = worker_seconds = 0.0
        for rnd in range(1, rounds + 1):
            started = time.perf_counter()
            global_np = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            jobs = [(dataset, departments, rounds, str(root), c, global_np, run_id, rnd) for c in chunks]
            parts = list(pool.map(_chunk_round, jobs))
            server_started = time.perf_counter()
            weight = sum(p["weight"] for p in parts)
            if weight:
                total = {k: sum(p["weighted"][k] for p in parts if p["weighted"]) for k in global_np}
                model.load_state_dict(
                    {k: torch.from_numpy((v / weight).astype(global_np[k].dtype)) for k, v in total.items()}
                )
                _, accuracy = evaluate(model, test)
            clock["server"] += time.perf_counter() - server_started
            seconds.append(time.perf_counter() - started)
            trained.append(sum(p["trained"] for p in parts))
            refused.append(sum(p["refused"] for p in parts))
            for p in parts:
                for k, v in p["clock"].items():
                    clock[k] += v
                eps_calls += p["epsilon_calls"]
                eps_nonempty += p["epsilon_nonempty_calls"]
                eps_seconds += p["epsilon_seconds"]
                worker_seconds += p["seconds"]
    finally:
        for m in memories:
            m.__exit__(None, None, None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    dept_rounds = sum(trained)
    busy = worker_seconds + clock["server"]
    record.update(
        load_after=os.getloadavg()[0],
        seconds=seconds,
        trained=trained,
        refused=refused,
        mean_round_s=statistics.mean(seconds),
        steady_round_s=statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
        department_rounds_per_s=dept_rounds / sum(seconds) if sum(seconds) else None,
        final_accuracy=accuracy,
        clock=clock,
        worker_seconds=worker_seconds,
        epsilon_calls=eps_calls,
        epsilon_nonempty_calls=eps_nonempty,
        epsilon_seconds=eps_seconds,
        epsilon_calls_per_department_round=eps_nonempty / dept_rounds if dept_rounds else None,
        # Share of the loop's busy time (all workers' time plus the server's) spent in accounting.epsilon.
        accounting_share=eps_seconds / busy if busy else None,
        workers_peak_pss_bytes=sum(m.peak for m in memories),
        ledger_dir=None if own_dir else str(root / "ledgers"),
    )
    return record


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for processes started inside the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_ready(pause: float) -> int:
    time.sleep(pause)  # long enough that each worker takes one of these
    return os.getpid()

