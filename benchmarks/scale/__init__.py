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

import json
from pathlib import Path
from typing import Any

from ..common import BenchResult
from .config import FULL_ROUNDS, FULL_SIZES, PLAIN_WORKERS, QUICK_ROUNDS, QUICK_SIZES, SMOKE_ROUNDS, SMOKE_SIZES
from .plain_loop import run_plain_loop
from .present import NAME, PLOT, build_result, format_s, from_raw, rerender
from .simulation import progress, run_simulation

__all__ = ["FULL_ROUNDS", "FULL_SIZES", "NAME", "PLOT", "QUICK_ROUNDS", "QUICK_SIZES", "SMOKE_ROUNDS", "SMOKE_SIZES",
           "build_result", "from_raw", "rerender", "run", "run_plain_loop", "run_simulation"]


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
        progress(f"{n} departments × {rounds} rounds: fedsilo simulate …")
        sim = run_simulation(n, rounds, base)
        progress(f"  {sim['wall_s']:.0f} s end to end, rounds {', '.join(format_s(x) for x in sim['seconds'])} s, "
             f"peak {sim['peak_pss_gib']:.2f} GiB")
        row: dict[str, Any] = {"departments": n, "simulation": sim}
        baselines = [("plain_parallel", PLAIN_WORKERS), ("plain_sequential", 1)]
        if quick:  # quick mode: the like-for-like baseline only, at the largest N only
            baselines = baselines[:1] if n == sizes[-1] else []
        for key, workers in baselines:
            progress(f"  plain loop, {workers} process(es) …")
            # Its ledgers are kept beside the results, as the simulation's are: anyone can audit them.
            row[key] = run_plain_loop(n, rounds, workers, run_dir=base / f"plain-{n}-{workers}")
            progress(f"  rounds {', '.join(format_s(x) for x in row[key]['seconds'])} s")
        rows.append(row)
        (base / "partial.json").write_text(json.dumps(rows, indent=1, default=str))
    return build_result(rows, out, quick, rounds)
