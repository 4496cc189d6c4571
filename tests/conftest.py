"""Shared fixtures: every Flower process a test starts runs offline, without telemetry."""

from __future__ import annotations

import os

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


# The files that take minutes, longest first; the rest follow in their own order.
# `make test` runs two xdist workers with `--dist loadfile --no-loadscope-reorder`:
# a long file started last would run alone at the end.
LONGEST_FIRST = (
    "test_deployment.py", "test_bench_all_quick.py", "test_deployment_resume.py", "test_simulation_e2e.py",
    "test_deployment_workloads.py", "test_workloads.py", "test_intruder.py", "test_resume.py",
    "test_audit_report.py", "test_central_dp.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
