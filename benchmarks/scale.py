"""Simulation scale: 10, 100 and 1,000 departments × 3 rounds, and the orchestration overhead.

Two measurements of the same federation (one dataset for every size, IID
partitions, fedsilo's default settings: DP-SGD σ=1, C=1, batch 64, 1 local
epoch, PRV accounting, budget ε ≤ 10):

* **the simulation** — the real ``fedsilo simulate`` CLI in a subprocess
  (private loopback SuperLink, Flower's Simulation Engine on Ray, the
  ClientApp with its budget guard and signed ledgers).  Seconds per round come
  from its ``summary.json`` (the ServerApp times each round: dispatch, every
  department's reply, FedAvg and the evaluation of the new global model); peak
  memory is the proportional set size (PSS) of the whole process tree — the CLI,
  the SuperLink, the simulation process, Ray's services and workers — sampled
  every 0.5 s by :class:`~fedsilo.benchmarks.common.TreeMemory`.
* **a plain loop without Flower** — per round, for every department, what the
  ClientApp and its ``privacy_budget_mod`` do: resolve the department
  (:func:`~fedsilo.client.department.department_from_context`: its partition and
  its simulated signing key), read and verify its ledger, plan the round
  (:func:`~fedsilo.client.budget_guard.plan_round`), the budget guard's dry run
  (one ``accounting.epsilon`` call), build the model and load the global
  weights, :func:`~fedsilo.client.trainer.train_dp`, the signed, fsynced ledger
  append; then what the ServerApp does: FedAvg weighted by examples and the
  evaluation on the held-out set.  No Flower messages, no Ray.  It runs once
  sequentially (one process) and once on two worker processes (the departments
  split between them), because the simulation runs two Ray workers in parallel
  on this 2-core machine; the 2-process loop is the like-for-like baseline.

Orchestration overhead = (simulation s/round − plain s/round) / plain s/round.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from fedsilo.shared.runs import resolve_run_dir

from .common import BenchResult, Sampler, Stopwatch, Table, Target, TreeMemory

NAME = "scale"
PLOT = "scale.png"
# mnist5k: 4,000 training records after the fixed 20 % hold-out, so 1,000
# departments still get 4 records each (digits has ~1,440: too few).
DATASET = "mnist5k"
PARTITION = "iid"
SEED = 42
FULL_SIZES = (10, 100, 1000)
FULL_ROUNDS = 3
QUICK_SIZES = (5, 20)
QUICK_ROUNDS = 2
SMOKE_SIZES = (3,)  # the test suite's: one small simulation and its plain loop
SMOKE_ROUNDS = 2  # "rounds >= 2" is a column
TARGET_DEPARTMENTS = 1000
TARGET_SECONDS = 600.0
TARGET_GIB = 6.0
OVERHEAD_AT = 100
TARGET_OVERHEAD = 0.30
SIM_TIMEOUT_S = 3600.0
PLAIN_WORKERS = 2  # the simulation's Ray workers on 2 cores (1 CPU per department)


def _log(text: str) -> None:
    print(f"  [scale] {text}", flush=True)


def _env() -> dict[str, str]:
    from fedsilo.shared.flower_cli import offline_env

    return offline_env()


# --------------------------------------------------------------------------- the simulation


def simulate_command(departments: int, rounds: int, run_dir: Path, dataset: str = DATASET) -> list[str]:
    return [
        sys.executable, "-m", "fedsilo", "simulate",
        "--departments", str(departments), "--rounds", str(rounds),
        "--partition", PARTITION, "--dataset", dataset, "--seed", str(SEED),
        "--out", str(run_dir),
    ]


class ProcessCensus(Sampler):
    """How many processes the tree of ``pid`` had at most, and what they were (sampled)."""

    RAY_SERVICES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.pid = pid
        self.most = 0
        self.names: dict[str, int] = {}  # the most processes of each name seen at once
        self.ray_workers = 0  # the most Ray worker processes (ray::IDLE, ray::ClientAppActor, ...) at once

    @staticmethod
    def _name(pid: int) -> str:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return "?"
        args = [a.decode(errors="replace") for a in raw if a]
        if not args:
            return "?"
        if args[0].startswith("ray::"):
            return args[0].split()[0]  # Ray names its workers ray::ClassName
        first = Path(args[0]).name
        if first.startswith("python") and len(args) > 1:
            if args[1] == "-m" and len(args) > 2:
                return f"python -m {args[2]}"
            return f"python {Path(args[1]).name}"
        return first

    def sample(self) -> None:
        from fedsilo.shared.flower_cli import descendants

        tree = [self.pid, *descendants(self.pid)]
        self.most = max(self.most, len(tree))
        names: dict[str, int] = {}
        for p in tree:
            name = self._name(p)
            names[name] = names.get(name, 0) + 1
        for name, count in names.items():
            self.names[name] = max(self.names.get(name, 0), count)
        workers = sum(c for n, c in names.items() if n.startswith("ray::") and n not in self.RAY_SERVICES)
        self.ray_workers = max(self.ray_workers, workers)


def run_simulation(departments: int, rounds: int, base: Path, dataset: str = DATASET,
                   timeout: float = SIM_TIMEOUT_S) -> dict[str, Any]:
    """``fedsilo simulate`` in a subprocess, under :class:`TreeMemory`; its run directory starts empty."""
    from fedsilo.shared.flower_cli import stop_tree

    run_dir = base / str(departments)
    shutil.rmtree(run_dir, ignore_errors=True)  # old ledgers would be resumed
    base.mkdir(parents=True, exist_ok=True)
    log_path = base / f"simulate-{departments}.log"
    cmd = simulate_command(departments, rounds, run_dir, dataset)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        with TreeMemory(proc.pid) as memory, ProcessCensus(proc.pid) as census:
            proc.wait(timeout=timeout)
    except BaseException:
        stop_tree(proc)
        raise
    finally:
        if proc.poll() is None:
            stop_tree(proc)
    wall = time.perf_counter() - started
    summary_path = resolve_run_dir(run_dir) / "summary.json"  # the output folder's latest run
    if proc.returncode != 0 or not summary_path.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"`{' '.join(cmd[1:])}` exited {proc.returncode}; log {log_path}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    seconds = [float(r["seconds"]) for r in summary["rounds"]]
    trained = [len(r["trained"]) for r in summary["rounds"]]
    return {
        "departments": departments,
        "rounds": len(seconds),
        "status": summary["status"],
        "seconds": seconds,
        "trained": trained,
        "refused": [len(r["refused"]) for r in summary["rounds"]],
        "failed": [len(r["failed"]) + len(r["rejected"]) for r in summary["rounds"]],
        "mean_round_s": statistics.mean(seconds),
        "steady_round_s": statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "department_rounds_per_s": sum(trained) / sum(seconds) if sum(seconds) else None,
        "wall_s": wall,
        "run_wall_time_s": summary.get("wall_time_s"),
        "startup_s": wall - sum(seconds),
        "peak_pss_bytes": memory.peak,
        "peak_pss_gib": memory.peak_gib,
        "max_processes": census.most,
        "processes_by_name": census.names,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "ray_client_workers": census.ray_workers,
        "final_accuracy": summary.get("final_accuracy"),
        "max_epsilon": max((d.get("epsilon") or 0.0 for d in summary.get("departments", {}).values()), default=None),
        "run_dir": str(run_dir),
        "command": cmd[1:],
    }


# --------------------------------------------------------------------------- the plain loop (no Flower)

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
    import opacus  # noqa: F401  (train_dp imports it lazily: load it before the clock runs)

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


# --------------------------------------------------------------------------- results


def _overhead(sim: float, plain: float) -> float:
    return (sim - plain) / plain


def _s(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%"


def _load(record: dict[str, Any]) -> str:
    before, after = record.get("load_before"), record.get("load_after")
    return "–" if before is None or after is None else f"{before:.1f} → {after:.1f}"


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds per round and peak memory against the number of departments (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["departments"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    sims = [r["simulation"] for r in rows]
    left.plot(ns, [s["mean_round_s"] for s in sims], "o-", label="simulation (Flower + Ray, 2 workers), all rounds")
    left.plot(ns, [s["steady_round_s"] for s in sims], "o--", label="simulation, rounds ≥ 2")
    for key, label, style in (("plain_parallel", f"plain loop, {PLAIN_WORKERS} processes", "s-"),
                              ("plain_sequential", "plain loop, 1 process", "^-")):
        pts = [(r["departments"], r[key]["mean_round_s"]) for r in rows if r.get(key)]
        if pts:
            left.plot(*zip(*pts), style, label=f"{label}, all rounds")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("departments (log)")
    left.set_ylabel("seconds per round (log)")
    left.set_title("Time per round")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.plot(ns, [s["peak_pss_gib"] for s in sims], "o-", label="simulation: whole process tree (PSS)")
    pts = [(r["departments"], r["plain_parallel"]["workers_peak_pss_bytes"] / 2**30) for r in rows if r.get("plain_parallel")]
    if pts:
        right.plot(*zip(*pts), "s-", label=f"plain loop: its {PLAIN_WORKERS} workers (PSS)")
    right.axhline(TARGET_GIB, color="red", linestyle=":", label=f"target {TARGET_GIB:g} GiB")
    right.set_xscale("log")
    right.set_ylim(bottom=0, top=max(TARGET_GIB, *(s["peak_pss_gib"] for s in sims)) * 1.1)
    for ax in (left, right):
        ax.set_xticks(ns)
        ax.set_xticklabels([f"{n:,}" for n in ns])
        ax.minorticks_off()
    right.set_xlabel("departments (log)")
    right.set_ylabel("peak memory (GiB)")
    right.set_title("Peak memory")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"fedsilo simulate on {DATASET}, IID, DP-SGD ({rows[0]['simulation']['rounds']} rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets_for(rows: list[dict[str, Any]], quick: bool) -> list[Target]:
    by = {r["departments"]: r for r in rows}
    largest = rows[-1]
    big = by.get(TARGET_DEPARTMENTS)
    targets = []
    if big is None:
        sim = largest["simulation"]
        where = (f"not run (quick mode); largest run: {largest['departments']} departments × {sim['rounds']} rounds "
                 f"in {sim['wall_s']:.0f} s end to end, peak {sim['peak_pss_gib']:.2f} GiB")
        targets.append(Target(f"{TARGET_DEPARTMENTS:,} departments × 3 rounds on 2 cores in < 10 min", where, None,
                              "measured only by the full run"))
        targets.append(Target(f"… in < {TARGET_GIB:g} GiB (whole process tree, Ray workers included)", where, None,
                              "measured only by the full run"))
    else:
        sim = big["simulation"]
        per_dept = sum(sim["seconds"]) / max(sum(sim["trained"]), 1)
        note = (f"{sim['startup_s']:.0f} s of it is start-up and shutdown (SuperLink, Ray, the run's processes), "
                f"{sum(sim['seconds']):.0f} s the {sim['rounds']} rounds: {1000 * per_dept:.0f} ms per department-round "
                f"on {PLAIN_WORKERS} Ray workers.")
        plain = big.get("plain_parallel")
        if plain:
            note += (f" The plain loop on {PLAIN_WORKERS} processes did the same rounds in "
                     f"{sum(plain['seconds']):.0f} s.")
        loop = big.get("plain_sequential") or plain
        if loop and loop["worker_seconds"]:
            busy = loop["worker_seconds"] + loop["clock"]["server"]
            dr = max(sum(loop["trained"]), 1)
            names = {"setup": "resolving the department and reading/verifying its ledger",
                     "guard": "the budget guard's ε", "training": "building the model and train_dp",
                     "ledger": "the signed, fsynced ledger append", "server": "FedAvg and evaluation"}
            parts = sorted(loop["clock"].items(), key=lambda kv: -kv[1])
            note += (f" Per department-round the plain loop's worker spent {1000 * loop['worker_seconds'] / dr:.0f} ms: "
                     + ", ".join(f"{names[k]} {100 * v / busy:.0f}%" for k, v in parts) + ".")
            if sim["wall_s"] > TARGET_SECONDS:
                top = parts[0][0]
                note += (f" To close it, cut the largest share ({names[top]}) per department, or add cores: "
                         "rounds scale with the number of Ray workers.")
        targets.append(Target(f"{TARGET_DEPARTMENTS:,} departments × 3 rounds on 2 cores in < 10 min",
                              f"{sim['wall_s']:.0f} s end to end ({sum(sim['seconds']):.0f} s in rounds)",
                              sim["wall_s"] < TARGET_SECONDS, note))
        procs = sim["max_processes"]
        mem_note = (f"PSS sampled every 0.5 s over the whole tree: at most {procs} processes at once, up to "
                    f"{sim['ray_client_workers']} Ray workers among them.")
        if sim["peak_pss_gib"] >= TARGET_GIB:
            mem_note += (" Each Ray worker holds its own torch, Opacus and copy of the dataset: fewer workers, or "
                         "Ray without its dashboard, would cut it.")
        targets.append(Target(f"… in < {TARGET_GIB:g} GiB (whole process tree, Ray workers included)",
                              f"{sim['peak_pss_gib']:.2f} GiB", sim["peak_pss_gib"] < TARGET_GIB, mem_note))
    at = by.get(OVERHEAD_AT)
    base = at or largest
    sim = base["simulation"]
    loops = [(f"{p['workers']}-process", p) for p in (base.get("plain_sequential"), base.get("plain_parallel")) if p]
    if loops:
        # The baseline is the faster of the plain loops: what the same work takes here without Flower.
        name, best = min(loops, key=lambda lp: lp[1]["mean_round_s"])
        over = _overhead(sim["mean_round_s"], best["mean_round_s"])
        steady = _overhead(sim["steady_round_s"], best["steady_round_s"])
        measured = (f"{_pct(over)} vs the faster plain loop ({name}: {_s(sim['mean_round_s'])} vs "
                    f"{_s(best['mean_round_s'])} s/round; rounds ≥ 2: {_pct(steady)})")
        for other_name, other in loops:
            if other is not best:
                measured += f"; {_pct(_overhead(sim['mean_round_s'], other['mean_round_s']))} vs the {other_name} loop"
        extra_ms = 1000 * (sim["steady_round_s"] - best["steady_round_s"]) / max(base["departments"], 1)
        note = (("Baseline: the faster of the two plain loops (on a loaded machine the 2-process loop need not "
                 "beat 1 process). " if len(loops) > 1 else "")
                + "Simulation round 1 includes starting the Ray workers, their imports "
                "and data loading; the plain loop pays those before its clock starts (set-up "
                f"{best['setup_s']:.0f} s, not counted). From round 2 on, simulation minus plain loop: {extra_ms:+.0f} ms of "
                "wall time per department-round")
        big_row = by.get(TARGET_DEPARTMENTS)
        if big_row is not None and big_row is not base:
            bl = [p for p in (big_row.get("plain_sequential"), big_row.get("plain_parallel")) if p]
            if bl:
                bb = min(bl, key=lambda p: p["mean_round_s"])
                bs = big_row["simulation"]
                note += (f" (at {TARGET_DEPARTMENTS:,} departments {1000 * (bs['steady_round_s'] - bb['steady_round_s']) / TARGET_DEPARTMENTS:+.0f} ms, "
                         f"{_pct(_overhead(bs['mean_round_s'], bb['mean_round_s']))} overall)")
        note += (": Flower's per-message work (a Message carrying the model each way, the ClientApp's context and "
                 "mods, Ray's dispatch), not timed apart here.")
        if over > TARGET_OVERHEAD:
            note += (" Where round 1 is the excess, a longer run amortises the workers' start; where the per-message "
                     "work is, fewer and larger messages (several departments per Ray task) would.")
        label = f"orchestration overhead < {100 * TARGET_OVERHEAD:.0f}% at {OVERHEAD_AT} departments"
        if at is None:
            why = "quick mode" if quick else f"no {OVERHEAD_AT}-department run"
            targets.append(Target(label, f"at {base['departments']} departments ({why}): {measured}", None, note))
        else:
            targets.append(Target(label, measured, over < TARGET_OVERHEAD, note))
    plains = [r.get("plain_sequential") or r.get("plain_parallel") for r in rows]
    plains = [p for p in plains if p]
    if plains:
        worst = max(plains, key=lambda p: p["accounting_share"] or 0.0)
        calls = max((p["epsilon_calls_per_department_round"] or 0.0) for p in plains)
        ms = 1000 * worst["epsilon_seconds"] / max(worst["epsilon_nonempty_calls"], 1)
        targets.append(Target(
            "privacy accounting does not dominate: ε once per round per department, not per batch",
            f"{calls:.2f} accountant calls per department-round; at most {100 * worst['accounting_share']:.0f}% of "
            f"the plain loop's time ({worst['departments']} departments, {worst['workers']} process(es), "
            f"{ms:.0f} ms a call)",
            calls <= 1.0 + 1e-9 and worst["accounting_share"] < 0.5,
            "Counted by wrapping accounting.epsilon in the plain loop, which runs the ClientApp's own BudgetGuard "
            "code: at most one dry-run call per round (the ε before is the ledger's last entry), none when this "
            "process already computed ε for the same merged history (departments with the same sample rate and σ "
            "ask the same question). Criterion here: ≤ 1 call per department-round and < 50% of the time.",
        ))
    return targets


def build_result(rows: list[dict[str, Any]], out: Path, quick: bool, rounds: int) -> BenchResult:
    Path(out).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(out) / PLOT)
    sim_rows, plain_rows, phase_rows = [], [], []
    for r in rows:
        s = r["simulation"]
        sim_rows.append([
            f"{r['departments']:,}", str(s["rounds"]), " / ".join(_s(x) for x in s["seconds"]), _s(s["mean_round_s"]),
            _s(s["steady_round_s"]), f"{s['department_rounds_per_s']:.1f}", f"{s['wall_s']:.0f}",
            _gib(s["peak_pss_gib"]), str(s["max_processes"]), str(s["ray_client_workers"]),
            f"{s['final_accuracy']:.3f}" if s.get("final_accuracy") is not None else "–", _load(s),
        ])
        for key, label in (("plain_sequential", "1 process"), ("plain_parallel", f"{PLAIN_WORKERS} processes")):
            p = r.get(key)
            if not p:
                continue
            plain_rows.append([
                f"{r['departments']:,}", label, " / ".join(_s(x) for x in p["seconds"]), _s(p["mean_round_s"]),
                f"{p['department_rounds_per_s']:.1f}", _pct(_overhead(s["mean_round_s"], p["mean_round_s"])),
                _pct(_overhead(s["steady_round_s"], p["steady_round_s"])), _s(p["setup_s"]),
                _gib(p["workers_peak_pss_bytes"] / 2**30), _load(p),
            ])
        p = r.get("plain_sequential") or r.get("plain_parallel")
        if p:
            busy = p["worker_seconds"] + p["clock"]["server"]
            share = {k: v / busy for k, v in p["clock"].items()} if busy else {}
            dr = max(sum(p["trained"]), 1)
            phase_rows.append([
                f"{r['departments']:,}", str(p["workers"]),
                f"{1000 * (p['worker_seconds'] / dr):.0f}",
                *(f"{100 * share.get(k, 0):.0f}%" for k in ("setup", "guard", "training", "ledger", "server")),
                f"{100 * p['accounting_share']:.0f}%",
                f"{p['epsilon_nonempty_calls']} ({p['epsilon_calls_per_department_round']:.2f})",
                f"{1000 * p['epsilon_seconds'] / max(p['epsilon_nonempty_calls'], 1):.0f}",
            ])
    largest = rows[-1]["simulation"]
    text = (
        f"`fedsilo simulate --departments N --rounds {rounds} --partition {PARTITION} --dataset {DATASET}` "
        f"(fedsilo's defaults otherwise: DP-SGD σ=1, C=1, batch 64, 1 local epoch, PRV, budget ε ≤ 10) for N = "
        + ", ".join(f"{r['departments']:,}" for r in rows)
        + f" — the same dataset for every N: {DATASET} has 4,000 training records after the fixed 20 % hold-out, "
        "so 1,000 departments get 4 each (the total work per round is the same 4,000 examples; what grows with N is "
        "the per-department cost). Seconds per round are the ServerApp's own (`summary.json`: dispatch, every "
        "reply, FedAvg, evaluation); end to end adds the SuperLink's and Ray's start and stop. Peak memory: PSS of "
        "the whole process tree of the CLI (SuperLink, simulation process, Ray's services and workers), sampled "
        "every 0.5 s. Baseline: the same work in a plain Python loop without Flower — per department the "
        "ClientApp's steps with fedsilo's own functions (department_from_context, ledger read and verification, "
        "plan_round, the BudgetGuard dry run, build the model, train_dp, the signed fsynced ledger append), then "
        "FedAvg and the evaluation — run once in 1 process and once on "
        f"{PLAIN_WORKERS} spawned worker processes (one torch thread and OMP_NUM_THREADS=1 each, like the "
        f"simulation's {PLAIN_WORKERS} Ray workers on 2 cores); the overhead target is measured against the faster "
        "of the two. The plain loop's set-up (worker start, imports, "
        "data loading) is timed apart and not in its rounds; the simulation's first round does include its "
        "workers' start. Accounting share: seconds inside `accounting.epsilon` (timed by a wrapper) over the "
        "plain loop's busy time. **Measured on a 2-core machine shared with other CPU-heavy work: timings are "
        "noisy** (the 1-minute load average before and after each run is in the tables; above 2 the two cores were "
        f"oversubscribed). Largest run here: {rows[-1]['departments']:,} departments, {largest['wall_s']:.0f} s end to end."
        + (" Quick mode: small N and 2 rounds, the plain loop only on 2 processes at the largest N; the targets "
           "are for the full run." if quick else "")
    )
    return BenchResult(
        name=NAME,
        title="Simulation scale: departments, seconds per round, memory, orchestration overhead",
        quick=quick,
        text=text,
        tables=[
            Table("The simulation (fedsilo simulate)",
                  ["departments", "rounds", "s per round", "mean s/round", "rounds ≥ 2", "dept-rounds/s",
                   "end to end (s)", "peak GiB (tree PSS)", "processes (max)", "Ray workers (max)", "final accuracy",
                   "load avg before → after"],
                  sim_rows),
            Table("The plain loop without Flower, and the simulation's overhead over it",
                  ["departments", "plain loop", "s per round", "mean s/round", "dept-rounds/s",
                   "overhead (all rounds)", "overhead (rounds ≥ 2)", "set-up s (not counted)",
                   "workers' peak GiB (sum of PSS peaks)", "load avg before → after"],
                  plain_rows),
            Table("Where the plain loop's time goes (shares of its busy time: all workers plus FedAvg/evaluation)",
                  ["departments", "processes", "worker ms per dept-round", "department + ledger read",
                   "budget guard (ε)", "model + train_dp", "ledger append", "FedAvg + evaluate",
                   "in accounting.epsilon", "ε calls (per dept-round)", "ms per ε call"],
                  phase_rows),
        ],
        plots=[PLOT],
        targets=targets_for(rows, quick),
        raw={"dataset": DATASET, "partition": PARTITION, "rounds": rounds, "plain_workers": PLAIN_WORKERS,
             "rows": rows},
    )


def run(out: Path, quick: bool, smoke: bool = False) -> BenchResult:
    """The benchmark; ``smoke`` (the test suite's): quick mode at :data:`SMOKE_SIZES` × :data:`SMOKE_ROUNDS`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quick = quick or smoke
    sizes, rounds = ((SMOKE_SIZES, SMOKE_ROUNDS) if smoke else (QUICK_SIZES, QUICK_ROUNDS) if quick
                     else (FULL_SIZES, FULL_ROUNDS))
    base = out / "scale"
    rows = []
    for n in sizes:
        _log(f"{n} departments × {rounds} rounds: fedsilo simulate …")
        sim = run_simulation(n, rounds, base)
        _log(f"  {sim['wall_s']:.0f} s end to end, rounds {', '.join(_s(x) for x in sim['seconds'])} s, "
             f"peak {sim['peak_pss_gib']:.2f} GiB")
        row: dict[str, Any] = {"departments": n, "simulation": sim}
        baselines = [("plain_parallel", PLAIN_WORKERS), ("plain_sequential", 1)]
        if quick:  # quick mode: the like-for-like baseline only, at the largest N only
            baselines = baselines[:1] if n == sizes[-1] else []
        for key, workers in baselines:
            _log(f"  plain loop, {workers} process(es) …")
            row[key] = run_plain_loop(n, rounds, workers)
            _log(f"  rounds {', '.join(_s(x) for x in row[key]['seconds'])} s")
        rows.append(row)
        (base / "partial.json").write_text(json.dumps(rows, indent=1, default=str))
    return build_result(rows, out, quick, rounds)
