"""A department's own work alone, timed in a fresh interpreter without Flower (``python -m`` this package ``--probe``)."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .data import DEPARTMENTS, LABEL
from .processes import env

PROBE_MARKER = "DEPLOY-PROBE "


def probe(department_csv: Path, test_csv: Path) -> dict[str, float]:
    """In a fresh interpreter: a department's own work, without Flower.

    The import is what ``department start`` pays once before it answers tasks;
    the cold ``train_dp`` is the executor's first round, the warm one its later
    rounds; the evaluation is the ServerApp's per-round one on the test table.
    """
    t0 = time.perf_counter()
    importlib.import_module("fedsilo.client.app")  # the ClientApp the department's executor imports once

    t1 = time.perf_counter()
    importlib.import_module("opacus")  # train_dp imports it on first use

    t2 = time.perf_counter()
    import torch

    from fedsilo.client.budget_guard import plan_round
    from fedsilo.client.policy import DepartmentPolicy, RunRequest
    from fedsilo.client.trainer import train_dp
    from fedsilo.shared import accounting
    from fedsilo.shared.config import RunSettings
    from fedsilo.shared.data import load_table, table_schema
    from fedsilo.shared.models import build_model, evaluate

    schema = table_schema(test_csv, LABEL)
    t3 = time.perf_counter()
    data = load_table(department_csv, LABEL, schema=schema)
    t4 = time.perf_counter()
    settings = RunSettings.from_run_config({"model": "mlp"})
    terms, _ = DepartmentPolicy(max_epsilon=10.0).terms_for(RunRequest.from_settings(settings))
    mechanism = plan_round(settings, terms, len(data))
    t5 = time.perf_counter()
    accounting.epsilon([mechanism], terms.delta, terms.accountant)
    t6 = time.perf_counter()
    torch.set_num_threads(1)
    times = []
    for _ in range(2):
        model = build_model("mlp", data.input_shape, data.num_outputs, data.kind, task=data.task)
        started = time.perf_counter()
        train_dp(model, data, mechanism, max_grad_norm=settings.max_grad_norm, learning_rate=settings.learning_rate,
                 momentum=settings.momentum, grad_sample_mode=settings.grad_sample_mode)
        times.append(time.perf_counter() - started)
    test = load_table(test_csv, LABEL, schema=schema)
    started = time.perf_counter()
    evaluate(model, test)
    evaluated = time.perf_counter() - started
    return {
        "import_client_app_s": t1 - t0,
        "import_opacus_s": t2 - t1,
        "read_table_s": t4 - t3,
        "epsilon_s": t6 - t5,
        "train_dp_cold_s": times[0],
        "train_dp_warm_s": times[1],
        "evaluate_s": evaluated,
        "steps": mechanism.steps,
        "examples": len(data),
    }


def _probe_command(department_csv: Path, test_csv: Path) -> list[str]:
    return [sys.executable, "-m", __package__, "--probe", str(department_csv), str(test_csv)]


def _probe_output(proc: subprocess.Popen, started: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - started
    line = next((l for l in reversed(out.splitlines()) if l.startswith(PROBE_MARKER)), None)
    if line is None:
        raise RuntimeError(f"probe exited {proc.returncode}: {(err or out)[-1500:]}")
    return {**json.loads(line[len(PROBE_MARKER):]), "process_wall_s": wall}


def run_probe(department_csv: Path, test_csv: Path, repeats: int, together: int = len(DEPARTMENTS)) -> dict[str, Any]:
    """Fresh interpreters: ``repeats`` one after the other, then ``together`` at once (as the departments
    train at once in a round); the parent also times each one's whole life, interpreter start included."""
    probe_env = {**env(), "OMP_NUM_THREADS": "1"}

    def start() -> tuple[subprocess.Popen, float]:
        return (subprocess.Popen(_probe_command(department_csv, test_csv), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=probe_env), time.perf_counter())

    alone = []
    for _ in range(repeats):
        alone.append(_probe_output(*start()))
    launched = [start() for _ in range(together)]
    at_once = [_probe_output(*p) for p in launched]
    # An interpreter that imports nothing of ours: the floor of any new process.
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=probe_env)
    bare = time.perf_counter() - started
    keys = [k for k in alone[0] if isinstance(alone[0][k], float)]
    med = lambda runs: {k: statistics.median(r[k] for r in runs) for k in keys}  # noqa: E731
    return {"runs": alone, "together_runs": at_once, "median": med(alone), "together_median": med(at_once),
            "bare_interpreter_s": bare, "repeats": repeats, "together": together}


def main(argv: list[str] | None = None) -> int:
    """``--probe DEPARTMENT_CSV TEST_CSV``: print the probe's timings as one marked JSON line."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}",
                                     description="The deployment benchmark's fresh-interpreter probe.")
    parser.add_argument("--probe", nargs=2, metavar=("DEPARTMENT_CSV", "TEST_CSV"), required=True)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    print(PROBE_MARKER + json.dumps(probe(Path(args.probe[0]), Path(args.probe[1]))), flush=True)
    return 0
