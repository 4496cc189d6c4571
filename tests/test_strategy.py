"""The coordinator averages only usable updates and names every department's fate."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from fedsilo.server.strategy import DepartmentFedAvg


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Messages are stamped with the running task's identity, as inside a ServerApp."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def _request(node_id, arrays):
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=node_id, message_type="train")


def _reply(request, name, weights=None, n=10, status="trained", eps=1.0):
    content = {
        "metrics": MetricRecord({"num-examples": n if status == "trained" else 0, "train-loss": 0.5, "epsilon": eps, "steps": 3, "noise-multiplier": 1.0, "sample-rate": 0.1}),
        "department": ConfigRecord({"name": name, "status": status, "reason": "budget" if status == "refused" else ""}),
    }
    if weights is not None:
        content["arrays"] = ArrayRecord({"w": Array(weights)})
    return Message(RecordDict(content), reply_to=request)


def test_weighted_average_skips_refused_nan_and_misshaped_updates():
    base = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    strategy = DepartmentFedAvg(min_available_nodes=1, min_train_nodes=1)
    requests = list(strategy.configure_train(1, base, ConfigRecord(), _Grid([1, 2, 3, 4, 5])))
    replies = [
        _reply(requests[0], "a", np.ones((2, 2), dtype=np.float32), n=10, eps=1.0),
        _reply(requests[1], "b", 3 * np.ones((2, 2), dtype=np.float32), n=30, eps=2.0),
        _reply(requests[2], "c", status="refused", eps=7.9),
        _reply(requests[3], "d", np.full((2, 2), np.nan, dtype=np.float32)),
        _reply(requests[4], "e", np.ones((3, 2), dtype=np.float32)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.last_report
    assert np.allclose(arrays["w"].numpy(), 2.5)  # (1*10 + 3*30) / 40
    assert sorted(report.trained) == ["a", "b"]
    assert report.refused == {"c": "budget"}
    assert "NaN" in report.rejected["d"] and "shape" in report.rejected["e"]
    assert report.epsilon["c"] == pytest.approx(7.9)


def test_a_round_of_refusals_aggregates_nothing():
    base = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strategy = DepartmentFedAvg(min_available_nodes=1, min_train_nodes=1)
    (request,) = strategy.configure_train(1, base, ConfigRecord(), _Grid([9]))
    assert strategy.aggregate_train(1, [_reply(request, "z", status="refused")]) == (None, None)
    assert strategy.last_report.refused == {"z": "budget"}
