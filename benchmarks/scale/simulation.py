"""The simulation measured: the real ``fedsilo simulate`` CLI in a subprocess, its process tree's memory and census."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedsilo.shared.runs import resolve_run_dir
from fedsilo.shared.summary_format import read_summary

from ..common import Sampler, TreeMemory
from .config import DATASET, PARTITION, SEED, SIM_TIMEOUT_S


def progress(text: str) -> None:
    print(f"  [scale] {text}", flush=True)


def env() -> dict[str, str]:
    from fedsilo.shared.flower_cli import offline_env

    return offline_env()


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
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env())
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
    summary = read_summary(summary_path)
    seconds = [float(r.seconds) for r in summary.rounds]
    trained = [len(r.trained) for r in summary.rounds]
    return {
        "departments": departments,
        "rounds": len(seconds),
        "status": summary.status,
        "seconds": seconds,
        "trained": trained,
        "refused": [len(r.refused) for r in summary.rounds],
        "failed": [len(r.failed) + len(r.rejected) for r in summary.rounds],
        "mean_round_s": statistics.mean(seconds),
        "steady_round_s": statistics.mean(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "department_rounds_per_s": sum(trained) / sum(seconds) if sum(seconds) else None,
        "wall_s": wall,
        "run_wall_time_s": summary.wall_time_s,
        "startup_s": wall - sum(seconds),
        "peak_pss_bytes": memory.peak,
        "peak_pss_gib": memory.peak_gib,
        "max_processes": census.most,
        "processes_by_name": census.names,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "ray_client_workers": census.ray_workers,
        "final_accuracy": summary.final_accuracy,
        "max_epsilon": max((d.epsilon or 0.0 for d in summary.departments.values()), default=None),
        "run_dir": str(run_dir),
        "command": cmd[1:],
    }

