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
