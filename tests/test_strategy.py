"""The coordinator averages only usable updates and names every department's fate."""

import numpy as np
import pytest
from flower_messages import Grid as _Grid
from flower_messages import reply as _reply
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsilo.server.strategy import DepartmentFedAvg


pytestmark = pytest.mark.usefixtures("serverapp_identity")


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
