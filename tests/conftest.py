"""Shared fixtures: every Flower process a test starts runs offline, without telemetry.

Also how the workers share: under ``--dist loadfile`` each test file is one work unit, and the
files that read one session fixture (:func:`digits_simulation`) are one unit together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture
def digits_csv(tmp_path):
    """The digits data as a CSV table with a 'label' column."""
    import pandas as pd
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"px{i}" for i in range(bunch.data.shape[1])])
    frame["label"] = bunch.target
    path = tmp_path / "digits.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def serverapp_identity(monkeypatch):
    """Messages are stamped with the running task's identity, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# Test files that read a session fixture built by another file's tests, and the file they run with
# under `--dist loadfile`: on one worker the session builds it once (elsewhere it would be built again).
RUN_WITH = {"tests/test_audit_report.py": "tests/test_simulation_e2e.py"}  # both read digits_simulation


# The files that take longest (measured; a test run's --durations shows them), slowest first. Run first,
# so that two workers end together: a long file handed out last would run on alone. Other files
# follow in their usual order. Only the order changes, never what runs; a file's tests stay in order.
SLOWEST_FIRST = (
    "tests/test_deployment.py",
    "tests/test_deployment_resume.py",
    "tests/test_bench_smoke.py",
    "tests/test_simulation_e2e.py",
    "tests/test_deployment_workloads.py",
    "tests/test_workloads.py",
    "tests/test_resume.py",
    "tests/test_distributed_dp_simulation.py",
    "tests/test_malicious_department.py",
    "tests/test_intruder.py",
    "tests/test_pretrained.py",
    "tests/test_central_dp.py",
)


def pytest_collection_modifyitems(config, items):
    """The files of :data:`SLOWEST_FIRST` first (a stable sort: each file's tests keep their order)."""
    rank = {file: i for i, file in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(RUN_WITH.get(_file(item.nodeid), _file(item.nodeid)), len(rank)))


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, a work unit per file, except the files in :data:`RUN_WITH` (with their partner).

    (xdist's own ``xdist_group`` marks need ``--dist loadgroup``, which pytest 9 no longer honours:
    the group is written into ``item._nodeid``, which ``nodeid`` stopped reading.)
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # hand files out in collection order: SLOWEST_FIRST first

    class SharedFixtures(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return RUN_WITH.get(file, file)

    return SharedFixtures(config, log)


@dataclass(frozen=True)
class SimulatedRun:
    """A finished ``fedsilo simulate`` run: its output folder, the CLI's output and its size."""

    out: Path
    result: subprocess.CompletedProcess
    departments: int
    rounds: int


@pytest.fixture(scope="session")
def digits_simulation(tmp_path_factory) -> SimulatedRun:
    """One real simulation (4 departments × 3 rounds of digits, defaults otherwise) for the whole session.

    A file whose tests read it is in :data:`RUN_WITH`, so that under ``--dist loadfile`` its tests
    run on the same worker as test_simulation_e2e.py's and the session builds it once.

    Only read it: a test that changes a run (tampers, reruns) works on a copy,
    ``shutil.copytree(run.out, copy, symlinks=True)`` (``latest`` and ``ledgers`` are relative links).
    """
    departments, rounds = 4, 3
    out = tmp_path_factory.mktemp("digits-simulation") / "R"
    result = subprocess.run(
        [sys.executable, "-m", "fedsilo", "simulate", "--departments", str(departments), "--rounds", str(rounds),
         "--dataset", "digits", "--out", str(out)],
        capture_output=True, text=True, timeout=900,  # a bound on a hang: about a minute on 2 idle cores
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return SimulatedRun(out, result, departments, rounds)
